//! The allocator of a plugin built with this crate (feature `arena`, on by default).
//!
//! A plugin call allocates many small blocks and frees nearly all of them before it returns:
//! the host copies each text of each change into a block of its own (through the component's
//! `cabi_realloc`), the plugin builds keys and operations, the generated bindings free the
//! changes as they are handled and the answer once the host has read it. With wasi-libc's
//! `dlmalloc` those allocations and frees were most of row-cache's time inside WebAssembly
//! (docs/bench.md, "Round 18").
//!
//! [`Arena`] cuts small blocks from 64 KiB chunks, one after the other, and counts the blocks
//! still live in each chunk. When the chunk being cut from empties, cutting starts again from
//! its beginning: a call's blocks reuse the previous call's memory, still in the cache. A chunk
//! left behind with live blocks is released when its last block is freed. Large or
//! over-aligned blocks come from the system allocator (wasi-libc's `malloc`).
//!
//! # Two allocators in one instance
//!
//! wasi-libc keeps using its own `malloc` and `free`, and some of the blocks it frees were
//! allocated by the host through `cabi_realloc` (the results of WASI imports such as the
//! environment). So [`cabi_realloc`] hands out arena blocks only in the window where nothing
//! but the host's lowering of a `handle-batch` call can reach it: from the end of one
//! `handle-batch` to the start of the next ([`open_lowering_window`], [`close_lowering_window`],
//! which [`export_plugin!`](crate::export_plugin) calls). Outside that window it allocates as
//! wasi-libc's own `cabi_realloc` would. The arena frees a block only if it lies in one of its
//! chunks and gives every other block to the system allocator, so Rust code may free either kind.
//!
//! A plugin that keeps small blocks across calls (a cache in its state) pins the chunks they
//! sit in. Past [`PINNED_LIMIT`] such chunks (4 MiB), the arena stops cutting: from then on
//! small blocks come from the system allocator too, and the arena's chunks are released as
//! they empty. Its memory overhead is bounded by that limit.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// A chunk's size and alignment: the base of a block's chunk is the block's address rounded
/// down to it.
const CHUNK: usize = 64 * 1024;
/// The chunk's header: the count of its live blocks. A multiple of [`MAX_ALIGN`].
const HEADER: usize = 16;
/// Blocks larger than this come from the system allocator.
const SMALL: usize = 4 * 1024;
/// Blocks aligned more than this come from the system allocator.
const MAX_ALIGN: usize = 16;
/// Empty chunks kept for reuse rather than returned.
const SPARES: usize = 4;
/// Chunks left behind with live blocks (4 MiB) beyond which the arena stops cutting.
pub(crate) const PINNED_LIMIT: usize = 64;

/// A chunked bump allocator with a live count per chunk. See the [module](self) documentation.
pub struct Arena {
    /// The chunk blocks are cut from (0 before the first and once spilled).
    current: Cell<usize>,
    /// The offset of the first free byte in `current`.
    top: Cell<usize>,
    /// Every chunk not spare: `current` and the ones left behind with live blocks.
    chunks: [Cell<usize>; PINNED_LIMIT + 1],
    /// How many of `chunks` are set.
    count: Cell<usize>,
    /// Empty chunks kept for reuse.
    spares: [Cell<usize>; SPARES],
    /// How many of `spares` are set.
    spare_count: Cell<usize>,
    /// Set once more than [`PINNED_LIMIT`] chunks were left behind with live blocks: small
    /// blocks come from the system allocator from then on.
    spilled: Cell<bool>,
}

// SAFETY: a component's instance runs on one thread (the global instance is only compiled for
// wasm32 without the `atomics` feature, see `lib.rs`); tests use their own, on one thread.
unsafe impl Sync for Arena {}

impl Default for Arena {
    fn default() -> Arena {
        Arena::new()
    }
}

impl Arena {
    /// An arena with no chunk yet.
    pub const fn new() -> Arena {
        Arena {
            current: Cell::new(0),
            top: Cell::new(0),
            chunks: [const { Cell::new(0) }; PINNED_LIMIT + 1],
            count: Cell::new(0),
            spares: [const { Cell::new(0) }; SPARES],
            spare_count: Cell::new(0),
            spilled: Cell::new(false),
        }
    }

    /// Whether blocks of `layout` are cut from chunks (unless spilled).
    fn is_small(layout: Layout) -> bool {
        layout.size() <= SMALL && layout.align() <= MAX_ALIGN
    }

