//! Memory for the weights laid out for the CPU kernels ([`super::ktiles`]): pieces of large
//! anonymous mappings that start on a 2 MiB boundary and are advised for transparent huge pages
//! before anything writes them, so the whole stream a decode step reads lies on huge pages.
//!
//! Written by hand because the global allocator cannot promise that. The layouts are made in
//! parallel at load, so glibc serves them from its per-thread arenas: pieces of heaps that begin
//! anywhere in a 2 MiB extent and reuse pages already touched (as 4 KiB pages) by the blocks
//! freed before them, and the advice only covers whole extents inside each buffer. On the 1.5B
//! Q4_K_M, 30% of the process's anonymous memory besides `thinkrag bench`'s probe (the layouts,
//! the KV cache, buffers) was on 4 KiB pages (`AnonHugePages` in `/proc/<pid>/smaps`), every
//! projection under 2 MiB among it; with this arena, 3%.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// A transparent huge page on x86-64 and most Linux targets.
const HUGE: usize = 2 << 20;
/// Bytes of a region that pieces share. A region's last extent that pieces touch becomes a whole
/// huge page however little of it they use: at most 2 MiB of waste per region, under 1% of the
/// laid-out weights. The rest of a region that no piece reaches is address space only.
const REGION_BYTES: usize = 256 << 20;
/// Every piece starts on a cache line (the tiles' own alignment).
const ALIGN: usize = 64;

/// One anonymous mapping, unmapped when the last piece in it is dropped.
struct Region {
    /// Owns the mapping; never read through (pieces use `base`).
    _map: memmap2::MmapMut,
    /// The mapping's first 2 MiB boundary, where pieces begin (from the mutable mapping, so
    /// pieces may write through it).
    base: NonNull<u8>,
    /// Bytes usable from `base`.
    len: usize,
}

// SAFETY: the region is plain memory; which thread writes which bytes is up to the pieces, each of
// which owns its own range.
unsafe impl Send for Region {}
// SAFETY: as above; `Region` itself hands out no references.
unsafe impl Sync for Region {}

impl Region {
    /// A fresh mapping of at least `len` bytes (rounded up to 2 MiB) from a 2 MiB boundary.
    fn new(len: usize) -> std::io::Result<Self> {
        let len = len.max(1).next_multiple_of(HUGE);
        // One extent more to start on a boundary: the pages before it are never touched, so
        // they cost address space only.
        let mut map = memmap2::MmapMut::map_anon(len + HUGE)?;
        let at = map.as_ptr() as usize;
        let skip = at.next_multiple_of(HUGE) - at;
        let usable = &mut map[skip..skip + len];
        crate::device::advise_huge_pages(usable);
        let base = NonNull::new(usable.as_mut_ptr()).expect("a mapping is never at address 0");
        Ok(Region {
            _map: map,
            base,
            len,
        })
    }
}

/// The region pieces are being carved from, and how many of its bytes are taken. Held
/// weakly: a region whose pieces are all gone (a dropped model) is unmapped, not kept for later.
static CURRENT: Mutex<Option<(Weak<Region>, usize)>> = Mutex::new(None);

/// `bytes` (a multiple of [`ALIGN`]) of fresh memory: the region holding them and their start.
/// Pieces are carved one after another from the current region; one that does not fit starts a
/// region of its own size or [`REGION_BYTES`], whichever is larger, which then serves the next
/// pieces if it has more room left than the old one.
fn carve(bytes: usize) -> std::io::Result<(Arc<Region>, NonNull<u8>)> {
    let mut current = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
    let live = current
        .as_ref()
        .and_then(|(weak, used)| Some((weak.upgrade()?, *used)));
    if let Some((region, used)) = &live {
        if used + bytes <= region.len {
            // SAFETY: `used + bytes <= len`: inside the region.
            let at = unsafe { region.base.add(*used) };
            *current = Some((Arc::downgrade(region), used + bytes));
            return Ok((Arc::clone(region), at));
        }
    }
    let region = Arc::new(Region::new(bytes.max(REGION_BYTES))?);
    let left = |r: &Region, used: usize| r.len - used;
    if live
        .as_ref()
        .is_none_or(|(r, used)| left(r, *used) < left(&region, bytes))
    {
        *current = Some((Arc::downgrade(&region), bytes));
    }
    let base = region.base;
    Ok((region, base))
}

/// A fixed-capacity vector of `Copy` values in the arena: filled once by [`TileVec::push`], then
/// read as a slice.
pub(crate) struct TileVec<T> {
    ptr: NonNull<T>,
    len: usize,
    cap: usize,
    /// Keeps the memory mapped (`None` for a capacity of 0).
    _region: Option<Arc<Region>>,
}

// SAFETY: a `TileVec` owns its values as a `Vec` does (its range of the region is its alone).
unsafe impl<T: Send> Send for TileVec<T> {}
// SAFETY: shared, it only hands out `&[T]`.
unsafe impl<T: Sync> Sync for TileVec<T> {}

