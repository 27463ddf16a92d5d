//! Process-level settings for programs that run nodes (not engine- or transport-specific).

use std::time::Duration;

/// How often the trimmer started by [`trim_heap_with`] looks at the allocator.
const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Free heap (bytes) above which the trimmer hands pages back.
const TRIM_ABOVE: usize = 64 << 20;

/// Free bytes an arena keeps at its top on a free (glibc's `M_TRIM_THRESHOLD`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEEP_AT_TOP: libc::c_int = 16 << 20;

/// How the trimmer started by [`trim_heap_with`] reads and releases the free memory of the
/// program's allocator.
#[derive(Debug, Clone, Copy)]
pub struct HeapTrim {
    /// Free memory the allocator holds (bytes). It may still count pages already handed back
    /// (glibc's figure does): the trimmer then trims again only once it moved.
    pub free_bytes: fn() -> usize,
    /// Hands the allocator's free pages back to the operating system.
    pub release: fn(),
}

/// glibc's allocator: [`free_heap_bytes`] and `malloc_trim`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const GLIBC: HeapTrim = HeapTrim {
    free_bytes: free_heap_bytes,
    release: || {
        // SAFETY: malloc_trim only returns free pages to the system.
        unsafe { libc::malloc_trim(0) };
    },
};

/// Lets freed snapshot-sized buffers go back to the operating system under glibc's allocator.
/// Call once, early in `main`, in a process that runs nodes on the system allocator; it does
/// nothing where it does not apply, and calling it again does nothing more. (A program with
/// another global allocator calls [`trim_heap_with`] with that allocator's functions instead;
/// the kvstore example does, for jemalloc.)
///
/// A node builds and drops buffers the size of its state (snapshots taken, received, encoded)
/// over and over. glibc's allocator serves large blocks from their own mappings and returns them
/// on free, but raises that threshold to the size of every such block freed: after the first
/// snapshot, the next ones come from the heap arenas, and their pages stay resident. Fixing the
/// threshold at 1 MiB keeps every snapshot-sized buffer in its own mapping. Measured with the
/// bench (`--processes`, 64 clients, about 1 M puts): peak RSS per node 182-200 MiB without,
/// 117-142 MiB with.
///
/// Blocks under the threshold (log entries, replication batches, snapshot chunks) come from the
/// arenas, and glibc keeps freed arena pages resident: after a burst of writes (filling a large
/// state) hundreds of MiB of free heap stay in RSS. So this also starts the trimmer of
/// [`trim_heap_with`] with `malloc_trim`. Measured with the large-state bench (1 GiB filled in
/// 64 KiB values): the leader's RSS at the snapshot transfer 1525 MiB without, about 1130 MiB
/// with.
///
/// Not called by the library itself: the allocator is the program's choice.
pub fn release_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            const THRESHOLD: libc::c_int = 1 << 20;
            // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
            let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
            if ok != 1 {
                tracing::debug!("mallopt(M_MMAP_THRESHOLD) was refused");
            }
            // Fixing the mapping threshold also fixes the trim threshold at its 128 KiB
            // default: every free that leaves more than that at the top of an arena hands the
            // pages back, and the next snapshot chunk faults them in again (in the large-state
            // bench, zeroing fresh pages was most of the sender's page faults). The trimmer
            // returns what stays free.
            // SAFETY: as above.
            let ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_AT_TOP) };
            if ok != 1 {
                tracing::debug!("mallopt(M_TRIM_THRESHOLD) was refused");
            }
            trim_heap_with(GLIBC);
        });
    }
}

/// Starts one thread that, every 2 s, hands the allocator's free pages back (`trim.release`)
/// when it holds more than 64 MiB free (`trim.free_bytes`): after a burst (filling a large
/// state, a snapshot built or received) the free memory leaves RSS within seconds, while under
/// small-value load nothing is released and reused at once. Only the first call in a process
/// starts the thread; later calls do nothing.
pub fn trim_heap_with(trim: HeapTrim) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let started = std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(move || {
                // The free figure may still count pages already handed back (glibc's does),
                // so trim again only when it moved from what it read after the last release
                // (blocks reused and freed again) or a while has passed.
                let (mut at_last, mut last) = (0usize, std::time::Instant::now());
                loop {
                    std::thread::sleep(TRIM_EVERY);
                    let free = (trim.free_bytes)();
                    let moved = free.abs_diff(at_last) > TRIM_ABOVE / 4;
                    if free > TRIM_ABOVE && (moved || last.elapsed() > TRIM_EVERY * 15) {
                        let started = std::time::Instant::now();
                        (trim.release)();
                        (at_last, last) = ((trim.free_bytes)(), std::time::Instant::now());
                        // A purge holds the allocator's arenas: threads that allocate wait
                        // for it (160-250 ms for 1 GiB freed, in the large-state bench).
                        tracing::debug!(
                            free_mib = free >> 20,
                            left_mib = at_last >> 20,
                            took_ms = started.elapsed().as_millis() as u64,
                            "heap trimmed"
                        );
                    }
                }
            });
        if let Err(e) = started {
            tracing::warn!("the heap trimmer thread could not start: {e}");
        }
    });
}

/// Free memory glibc's allocator holds in its arenas (`mallinfo2().fordblks`), in bytes; 0 where
/// that does not apply (another global allocator, another C library). After a trim the figure
/// still counts the pages handed back.
pub fn free_heap_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        info.fordblks
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

/// How much lower than the engine's threads background work runs (Linux `nice` steps).
const BACKGROUND_NICE: libc::c_int = 10;

/// Runs `f` on a new thread named `name` at a lower CPU priority (nice +10 on Linux, where a
/// thread's niceness is its own), for long background work such as writing a snapshot of a
/// large state. On a busy machine it then yields the CPU to the engine's threads instead of
/// delaying heartbeats and acknowledgements past an election timeout. (Not measured on its
/// own: in the large-state bench the leadership losses it was tried against came from the log
/// rewrite holding the log's lock, fixed there.)
pub fn spawn_background<F>(name: &str, f: F) -> std::io::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            #[cfg(target_os = "linux")]
            {
                // SAFETY: gettid and setpriority only read the thread id and change this
                // thread's scheduling priority.
                let ok = unsafe {
                    let tid = libc::gettid();
                    libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE)
                };
                if ok != 0 {
                    tracing::debug!("could not lower the priority of a background thread");
                }
            }
            f()
        })
        .map(drop)
}
