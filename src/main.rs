//! The `s3cryptfs` command: parse arguments, call the library, map failure to an exit code.

use clap::Parser;

fn main() {
    let cli = s3cryptfs::cli::Cli::parse();
    if let Err(e) = s3cryptfs::run::run(cli) {
        eprintln!("s3cryptfs: {e:#}");
        std::process::exit(1);
    }
}