    fn chunk_layout() -> Layout {
        // CHUNK is a power of two and a multiple of itself.
        Layout::from_size_align(CHUNK, CHUNK).unwrap_or_else(|_| unreachable!())
    }

    /// The live count in the header of the chunk at `base`.
    ///
    /// # Safety
    ///
    /// `base` is a chunk of this arena.
    unsafe fn live(base: usize) -> *mut usize {
        base as *mut usize
    }

    /// Whether `base` is one of this arena's chunks (not counting spares).
    fn owns(&self, base: usize) -> bool {
        base == self.current.get()
            || self.chunks[..self.count.get()]
                .iter()
                .any(|chunk| chunk.get() == base)
    }

    /// A chunk to cut from: a spare, or a new one; 0 when memory is exhausted.
    fn acquire(&self) -> usize {
        let base = match self.spare_count.get() {
            0 => {
                // SAFETY: the layout has a non-zero size.
                unsafe { System.alloc(Arena::chunk_layout()) as usize }
            }
            n => {
                self.spare_count.set(n - 1);
                self.spares[n - 1].get()
            }
        };
        if base != 0 {
            // SAFETY: a chunk of CHUNK bytes, aligned to CHUNK, that nothing else uses.
            unsafe { *Arena::live(base) = 0 };
            let n = self.count.get();
            self.chunks[n].set(base);
            self.count.set(n + 1);
        }
        base
    }

    /// Gives back an empty chunk that is not `current`.
    fn release(&self, base: usize) {
        let n = self.count.get();
        if let Some(at) = self.chunks[..n]
            .iter()
            .position(|chunk| chunk.get() == base)
        {
            self.chunks[at].set(self.chunks[n - 1].get());
            self.count.set(n - 1);
        }
        let spares = self.spare_count.get();
        if !self.spilled.get() && spares < SPARES {
            self.spares[spares].set(base);
            self.spare_count.set(spares + 1);
        } else {
            // SAFETY: allocated by `acquire` with this layout, and now empty.
            unsafe { System.dealloc(base as *mut u8, Arena::chunk_layout()) };
        }
    }

    /// Cuts a small block, moving to a new chunk when `current` is full.
    ///
    /// # Safety
    ///
    /// `layout` is small and of non-zero size; not spilled.
    unsafe fn cut(&self, layout: Layout) -> *mut u8 {
        let mut base = self.current.get();
        if base != 0 {
            let start = self.top.get().next_multiple_of(layout.align());
            if start + layout.size() <= CHUNK {
                return unsafe { self.take(base, start, layout.size()) };
            }
            // Left behind with live blocks: a chunk whose blocks were all freed was rewound.
            if self.count.get() > PINNED_LIMIT {
                self.spill();
                return unsafe { System.alloc(layout) };
            }
        }
        base = self.acquire();
        if base == 0 {
            return std::ptr::null_mut();
        }
        self.current.set(base);
        let start = HEADER.next_multiple_of(layout.align());
        unsafe { self.take(base, start, layout.size()) }
    }

    /// Stops cutting: small blocks come from the system allocator from now on, and chunks go
    /// back to it as they empty.
    fn spill(&self) {
        self.spilled.set(true);
        self.current.set(0);
        for spare in &self.spares[..self.spare_count.get()] {
            // SAFETY: allocated by `acquire` with this layout, and empty.
            unsafe { System.dealloc(spare.get() as *mut u8, Arena::chunk_layout()) };
        }
        self.spare_count.set(0);
    }

    /// Takes `size` bytes at `start` of the chunk at `base` (which is `current`).
    ///
    /// # Safety
    ///
    /// `base` is `current` and the block fits.
    unsafe fn take(&self, base: usize, start: usize, size: usize) -> *mut u8 {
        self.top.set(start + size);
        unsafe { *Arena::live(base) += 1 };
        (base + start) as *mut u8
    }

    /// Frees a block cut from the chunk at `base`.
    ///
    /// # Safety
    ///
    /// `base` is one of this arena's chunks and holds a live block being freed.
    unsafe fn free_in(&self, base: usize) {
        let live = unsafe { &mut *Arena::live(base) };
        *live -= 1;
        if *live == 0 {
            if base == self.current.get() {
                self.top.set(HEADER);
            } else {
                self.release(base);
            }
        }
    }
}

