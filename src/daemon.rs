//! What the two long-running processes (a mount and the key agent) share: hardening a process that holds keys,
//! detaching from the terminal, and log writers for syslog and the systemd journal. One copy, so both daemons
//! behave the same way.

use std::io::Write;

/// No core dumps and not dumpable: the process holds keys (and, for a mount, plaintext). Not dumpable also means
/// other processes of the same user cannot ptrace it or read its memory through /proc. An error if either is
/// refused: the caller stops before it reads a key.
pub fn harden_process() -> anyhow::Result<()> {
    let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit with a valid resource and a pointer to a live rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        anyhow::bail!("turning off core dumps (setrlimit RLIMIT_CORE): {}", std::io::Error::last_os_error());
    }
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        anyhow::bail!("making the process not dumpable (prctl PR_SET_DUMPABLE): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft limit on open descriptors to the hard one (which systemd and most distributions set far above
/// the soft 1024): a mount holds a descriptor per staged file, per store connection and per disk cache read, and
/// EMFILE would fail writes. tokio uses epoll, so no descriptor number needs to stay below FD_SETSIZE. Returns the
/// soft limit now in force.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a live rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// True when stderr is the journal stream systemd connected us to ($JOURNAL_STREAM names its device and inode).
pub fn under_journald() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = stream.split_once(':') else { return false };
    // SAFETY: fstat on descriptor 2 writes into a zeroed stat buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// A `MakeWriter` for the journal: each event becomes one stderr line prefixed with its syslog priority.
pub struct JournalWriter;

pub struct JournalLine {
    priority: libc::c_int,
    buf: Vec<u8>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for JournalWriter {
    type Writer = JournalLine;
    fn make_writer(&'a self) -> JournalLine {
        JournalLine { priority: libc::LOG_INFO, buf: Vec::new() }
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> JournalLine {
        JournalLine { priority: syslog_priority(meta.level()), buf: Vec::new() }
    }
}

impl Write for JournalLine {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for JournalLine {
    fn drop(&mut self) {
        let mut line = format!("<{}>", self.priority).into_bytes();
        line.extend_from_slice(&self.buf);
        let _ = std::io::stderr().write_all(&line);
    }
}

fn syslog_priority(level: &tracing::Level) -> libc::c_int {
    match *level {
        tracing::Level::ERROR => libc::LOG_ERR,
        tracing::Level::WARN => libc::LOG_WARNING,
        tracing::Level::INFO => libc::LOG_INFO,
        _ => libc::LOG_DEBUG,
    }
}

/// A `MakeWriter` that sends each formatted event to syslog with the event's level.
pub struct SyslogWriter;

pub struct SyslogLine {
    priority: libc::c_int,
    buf: Vec<u8>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SyslogWriter {
    type Writer = SyslogLine;
    fn make_writer(&'a self) -> SyslogLine {
        SyslogLine { priority: libc::LOG_INFO, buf: Vec::new() }
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> SyslogLine {
        SyslogLine { priority: syslog_priority(meta.level()), buf: Vec::new() }
    }
}

impl Write for SyslogLine {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine {
    fn drop(&mut self) {
        let text: Vec<u8> = self.buf.iter().copied().filter(|b| *b != 0).collect();
        if let Ok(c) = std::ffi::CString::new(text) {
            // SAFETY: format string and argument are valid NUL-terminated strings.
            unsafe { libc::syslog(self.priority, c"%s".as_ptr(), c.as_ptr()) };
        }
    }
}

/// Points stdin and stdout at /dev/null (and stderr too unless it is still wanted), so a background daemon holds no
/// terminal or pipe of the process that started it.
pub fn detach_stdio(keep_stderr: bool) {
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        let fd = null.as_raw_fd();
        // SAFETY: dup2 onto the standard descriptors with a valid open descriptor.
        unsafe {
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            if !keep_stderr {
                libc::dup2(fd, 2);
            }
        }
    }
}

/// The parent side of going to the background: waits until the child writes "ready" on the pipe (the child keeps
/// serving and holding its end), or writes its error and exits; `what` names the child for the case where it died
/// without a word. Used by the mount and the agent alike.
pub fn wait_until_ready(read_end: std::os::fd::OwnedFd, what: &str) -> anyhow::Result<()> {
    use std::io::{BufRead, Read};
    let mut reader = std::io::BufReader::new(std::fs::File::from(read_end));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim_end() == "ready" {
        return Ok(());
    }
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    let msg = format!("{line}{rest}");
    let msg = msg.trim();
    if msg.is_empty() {
        anyhow::bail!("{what} exited before it was ready")
    }
    anyhow::bail!("{msg}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nofile() -> libc::rlimit {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit with a valid resource and a pointer to a live rlimit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        lim
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_one() {
        let before = nofile();
        // Lowered by one first if it is at the hard limit already, so that the test shows a raise whatever limits it
        // was started with (by one only: the other tests of this process run meanwhile and need their descriptors).
        if before.rlim_cur == before.rlim_max {
            let low = libc::rlimit { rlim_cur: before.rlim_max - 1, rlim_max: before.rlim_max };
            // SAFETY: as in `nofile`.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        }
        assert_eq!(raise_open_file_limit(), before.rlim_max);
        let after = nofile();
        assert_eq!((after.rlim_cur, after.rlim_max), (before.rlim_max, before.rlim_max));
    }
}
