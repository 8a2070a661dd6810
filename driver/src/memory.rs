//! The daemon's use of the C allocator (glibc malloc): how many arenas it may create and
//! when it hands freed memory back to the kernel. Rust's default global allocator is the
//! system's `malloc`, so these settings decide the daemon's resident set after a big policy
//! apply (see `docs/benchmarks.md`, "Daemon RSS").
//!
//! Without them glibc gives each thread that allocates its own arena (up to 8 per core:
//! tokio's workers, blocking threads, the store's committer) and keeps the freed pages of a
//! transient peak (parsing a 2 MiB document, resolving 100k rules) mapped in every arena
//! that served it. On other C libraries both calls do nothing.

/// Arenas the daemon lets glibc create: only the main one, shared by all threads. The daemon
/// serialises its real work behind one lock, so more arenas buy no speed, only retained
/// memory (a second arena held 8 MiB of a 100k-entry policy's peaks that trimming could not
/// return).
pub const MALLOC_ARENAS: i32 = 1;

/// Allocations from this size up that the heap cannot serve from free memory get their own
/// mapping, returned to the kernel when freed. glibc's default (128 KiB) is the same, but it
/// is *dynamic*: freeing such a mapping raises the threshold (up to 32 MiB), after which a
/// policy apply's large vectors grow the heap instead. Setting it keeps it fixed.
pub const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`] and fixes the mmap threshold at
/// [`MMAP_THRESHOLD`]. Call once at start, before threads exist (arenas already created are
/// not removed). Returns whether the settings were accepted.
pub fn limit_malloc_arenas() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes allocator tuning parameters; M_ARENA_MAX and
        // M_MMAP_THRESHOLD with positive values are documented (mallopt(3)) and take no
        // pointers.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

/// Returns the free pages of every arena (not just the top of the main heap) to the kernel.
/// Cheap next to what it follows: call it after a large transient allocation, such as a
/// policy apply. Returns whether any memory was released.
pub fn release_free_memory() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim(3) takes no pointers and is safe to call from any thread at any
        // time; it only releases memory malloc holds free.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}