// SAFETY: small blocks are disjoint ranges of chunks this arena owns, aligned as asked (a
// chunk's base is aligned to CHUNK, which is a multiple of every small alignment); a chunk is
// released only once it holds no live block. The rest is the system allocator's.
unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Arena::is_small(layout) || self.spilled.get() {
            return unsafe { System.alloc(layout) };
        }
        unsafe { self.cut(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Arena::is_small(layout) || self.spilled.get() {
            return unsafe { System.alloc_zeroed(layout) };
        }
        let block = unsafe { self.cut(layout) };
        if !block.is_null() {
            unsafe { block.write_bytes(0, layout.size()) };
        }
        block
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !Arena::is_small(layout) {
            return unsafe { System.dealloc(ptr, layout) };
        }
        let base = ptr as usize & !(CHUNK - 1);
        // A small block may be the system allocator's: cut once spilled, or allocated by
        // wasi-libc (the host's texts outside the lowering window).
        if !self.owns(base) {
            return unsafe { System.dealloc(ptr, layout) };
        }
        unsafe { self.free_in(base) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, fits an isize.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let (old_small, new_small) = (Arena::is_small(layout), Arena::is_small(new_layout));
        if !old_small && !new_small {
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // The last block cut grows or shrinks in place while it fits its chunk.
        let base = self.current.get();
        if old_small
            && new_small
            && base != 0
            && ptr as usize + layout.size() == base + self.top.get()
        {
            let start = ptr as usize - base;
            if start + new_size <= CHUNK {
                self.top.set(start + new_size);
                return ptr;
            }
        }
        let block = unsafe { self.alloc(new_layout) };
        if !block.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, block, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        block
    }
}

/// Whether the host's lowering of the next `handle-batch` call may take arena blocks: from the
/// end of one call to the start of the next. See the [module](self) documentation. (An atomic
/// only so that native tests may share it: on wasm32 without threads it is a plain byte.)
#[cfg_attr(
    not(target_arch = "wasm32"),
    allow(dead_code, reason = "only the wasm32 `cabi_realloc` reads it")
)]
static LOWERING: AtomicBool = AtomicBool::new(false);

/// Called at the end of `handle-batch`: until the next call starts, only the host's lowering
/// of that call's changes allocates.
pub(crate) fn open_lowering_window() {
    LOWERING.store(true, Ordering::Relaxed);
}

/// Called at the start of `handle-batch`: from here on, WASI imports (whose results wasi-libc
/// frees with `free`) may allocate through `cabi_realloc`.
pub(crate) fn close_lowering_window() {
    LOWERING.store(false, Ordering::Relaxed);
}

/// What the component's `cabi_realloc` does: a new block from `arena` inside the lowering
/// window, from the system allocator outside it (as wasi-libc's `cabi_realloc` would), and a
/// block resized by whichever allocator owns it. Aborts when memory is exhausted, as
/// wasi-libc's does.
///
/// # Safety
///
/// As `cabi_realloc`: `old_ptr` is null or a live block of `old_len` bytes aligned to `align`,
/// and `align` is a power of two.
#[cfg_attr(
    not(target_arch = "wasm32"),
    allow(
        dead_code,
        reason = "only the wasm32 `cabi_realloc` and the tests call it"
    )
)]
pub(crate) unsafe fn host_realloc(
    arena: &Arena,
    window: bool,
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    // SAFETY (layouts): `align` is a power of two, and the host's sizes fit its memory.
    let block = if old_ptr.is_null() || old_len == 0 {
        if new_len == 0 {
            return align as *mut u8;
        }
        let layout = unsafe { Layout::from_size_align_unchecked(new_len, align) };
        if window {
            unsafe { arena.alloc(layout) }
        } else {
            unsafe { System.alloc(layout) }
        }
    } else {
        let old = unsafe { Layout::from_size_align_unchecked(old_len, align) };
        if new_len == 0 {
            unsafe { arena.dealloc(old_ptr, old) };
            return align as *mut u8;
        }
        unsafe { arena.realloc(old_ptr, old, new_len) }
    };
    if block.is_null() {
        std::process::abort();
    }
    block
}

/// The arena as the allocator of a plugin, and the component's `cabi_realloc`.
#[cfg(all(
    feature = "arena",
    target_arch = "wasm32",
    not(target_feature = "atomics")
))]
mod global {
    use super::{Arena, LOWERING, Ordering, host_realloc};

    #[global_allocator]
    static ALLOCATOR: Arena = Arena::new();

