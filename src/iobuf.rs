//! Reused buffers for the data of FUSE reads and writes.
//!
//! Why: a read's answer and a write's data are up to 1 MiB each (`fuse::FuseAdapter::init`), and a fresh allocation
//! that large comes from its own mapping (or the top of a heap) that the allocator gives back to the system when it is
//! freed, so the next request faults every page in again. Measured with perf in a sequential write, those faults were
//! a tenth of the daemon's time. A few buffers are kept instead. A buffer is zeroed when it is given back, so file
//! content does not linger in the pool between requests (a memset of what was used, cheap next to the copy that
//! filled it).

use std::sync::Mutex;

/// How many buffers are kept at most: about as many as the kernel has requests in flight at once.
const KEPT: usize = 8;
/// The largest buffer kept: one request's worth.
const KEPT_CAPACITY: usize = (1 << 20) + (64 << 10);

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with room for `len` bytes, one given back earlier when there is one.
pub fn take(len: usize) -> Vec<u8> {
    let mut buf = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
    buf.clear();
    buf.reserve(len);
    buf
}

/// Gives `buf` back for a later [`take`] (dropped when the pool is full or it is larger than a request).
pub fn give(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > KEPT_CAPACITY {
        return;
    }
    // Only what was used: the rest was zero when this buffer was last given back, or never written.
    buf.fill(0);
    buf.clear();
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < KEPT {
        pool.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_zeroed_and_oversized_ones_are_not_kept() {
        let a = take(1000);
        assert!(a.is_empty() && a.capacity() >= 1000);
        give(a);
        // A capacity no other test uses, to find this buffer in the shared pool (emptied first: room for it).
        POOL.lock().unwrap().clear();
        let mut b = Vec::with_capacity(777_777);
        b.extend_from_slice(b"left over");
        give(b);
        let mut pool = POOL.lock().unwrap();
        let at = pool.iter().position(|v| v.capacity() == 777_777).expect("a buffer given back is kept");
        let mut kept = pool.remove(at);
        assert!(kept.is_empty());
        // SAFETY: these 9 bytes were written above (then zeroed by `give`): initialized memory of this buffer.
        unsafe { kept.set_len(9) };
        assert_eq!(kept, [0u8; 9], "what the buffer held is still in it");
        drop(pool);
        give(Vec::with_capacity(KEPT_CAPACITY + 1));
        assert!(POOL.lock().unwrap().iter().all(|v| v.capacity() <= KEPT_CAPACITY && v.is_empty()));
    }
}
