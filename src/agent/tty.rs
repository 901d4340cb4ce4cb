//! Reading a key history from standard input for `s3cryptfs key add`, with echo off on a terminal.
//!
//! The text goes straight from file descriptor 0 into one wiped buffer of fixed size (std's `Stdin` would pass it
//! through its own unwiped buffer). On a terminal, echo is switched off for the read and restored afterwards, also
//! when the read is interrupted by SIGINT, SIGTERM, SIGHUP or SIGQUIT (a handler restores the terminal and re-raises
//! the signal), so the user is never left with a silent terminal.

use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::OnceLock;

use zeroize::Zeroizing;

use super::protocol::MAX_BODY_LEN;
use super::AgentError;
use crate::crypto::KeyHistory;

/// Longest key text accepted: what fits in one request.
const MAX_KEY_TEXT_LEN: usize = MAX_BODY_LEN;

/// Reads a key file's text from standard input and parses it.
pub(super) fn read_key_history() -> Result<KeyHistory, AgentError> {
    // SAFETY: isatty has no preconditions.
    let terminal = unsafe { libc::isatty(0) } == 1;
    let text = if terminal {
        eprint!(
            "Paste the key file's lines (base64; the first one encrypts), then press Ctrl-D (input is not shown): "
        );
        let echo_off = EchoOff::new();
        let text = read_stdin();
        drop(echo_off);
        eprintln!();
        text?
    } else {
        read_stdin()?
    };
    let text = std::str::from_utf8(&text).map_err(|_| AgentError::KeyTextNotUtf8)?;
    KeyHistory::parse(text).map_err(AgentError::KeyText)
}

/// All of standard input, up to [`MAX_KEY_TEXT_LEN`] bytes, in a wiped buffer.
fn read_stdin() -> Result<Zeroizing<Vec<u8>>, AgentError> {
    // SAFETY: fd 0 is open for the life of the process; ManuallyDrop keeps this File from closing it.
    let mut stdin = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
    // One byte more than the limit, to tell "exactly at the limit" from "longer".
    let mut buf = Zeroizing::new(vec![0u8; MAX_KEY_TEXT_LEN + 1]);
    let mut len = 0;
    loop {
        match stdin.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len > MAX_KEY_TEXT_LEN {
                    return Err(AgentError::KeyTextTooLong { max: MAX_KEY_TEXT_LEN });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(AgentError::Stdin(e)),
        }
    }
    // Shrinking keeps the allocation; Zeroizing wipes the whole capacity on drop.
    buf.truncate(len);
    Ok(buf)
}

/// The terminal settings to restore, readable from the signal handler.
static SAVED: OnceLock<libc::termios> = OnceLock::new();

/// Signals that would otherwise end the process with echo still off.
const RESTORE_ON: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Echo off on standard input while alive.
struct EchoOff {
    saved: libc::termios,
    old_actions: Vec<(libc::c_int, libc::sigaction)>,
}

impl EchoOff {
    /// Switches echo off; `None` (and echo unchanged) if the terminal settings cannot be read.
    fn new() -> Option<EchoOff> {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid termios pointer.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let _ = SAVED.set(saved);
        let mut old_actions = Vec::new();
        for sig in RESTORE_ON {
            // SAFETY: sigaction structs are plain data; the handler only calls async-signal-safe functions.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = restore_and_reraise as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &action, &mut old) == 0 {
                    old_actions.push((sig, old));
                }
            }
        }
        let mut quiet = saved;
        quiet.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL);
        // SAFETY: fd 0 and a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSAFLUSH, &quiet) };
        Some(EchoOff { saved, old_actions })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restoring the settings read in `new` and the previous signal actions.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
            for (sig, old) in &self.old_actions {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
    }
}

/// Restores the terminal, then dies of the same signal as if no handler had been installed.
extern "C" fn restore_and_reraise(sig: libc::c_int) {
    // SAFETY: tcsetattr, signal and raise are async-signal-safe; SAVED is set before this handler is installed.
    unsafe {
        if let Some(saved) = SAVED.get() {
            libc::tcsetattr(0, libc::TCSANOW, saved);
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}