impl<T: Copy> TileVec<T> {
    /// Room for `cap` values; an error when the OS maps no more memory.
    pub(crate) fn with_capacity(cap: usize) -> std::io::Result<Self> {
        assert!(std::mem::align_of::<T>() <= ALIGN, "TileVec: alignment");
        let bytes = cap
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| std::io::Error::other("TileVec: capacity overflows"))?;
        if bytes == 0 {
            return Ok(TileVec {
                ptr: NonNull::dangling(),
                len: 0,
                cap,
                _region: None,
            });
        }
        let (region, at) = carve(bytes.next_multiple_of(ALIGN))?;
        Ok(TileVec {
            ptr: at.cast(),
            len: 0,
            cap,
            _region: Some(region),
        })
    }

    /// Appends `value`. Panics past the capacity (a layout's sizes are computed before it is
    /// filled, so that is a bug here, never bad input).
    pub(crate) fn push(&mut self, value: T) {
        assert!(self.len < self.cap, "TileVec::push past its capacity");
        // SAFETY: `len < cap`: inside this vector's range, aligned (pieces start on 64 bytes,
        // `T`'s alignment is at most that and its size a multiple of it).
        unsafe { self.ptr.add(self.len).write(value) };
        self.len += 1;
    }
}

impl<T> Drop for TileVec<T> {
    /// Hands this piece's whole pages back to the OS when its region stays mapped for other
    /// pieces (those of a model loaded after this one): the address space is kept until the
    /// region's last piece goes, the memory is not.
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(region) = &self._region {
            if Arc::strong_count(region) > 1 {
                use crate::device::{advise_inside, page_size};
                // SAFETY: the piece's range of a region that stays mapped (this piece's own
                // `Arc` is dropped after this); only its whole pages go, and nothing reads them
                // again (pieces are never carved twice from the same bytes).
                unsafe {
                    advise_inside(
                        self.ptr.as_ptr().cast(),
                        self.cap * std::mem::size_of::<T>(),
                        page_size(),
                        libc::MADV_DONTNEED,
                    )
                };
            }
        }
    }
}

impl<T> std::ops::Deref for TileVec<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: the first `len` values were written by `push` (or `len` is 0 and the pointer
        // dangling but aligned).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    struct Block([u32; 16]);

    #[test]
    fn pieces_keep_their_values_and_do_not_overlap() {
        let sizes = [0usize, 1, 3, 1000, 40_000, 300_000];
        let mut vecs: Vec<TileVec<Block>> = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let mut v = TileVec::with_capacity(n).expect("memory");
            for j in 0..n {
                v.push(Block([(i * 1_000_000 + j) as u32; 16]));
            }
            vecs.push(v);
        }
        let mut ranges = Vec::new();
        for (i, v) in vecs.iter().enumerate() {
            assert_eq!(v.len(), sizes[i]);
            assert_eq!(v.as_ptr() as usize % ALIGN, 0);
            for (j, b) in v.iter().enumerate() {
                assert_eq!(b.0, [(i * 1_000_000 + j) as u32; 16]);
            }
            if !v.is_empty() {
                let r = v.as_ptr_range();
                ranges.push((r.start as usize, r.end as usize));
            }
        }
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "pieces overlap: {w:?}");
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_dropped_piece_gives_its_pages_back_while_its_region_lives_on() {
        // Pieces carved one after the other share a region, unless a parallel test's piece has
        // just started a new one: try again then.
        for _ in 0..10 {
            let keep = TileVec::<Block>::with_capacity(1).expect("memory");
            let mut gone = TileVec::<Block>::with_capacity(4096).expect("memory"); // 256 KiB
            let same = Arc::ptr_eq(
                keep._region.as_ref().expect("a region"),
                gone._region.as_ref().expect("a region"),
            );
            for i in 0..4096 {
                gone.push(Block([i; 16]));
            }
            let page = crate::device::page_size();
            let bytes = std::mem::size_of_val(&gone[..]);
            let (from, to) = crate::device::whole_units(gone.as_ptr().cast(), bytes, page)
                .expect("256 KiB hold whole pages");
            drop(gone);
            if !same {
                continue;
            }
            let mut resident = vec![0u8; (to - from) / page];
            // SAFETY: the range is inside `keep`'s region, still mapped; `resident` has a byte
            // per page.
            let rc = unsafe {
                libc::mincore(from as *mut libc::c_void, to - from, resident.as_mut_ptr())
            };
            assert_eq!(rc, 0);
            assert!(resident.iter().all(|&r| r & 1 == 0), "pages still resident");
            drop(keep);
            return;
        }
        panic!("no two pieces in the same region in ten tries");
    }

    #[test]
    fn a_large_piece_has_a_region_of_its_own_on_a_huge_page_boundary() {
        let n = REGION_BYTES / 64; // a whole region's bytes: more than half of one
        let mut v = TileVec::<Block>::with_capacity(n).expect("memory");
        v.push(Block([7; 16]));
        assert_eq!(v.as_ptr() as usize % HUGE, 0);
        assert_eq!(v[0].0, [7; 16]);
    }

    #[test]
    #[should_panic(expected = "past its capacity")]
    fn pushing_past_the_capacity_is_a_bug() {
        let mut v = TileVec::with_capacity(1).expect("memory");
        v.push(Block([0; 16]));
        v.push(Block([1; 16]));
    }

    #[test]
    fn a_region_of_its_own_is_unmapped_with_its_piece() {
        let big = TileVec::<Block>::with_capacity(REGION_BYTES / 64).expect("memory");
        let weak = Arc::downgrade(big._region.as_ref().expect("a region"));
        drop(big);
        assert!(weak.upgrade().is_none());
    }
}
