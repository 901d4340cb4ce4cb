//! System integration: the shipped systemd unit passes `systemd-analyze verify`, and the binary installed as
//! `mount.fuse.s3cryptfs` serves `mount -t fuse.s3cryptfs` and fstab lines, with `umount` (through
//! `umount.fuse.s3cryptfs`) returning once the final uploads are done, and the daemon
//! exiting.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/systemd/s3cryptfs@.service");

#[test]
fn the_systemd_unit_verifies_cleanly() {
    // systemd-analyze comes with the systemd package, which .ci/run installs; without it this test cannot run.
    let probe = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        probe.map(|o| o.status.success()).unwrap_or(false),
        "systemd-analyze is missing: install the systemd package (.ci/run does)"
    );
    let env = Env::new();
    // A template is verified through an instance, with ExecStart pointing at a binary that exists.
    let unit = env.path().join("s3cryptfs@demo.service");
    fs::write(&unit, fs::read_to_string(UNIT).unwrap().replace("/usr/local/bin/s3cryptfs", BIN)).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Lines about other units on the machine are not ours to judge.
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("s3cryptfs")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {text}");
    let unit_text = fs::read_to_string(UNIT).unwrap();
    for needed in ["Type=notify", "LoadCredential=key:", "key_credential=key", "Restart=on-failure", "NoNewPrivileges=yes"] {
        assert!(unit_text.contains(needed), "the unit lacks {needed}");
    }
    // Options that would hide the mount in a private namespace must not creep in.
    for forbidden in ["ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts"] {
        assert!(!unit_text.lines().any(|l| l.starts_with(forbidden)), "{forbidden} would hide the mount");
    }
}

/// Installs `/sbin/mount.fuse.s3cryptfs` pointing at the binary under test for the life of the guard.
/// And `/sbin/umount.fuse.s3cryptfs`, which umount(8) runs for mounts of that type.
struct Helper(Vec<PathBuf>);

impl Helper {
    fn install() -> Helper {
        let links: Vec<PathBuf> = ["/sbin/mount.fuse.s3cryptfs", "/sbin/umount.fuse.s3cryptfs"].iter().map(PathBuf::from).collect();
        for link in &links {
            let _ = fs::remove_file(link);
            std::os::unix::fs::symlink(BIN, link).expect("tests run as root to install the mount helpers");
        }
        Helper(links)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        for link in &self.0 {
            if fs::read_link(link).map(|t| t == Path::new(BIN)).unwrap_or(false) {
                let _ = fs::remove_file(link);
            }
        }
    }
}

/// Makes this test process the subreaper of its descendants, so the daemon that mount(8)'s helper leaves behind
/// (orphaned when the helper exits) becomes our child and its exit status can be collected.
fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "prctl(PR_SET_CHILD_SUBREAPER): {}", std::io::Error::last_os_error());
}

/// The pid of the s3cryptfs daemon serving `dir`.
fn daemon_pid(dir: &Path) -> i32 {
    let needle = dir.to_string_lossy().to_string();
    let out = Command::new("pgrep").args(["-f", &format!("s3cryptfs.* {needle}( |$)")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<i32> = text.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 1, "expected one daemon for {needle}, found {pids:?}");
    pids[0]
}

/// Waits for the daemon (our child through the subreaper) to exit and returns its exit code.
fn wait_for_daemon_exit(pid: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut status = 0;
        // SAFETY: waitpid on a pid with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid({pid}): {} (is the daemon our descendant?)", std::io::Error::last_os_error());
        if r == pid {
            assert!(libc::WIFEXITED(status), "the daemon was killed by signal {}", libc::WTERMSIG(status));
            return libc::WEXITSTATUS(status);
        }
        assert!(Instant::now() < deadline, "the daemon {pid} did not exit after umount");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mount_t_fuse_s3cryptfs_and_fstab_lines_work_and_umount_flushes() {
    let _helper = Helper::install();
    become_subreaper();
    let env = Env::new();
    let store = Store::local(env.path());
    let dir = env.path().join("mnt-helper");
    fs::create_dir_all(&dir).unwrap();
    let opts = format!(
        "rw,_netdev,nofail,x-systemd.automount,mode=cse-c,key_file={},staging_dir={}",
        env.key_file.display(),
        env.path().join("staging").display()
    );

    let out = Command::new("mount").args(["-t", "fuse.s3cryptfs", &store.url()]).arg(&dir).args(["-o", &opts]).output().unwrap();
    assert!(out.status.success(), "mount -t fuse.s3cryptfs: {}", String::from_utf8_lossy(&out.stderr));
    assert!(is_mounted(&dir), "mount(8) returned before the mount served");
    // As root the mount is typed fuse.s3cryptfs (what findmnt -t, fstab matching and systemd see), sourced by the URL.
    let line = mountinfo_line(&dir).expect("mounted");
    let after_dash: Vec<&str> = line.split(" - ").nth(1).unwrap().split(' ').collect();
    assert_eq!(after_dash[0], "fuse.s3cryptfs", "mount type in {line}");
    assert_eq!(after_dash[1], store.url(), "mount source in {line}");
    let pid = daemon_pid(&dir);
    fs::write(dir.join("via-mount8"), b"written through mount(8)").unwrap();
    // umount runs our helper, which returns only once the daemon has uploaded what was still dirty.
    leave_dirty_at_unmount(&dir, "big", 48, b'x');
    let out = Command::new("umount").arg(&dir).output().unwrap();
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    let Store::Local { dir: store_dir } = &store else { unreachable!() };
    let stored = fs::metadata(store_dir.join("big")).map(|m| m.len()).unwrap_or(0);
    assert!(stored > 48 << 20, "the object right after umount returned: {stored} bytes");
    assert_eq!(wait_for_daemon_exit(pid), 0, "the daemon's exit status after umount");
    assert!(!is_mounted(&dir));

    // The same through an fstab line (util-linux reads an alternative fstab with -T).
    let fstab = env.path().join("fstab");
    fs::write(&fstab, format!("# test fstab\n{} {} fuse.s3cryptfs {opts} 0 0\n", store.url(), dir.display())).unwrap();
    let out = Command::new("mount").arg("-T").arg(&fstab).arg(&dir).output().unwrap();
    assert!(out.status.success(), "mount via fstab: {}", String::from_utf8_lossy(&out.stderr));
    assert_bytes(fs::read(dir.join("via-mount8")).unwrap(), b"written through mount(8)", "umount flushed it");
    let pid = daemon_pid(&dir);
    let out = Command::new("umount").arg(&dir).output().unwrap();
    assert!(out.status.success());
    assert_eq!(wait_for_daemon_exit(pid), 0, "the daemon's exit status after umount");

    // An unknown option is an error that names it, and nothing is mounted.
    let out = Command::new("mount")
        .args(["-t", "fuse.s3cryptfs", &store.url()])
        .arg(&dir)
        .args(["-o", &format!("{opts},frobnicate")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("frobnicate"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!is_mounted(&dir));
}
