//! Process-level settings for programs that run nodes (not engine- or transport-specific).

/// Lets freed snapshot-sized buffers go back to the operating system. Call once, early in
/// `main`, in a process that runs nodes; it does nothing where it does not apply.
///
/// A node builds and drops buffers the size of its state (snapshots taken, received, encoded)
/// over and over. glibc's allocator serves large blocks from their own mappings and returns them
/// on free, but raises that threshold to the size of every such block freed: after the first
/// snapshot, the next ones come from the heap arenas, and their pages stay resident. Fixing the
/// threshold at 1 MiB keeps every snapshot-sized buffer in its own mapping. Measured with the
/// bench (`--processes`, 64 clients, about 1 M puts): peak RSS per node 182-200 MiB without,
/// 117-142 MiB with.
///
/// Not called by the library itself: the allocator is the program's choice.
pub fn release_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const THRESHOLD: libc::c_int = 1 << 20;
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) was refused");
        }
    }
}
