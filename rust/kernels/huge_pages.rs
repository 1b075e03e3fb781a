//! Byte buffers carved from large, 2 MB-aligned mappings the kernel may back with 2 MB pages
//! (transparent huge pages, asked for with `MADV_HUGEPAGE`).
//!
//! A model's repacked weights are a few hundred buffers of 100 kB to a few MB, read in full on
//! every token. Each on its own gets 4 kB pages: a TLB entry per 4 kB, hardware prefetchers that
//! stop at every page boundary, and at load a page fault per 4 kB. Carved from shared 2 MB pages,
//! they stream with 512 times fewer of each. A chunk is unmapped when the last buffer in it goes.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, Weak};

/// Bytes per chunk mapping (a buffer larger than this gets a chunk of its own).
const CHUNK: usize = 32 << 20;
const HUGE_PAGE: usize = 2 << 20;
/// Where buffers start within a chunk: whole cache lines, so kernels' loads stay aligned.
const ALIGN: usize = 64;

/// One mapping, freed when its last buffer is dropped.
struct Chunk {
    ptr: *mut u8,
    len: usize,
    /// The mapping as made, which is what `munmap` takes (`ptr` is aligned within it).
    #[cfg(target_os = "linux")]
    mapping: (*mut libc::c_void, usize),
    #[cfg(not(target_os = "linux"))]
    _owned: Vec<u8>,
}

// SAFETY: a chunk is plain memory; buffers carved from it never overlap, and each is accessed
// only through the one `HugePageBytes` that owns its range.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

impl Chunk {
    /// Zeroed bytes (fresh anonymous pages), `len` a multiple of 2 MB, aligned to 2 MB.
    #[cfg(target_os = "linux")]
    fn new(len: usize) -> Chunk {
        let span = len + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(span, HUGE_PAGE).expect("a layout"));
        }
        let ptr = (base as usize).next_multiple_of(HUGE_PAGE) as *mut u8;
        // SAFETY: advice on memory of this mapping; it changes no contents.
        unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
        Chunk { ptr, len, mapping: (base, span) }
    }

    #[cfg(not(target_os = "linux"))]
    fn new(len: usize) -> Chunk {
        let mut owned = vec![0u8; len + ALIGN];
        let ptr = owned.as_mut_ptr().wrapping_add(owned.as_ptr().align_offset(ALIGN));
        Chunk { ptr, len, _owned: owned }
    }
}

#[cfg(target_os = "linux")]
impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the mapping this chunk made; no buffer of it is left.
        unsafe { libc::munmap(self.mapping.0, self.mapping.1) };
    }
}

/// `len` zeroed bytes in a huge-page chunk.
pub struct HugePageBytes {
    chunk: Arc<Chunk>,
    offset: usize,
    len: usize,
}

/// The chunk being carved, and how much of it is taken. Weak: the chunk goes with its last buffer.
static CURRENT: Mutex<Option<(Weak<Chunk>, usize)>> = Mutex::new(None);

impl HugePageBytes {
    pub fn zeroed(len: usize) -> HugePageBytes {
        if len > CHUNK / 2 {
            // as large as a chunk's worth: its own, so no chunk is left mostly unused
            let chunk = Arc::new(Chunk::new(len.next_multiple_of(HUGE_PAGE)));
            return HugePageBytes { chunk, offset: 0, len };
        }
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let carve = current.as_ref().and_then(|(chunk, used)| {
            let offset = used.next_multiple_of(ALIGN);
            chunk.upgrade().filter(|c| offset + len <= c.len).map(|c| (c, offset))
        });
        let (chunk, offset) = carve.unwrap_or_else(|| (Arc::new(Chunk::new(CHUNK)), 0));
        *current = Some((Arc::downgrade(&chunk), offset + len));
        HugePageBytes { chunk, offset, len }
    }
}

impl Deref for HugePageBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `offset..offset + len` lies in the chunk and belongs to this buffer alone.
        unsafe { std::slice::from_raw_parts(self.chunk.ptr.add(self.offset), self.len) }
    }
}

impl DerefMut for HugePageBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `deref`; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.chunk.ptr.add(self.offset), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_and_apart() {
        let mut bufs: Vec<HugePageBytes> =
            [100, 1, 5000, 0, 64, 3 << 20].iter().map(|&n| HugePageBytes::zeroed(n)).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            assert!(b.iter().all(|&x| x == 0));
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            b.fill(i as u8 + 1);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8 + 1), "buffer {i} was overwritten");
        }
        let big = HugePageBytes::zeroed(CHUNK);
        assert_eq!((big.len(), big.as_ptr() as usize % HUGE_PAGE), (CHUNK, 0));
    }
}
