//! Page buffers that live outside malloc's heaps, so a page the cache drops is given back to the system at once.
//!
//! Why: the cache holds thousands of 64 KiB pages and replaces them one at a time, in LRU order, from whichever thread
//! decrypted them. From malloc's heaps (two arenas, see `memory::tune_allocator`) the space an evicted page leaves
//! stays resident until the next `malloc_trim`, and the next page is often carved from the other arena: measured
//! reading 4 GiB with `max_memory=96M` (cache full at ~71 MiB), the two arenas held 90 MiB resident for 72 MiB of live
//! pages, and the daemon peaked at 109–126 MiB (the budget's 80 MiB counted + ~28 MiB of freed-but-kept heap + the
//! mapped binary). A page mapped on its own (`mmap`, exactly 16 memory pages for a full chunk) costs what it holds and
//! is unmapped when its last `Bytes` goes: the RSS follows the counted bytes.
//!
//! Cost: a mapping per page is a system call to make it (pre-faulted) and one to unmap it. The last [`SPARE_PAGES`]
//! full pages dropped are kept mapped for the next ones instead, which a streaming read replaces one for one: 1 MiB
//! more RSS at most, and the read's system time back near what the heap cost (measured reading 4 GiB: 8.7–9.9 s
//! system time from the heap, 13.5–14.5 s with a mapping per page and no spares, 8.9 s with them).
//!
//! Pages shorter than [`MAPPED_MIN`] (the tail of a file) stay on the heap: rounding them up to whole memory pages
//! would cost more than their share of fragmentation. If the system refuses a mapping (`vm.max_map_count` with a
//! cache of many GiB), the page goes to the heap too.

use bytes::Bytes;

/// The shortest page given a mapping of its own: a quarter of a chunk, so rounding up to whole memory pages wastes at
/// most a fifth of what is mapped.
pub const MAPPED_MIN: usize = 16 << 10;

/// Full pages (one chunk) kept mapped after their last user dropped them, for the next page: 1 MiB.
pub const SPARE_PAGES: usize = 16;

/// Length of a full page's mapping.
const FULL: usize = crate::crypto::CHUNK_PLAIN_LEN as usize;

#[cfg(unix)]
static SPARES: std::sync::Mutex<Vec<Mapped>> = std::sync::Mutex::new(Vec::new());

/// A page being filled before it is shared as [`Bytes`].
pub struct PageBuf(Inner);

enum Inner {
    #[cfg(unix)]
    Mapped(Mapped),
    Heap(Vec<u8>),
}

impl PageBuf {
    /// A page holding a copy of `data`: mapped on its own if it is at least [`MAPPED_MIN`] long.
    pub fn copy_of(data: &[u8]) -> PageBuf {
        #[cfg(unix)]
        if data.len() >= MAPPED_MIN {
            if let Some(mut m) = Mapped::new(data.len()) {
                m.as_mut_slice().copy_from_slice(data);
                return PageBuf(Inner::Mapped(m));
            }
        }
        PageBuf(Inner::Heap(data.to_vec()))
    }

    /// A page of `len` bytes to be filled in place (its contents are unspecified until then): mapped on its own if
    /// it is at least [`MAPPED_MIN`] long.
    pub fn for_len(len: usize) -> PageBuf {
        #[cfg(unix)]
        if len >= MAPPED_MIN {
            if let Some(m) = Mapped::new(len) {
                return PageBuf(Inner::Mapped(m));
            }
        }
        PageBuf(Inner::Heap(vec![0u8; len]))
    }

    /// Whether the page has a mapping of its own (for tests).
    pub fn is_mapped(&self) -> bool {
        match &self.0 {
            #[cfg(unix)]
            Inner::Mapped(_) => true,
            Inner::Heap(_) => false,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.0 {
            #[cfg(unix)]
            Inner::Mapped(m) => m.as_mut_slice(),
            Inner::Heap(v) => v,
        }
    }

    /// The page, shared: the mapping goes when the last clone of the `Bytes` does.
    pub fn freeze(self) -> Bytes {
        match self.0 {
            #[cfg(unix)]
            Inner::Mapped(m) => Bytes::from_owner(m),
            Inner::Heap(v) => Bytes::from(v),
        }
    }
}

/// `len` bytes of anonymous memory mapped for one page, unmapped on drop.
#[cfg(unix)]
struct Mapped {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone (no aliasing pointer exists); shared access is read-only through
// `AsRef`, mutable access needs `&mut self`.
#[cfg(unix)]
unsafe impl Send for Mapped {}
// SAFETY: see `Send`; `&Mapped` only gives out `&[u8]`.
#[cfg(unix)]
unsafe impl Sync for Mapped {}

#[cfg(unix)]
impl Mapped {
    fn new(len: usize) -> Option<Mapped> {
        if len == FULL {
            if let Some(m) = SPARES.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                return Some(m);
            }
        }
        Mapped::map(len)
    }

    fn map(len: usize) -> Option<Mapped> {
        // Faulted in by the call: the page is written whole right away.
        #[cfg(target_os = "linux")]
        const POPULATE: libc::c_int = libc::MAP_POPULATE;
        #[cfg(not(target_os = "linux"))]
        const POPULATE: libc::c_int = 0;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        std::ptr::NonNull::new(ptr.cast()).map(|ptr| Mapped { ptr, len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` maps `len` readable and writable bytes owned by `self`, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(unix)]
impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes owned by `self` until it drops.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(unix)]
impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len == FULL {
            let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
            if spares.len() < SPARE_PAGES {
                // Moved into the list: the mapping is not unmapped, it is handed on (its old bytes are all overwritten
                // by the next copy_of, which writes a full page).
                spares.push(Mapped { ptr: self.ptr, len: self.len });
                self.len = 0;
                return;
            }
        }
        if self.len == 0 {
            return;
        }
        // SAFETY: the mapping was made by `Mapped::new` with this length and nothing refers to it any more.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_page_is_mapped_and_reads_back_as_written() {
        let data: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
        let page = PageBuf::copy_of(&data);
        assert_eq!(page.is_mapped(), cfg!(unix));
        let bytes = page.freeze();
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(&clone[..], &data[..], "the mapping lives as long as a clone");
        assert_eq!(&clone.slice(100..200)[..], &data[100..200]);
    }

    #[test]
    fn a_recycled_page_holds_only_the_new_bytes() {
        let pages: Vec<Bytes> = (0..2 * SPARE_PAGES as u8).map(|b| PageBuf::copy_of(&[b; FULL]).freeze()).collect();
        drop(pages);
        for b in 100..100 + 2 * SPARE_PAGES as u8 {
            let page = PageBuf::copy_of(&[b; FULL]).freeze();
            assert!(page.iter().all(|x| *x == b), "page {b} holds its own bytes only");
        }
    }

    #[test]
    fn a_short_tail_stays_on_the_heap_and_can_be_changed_in_place() {
        let mut page = PageBuf::copy_of(b"tail");
        assert!(!page.is_mapped());
        page.as_mut_slice()[0] = b'T';
        assert_eq!(&page.freeze()[..], b"Tail");
        let mut big = PageBuf::copy_of(&vec![1u8; MAPPED_MIN]);
        big.as_mut_slice()[MAPPED_MIN - 1] = 2;
        let big = big.freeze();
        assert_eq!((big[0], big[MAPPED_MIN - 1], big.len()), (1, 2, MAPPED_MIN));
    }
}
