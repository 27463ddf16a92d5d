//! The allocator of the kvstore's programs: jemalloc (cargo feature `jemalloc`, on by default),
//! or the system allocator without it.
//!
//! The choice is the program's, not the consensus layer's: the library crates never set a global
//! allocator. The kvstore sets jemalloc here, for everything that links it, because in the bench
//! glibc's allocator was the largest item of the profile under small puts (malloc and free about
//! 14% of all CPU at 64 clients, most of it decoding commands and the store's apply), and jemalloc
//! took 4-22% more puts/s depending on the combination (64 clients, two runs of each build
//! alternated in the same hour; see the README's performance section).
//!
//! jemalloc keeps freed pages for a while (10 s of decay, purged by its background threads) so
//! that a busy node reuses them; after a burst the size of a large state (a fill, a snapshot
//! built or received) that would hold hundreds of MiB resident, so [`init`] also starts the
//! heap trimmer of [`consensus_api::process::trim_heap_with`], which purges every arena once
//! more than 64 MiB are free. Purging at once on every free instead (`dirty_decay_ms:0`) kept
//! the large-state bench's sender at its budget but halved the snapshot copy's speed.

/// The global allocator of everything linking this crate.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Sets up the allocator for a process that runs nodes: the heap trimmer for jemalloc, or
/// [`consensus_api::process::release_large_buffers`] for the system allocator. Call once, early.
pub fn init() {
    #[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
    consensus_api::process::trim_heap_with(consensus_api::process::HeapTrim {
        free_bytes,
        release: jemalloc::purge,
    });
    #[cfg(not(all(feature = "jemalloc", not(target_env = "msvc"))))]
    consensus_api::process::release_large_buffers();
}

/// Free memory the allocator holds, in bytes: jemalloc's dirty and muzzy pages of every arena
/// (resident, not yet purged), or glibc's free heap
/// ([`consensus_api::process::free_heap_bytes`]).
pub fn free_bytes() -> usize {
    #[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
    {
        jemalloc::free_bytes()
    }
    #[cfg(not(all(feature = "jemalloc", not(target_env = "msvc"))))]
    {
        consensus_api::process::free_heap_bytes()
    }
}

#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
mod jemalloc {
    use std::ffi::{c_void, CStr};
    use std::ptr;

    use tikv_jemalloc_sys::mallctl;

    /// Reads a `size_t` statistic; `None` if jemalloc refused.
    fn read(name: &CStr) -> Option<usize> {
        let mut value: usize = 0;
        let mut len = std::mem::size_of::<usize>();
        // SAFETY: `name` is NUL-terminated; `value` and `len` are valid for writes and `len`
        // is the size of `value`, which is what jemalloc writes for a size_t statistic.
        let rc = unsafe {
            mallctl(
                name.as_ptr(),
                (&raw mut value).cast::<c_void>(),
                &raw mut len,
                ptr::null_mut(),
                0,
            )
        };
        (rc == 0 && len == std::mem::size_of::<usize>()).then_some(value)
    }

    /// Dirty and muzzy pages of all arenas, in bytes (statistics refreshed first).
    pub(super) fn free_bytes() -> usize {
        let mut epoch: u64 = 1;
        // SAFETY: "epoch" takes a u64 written from `epoch`, valid for its size.
        let rc = unsafe {
            mallctl(
                c"epoch".as_ptr(),
                ptr::null_mut(),
                ptr::null_mut(),
                (&raw mut epoch).cast::<c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
        if rc != 0 {
            return 0;
        }
        let page = read(c"arenas.page").unwrap_or(4096);
        let dirty = read(c"stats.arenas.4096.pdirty").unwrap_or(0);
        let muzzy = read(c"stats.arenas.4096.pmuzzy").unwrap_or(0);
        (dirty + muzzy) * page
    }

    /// Purges every arena's unused pages (4096 is `MALLCTL_ARENAS_ALL`).
    pub(super) fn purge() {
        // SAFETY: "arena.<i>.purge" takes and returns nothing: every pointer is null.
        let rc = unsafe {
            mallctl(
                c"arena.4096.purge".as_ptr(),
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
                0,
            )
        };
        if rc != 0 {
            tracing::debug!("jemalloc refused to purge its arenas ({rc})");
        }
    }
}

#[cfg(all(test, feature = "jemalloc", not(target_env = "msvc")))]
mod tests {
    use std::ffi::c_void;
    use std::ptr;

    use super::*;

    /// The trimmer's two functions do what it relies on: freed blocks show as free memory,
    /// and a purge hands them back. (With the mallctl names wrong, `free_bytes` reads 0 and
    /// the first assertion fails.) jemalloc's background threads are stopped first, so that
    /// their own purging does not race the figures.
    #[test]
    fn freed_memory_is_counted_and_a_purge_hands_it_back() {
        let mut off = false;
        // SAFETY: "background_thread" takes a bool written from `off`, valid for its size.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"background_thread".as_ptr(),
                ptr::null_mut(),
                ptr::null_mut(),
                (&raw mut off).cast::<c_void>(),
                std::mem::size_of::<bool>(),
            )
        };
        assert_eq!(rc, 0, "stopping jemalloc's background threads");
        let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 1 << 20]).collect();
        let before = free_bytes();
        drop(blocks);
        let freed = free_bytes();
        assert!(
            freed >= before + (32 << 20),
            "64 MiB freed, free memory went from {before} to {freed} bytes"
        );
        jemalloc::purge();
        let purged = free_bytes();
        assert!(
            purged + (32 << 20) <= freed,
            "after a purge {purged} bytes are still free (before it {freed})"
        );
    }
}