    /// The component's `cabi_realloc`, in place of wasi-libc's (a weak definition): see
    /// [`host_realloc`].
    ///
    /// # Safety
    ///
    /// Called by the host under the canonical ABI's rules.
    #[unsafe(no_mangle)]
    pub(super) unsafe extern "C" fn cabi_realloc(
        old_ptr: *mut u8,
        old_len: usize,
        align: usize,
        new_len: usize,
    ) -> *mut u8 {
        unsafe {
            host_realloc(
                &ALLOCATOR,
                LOWERING.load(Ordering::Relaxed),
                old_ptr,
                old_len,
                align,
                new_len,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    /// Allocates `size` bytes aligned to `align` and fills them with `fill`.
    fn block(arena: &Arena, size: usize, align: usize, fill: u8) -> *mut u8 {
        let ptr = unsafe { arena.alloc(layout(size, align)) };
        assert!(!ptr.is_null());
        assert_eq!(ptr as usize % align, 0, "aligned to {align}");
        unsafe { ptr.write_bytes(fill, size) };
        ptr
    }

    fn free(arena: &Arena, ptr: *mut u8, size: usize, align: usize) {
        unsafe { arena.dealloc(ptr, layout(size, align)) };
    }

    fn filled(ptr: *mut u8, size: usize, fill: u8) -> bool {
        unsafe { std::slice::from_raw_parts(ptr, size) }
            .iter()
            .all(|b| *b == fill)
    }

    #[test]
    fn blocks_are_aligned_disjoint_and_keep_their_contents() {
        let arena = Arena::new();
        let sizes = [1, 7, 16, 33, 100, 4096, 3, 1000];
        let aligns = [1, 2, 4, 8, 16];
        let blocks: Vec<_> = (0..2000)
            .map(|i| {
                let (size, align) = (sizes[i % sizes.len()], aligns[i % aligns.len()]);
                (block(&arena, size, align, i as u8), size, align, i as u8)
            })
            .collect();
        for &(ptr, size, _, fill) in &blocks {
            assert!(filled(ptr, size, fill), "a block was overwritten");
        }
        for (ptr, size, align, _) in blocks {
            free(&arena, ptr, size, align);
        }
        // Everything freed: only the current chunk and spares remain.
        assert_eq!(arena.count.get(), 1);
        assert!(arena.spare_count.get() <= SPARES);
    }

    #[test]
    fn an_emptied_chunk_is_cut_again_from_its_start() {
        let arena = Arena::new();
        let first = block(&arena, 100, 8, 1);
        let second = block(&arena, 100, 8, 2);
        free(&arena, first, 100, 8);
        free(&arena, second, 100, 8);
        // The same memory again: a call reuses the last call's blocks.
        assert_eq!(block(&arena, 100, 8, 3), first);
    }

    #[test]
    fn a_chunk_left_behind_is_released_with_its_last_block() {
        let arena = Arena::new();
        let kept = block(&arena, 100, 8, 1);
        // Fill the rest of the first chunk and move on to a second.
        let rest: Vec<_> = (0..20).map(|_| block(&arena, 4096, 8, 2)).collect();
        assert_eq!(arena.count.get(), 2);
        for ptr in rest {
            free(&arena, ptr, 4096, 8);
        }
        assert_eq!(arena.count.get(), 2, "the first chunk still holds `kept`");
        free(&arena, kept, 100, 8);
        assert_eq!(arena.count.get(), 1);
        assert_eq!(arena.spare_count.get(), 1, "kept for reuse");
    }

    #[test]
    fn large_and_over_aligned_blocks_come_from_the_system() {
        let arena = Arena::new();
        let large = block(&arena, SMALL + 1, 8, 1);
        let aligned = block(&arena, 64, 64, 2);
        assert_eq!(arena.count.get(), 0, "no chunk was cut");
        free(&arena, large, SMALL + 1, 8);
        free(&arena, aligned, 64, 64);
    }

    #[test]
    fn the_last_block_grows_and_shrinks_in_place() {
        let arena = Arena::new();
        let ptr = block(&arena, 10, 1, 7);
        let grown = unsafe { arena.realloc(ptr, layout(10, 1), 300) };
        assert_eq!(grown, ptr);
        assert!(filled(grown, 10, 7));
        let other = block(&arena, 10, 1, 8);
        // No longer the last: moved, with its contents.
        let moved = unsafe { arena.realloc(grown, layout(300, 1), 600) };
        assert_ne!(moved, grown);
        assert!(filled(moved, 10, 7));
        assert!(filled(other, 10, 8));
        // Across the size limit, both ways.
        let large = unsafe { arena.realloc(moved, layout(600, 1), SMALL * 2) };
        assert!(filled(large, 10, 7));
        let small = unsafe { arena.realloc(large, layout(SMALL * 2, 1), 20) };
        assert!(filled(small, 10, 7));
        free(&arena, small, 20, 1);
        free(&arena, other, 10, 1);
        assert_eq!(arena.count.get(), 1);
    }

    #[test]
    fn zeroed_blocks_are_zero_even_in_reused_memory() {
        let arena = Arena::new();
        let ptr = block(&arena, 64, 8, 0xff);
        free(&arena, ptr, 64, 8);
        let zeroed = unsafe { arena.alloc_zeroed(layout(64, 8)) };
        assert_eq!(zeroed, ptr);
        assert!(filled(zeroed, 64, 0));
    }

    #[test]
    fn blocks_kept_across_calls_spill_to_the_system_past_the_limit() {
        let arena = Arena::new();
        // A plugin that keeps one small block per "call" and frees the rest: each call pins a
        // chunk.
        let mut kept = Vec::new();
        for call in 0..PINNED_LIMIT + 10 {
            kept.push(block(&arena, 16, 8, call as u8));
            let transient: Vec<_> = (0..16).map(|_| block(&arena, 4096, 8, 0xee)).collect();
            for ptr in transient {
                free(&arena, ptr, 4096, 8);
            }
        }
        assert!(arena.spilled.get());
        assert!(arena.count.get() <= PINNED_LIMIT + 1);
        // Spilled: small blocks are the system's, and freeing either kind works.
        let system = block(&arena, 16, 8, 0xaa);
        assert!(!arena.owns(system as usize & !(CHUNK - 1)));
        for (call, &ptr) in kept.iter().enumerate() {
            assert!(filled(ptr, 16, call as u8), "a kept block was overwritten");
        }
        free(&arena, system, 16, 8);
        for ptr in kept {
            free(&arena, ptr, 16, 8);
        }
        assert_eq!(arena.count.get(), 0, "every chunk was released");
    }

    #[test]
    fn blocks_of_the_system_allocator_are_freed_to_it() {
        // What wasi-libc allocated (the host's texts outside the lowering window) and Rust
        // code frees through the arena.
        let arena = Arena::new();
        let ours = block(&arena, 64, 8, 1);
        let theirs = unsafe { System.alloc(layout(64, 8)) };
        assert!(!theirs.is_null());
        free(&arena, theirs, 64, 8);
        assert!(filled(ours, 64, 1), "the arena's block was not touched");
        assert_eq!(unsafe { *Arena::live(arena.current.get()) }, 1);
        // Resized through the arena: moved to the arena or left to the system, contents kept.
        let theirs = unsafe { System.alloc(layout(16, 1)) };
        unsafe { theirs.write_bytes(9, 16) };
        let grown = unsafe { arena.realloc(theirs, layout(16, 1), 32) };
        assert!(filled(grown, 16, 9));
        free(&arena, grown, 32, 1);
        free(&arena, ours, 64, 8);
        assert_eq!(arena.count.get(), 1);
    }

    #[test]
    fn the_host_gets_arena_blocks_only_inside_the_lowering_window() {
        let arena = Arena::new();
        let inside = unsafe { host_realloc(&arena, true, std::ptr::null_mut(), 0, 1, 40) };
        assert!(arena.owns(inside as usize & !(CHUNK - 1)));
        let outside = unsafe { host_realloc(&arena, false, std::ptr::null_mut(), 0, 4, 40) };
        assert!(!arena.owns(outside as usize & !(CHUNK - 1)));
        assert_eq!(outside as usize % 4, 0);
        // wasi-libc frees what it got outside the window with `free`: a system block.
        unsafe { System.dealloc(outside, layout(40, 4)) };
        // Zero-sized blocks are the alignment, as the canonical ABI allows.
        let empty = unsafe { host_realloc(&arena, true, std::ptr::null_mut(), 0, 8, 0) };
        assert_eq!(empty as usize, 8);
        // Resized by the arena that owns it, contents kept.
        unsafe { inside.write_bytes(5, 40) };
        let grown = unsafe { host_realloc(&arena, false, inside, 40, 1, 80) };
        assert!(filled(grown, 40, 5));
        assert!(arena.owns(grown as usize & !(CHUNK - 1)));
        let gone = unsafe { host_realloc(&arena, false, grown, 80, 1, 0) };
        assert_eq!(gone as usize, 1);
        assert_eq!(unsafe { *Arena::live(arena.current.get()) }, 0);
    }
}
