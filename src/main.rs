//! The `s3cryptfs` command: parse arguments, call the library, map failure to an exit code.
//!
//! Installed as `mount.fuse.s3cryptfs` (a link to this binary), it speaks mount(8)'s helper convention instead, so
//! `mount -t fuse.s3cryptfs` and fstab lines work; as `umount.fuse.s3cryptfs`, umount(8)'s helper convention, so
//! `umount` waits for the final uploads (see `unmount`).

use clap::Parser;

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let invoked_as = args.first().and_then(|a| a.rsplit('/').next()).unwrap_or("").to_string();
    if invoked_as.starts_with("umount.") {
        if let Err(e) = s3cryptfs::unmount::from_umount_helper(&args.split_off(1)) {
            eprintln!("{invoked_as}: {}", s3cryptfs::error_text::error_chain(&*e));
            std::process::exit(1);
        }
        return;
    }
    let cli = if invoked_as.starts_with("mount.") {
        match s3cryptfs::cli::from_mount_helper(&args.split_off(1)) {
            Ok(Some(cli)) => cli,
            Ok(None) => return,
            Err(e) => {
                eprintln!("{invoked_as}: {e}");
                std::process::exit(1);
            }
        }
    } else {
        s3cryptfs::cli::Cli::parse()
    };
    if let Err(e) = s3cryptfs::run::run(cli) {
        // Not `{e:#}`: many messages quote their cause, which anyhow would then print a second time.
        eprintln!("s3cryptfs: {}", s3cryptfs::error_text::error_chain(&*e));
        std::process::exit(1);
    }
}
