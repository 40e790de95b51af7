//! The `keepwarm` binary's allocator: mimalloc, and how soon it hands freed memory back.
//!
//! The per-message path allocates and frees many small buffers on several threads (stream
//! replies, decoded messages, plugin results, Redis commands); glibc's allocator spent about a
//! fifth of keepwarm's CPU there (docs/bench.md, "Profile findings"). mimalloc is built
//! `no_thp`: asking for transparent huge pages made every partly used 2 MiB of its arena
//! resident (peak RSS about 120 MiB instead of 60 with the same live data).
//!
//! mimalloc 3 keeps freed pages resident for a second before it purges them; a backlog's
//! bursts of decoded messages then stay in the peak RSS long after they are gone. Purging after
//! [`PURGE_DELAY_MS`] took the bench's peak RSS from 64–70 MiB to 50–53 with no CPU cost
//! beyond the noise (docs/bench.md, "Round 4"); purging at once cost about a tenth more CPU
//! (`madvise` calls). `MIMALLOC_PURGE_DELAY` in the environment still decides when it is set.

use std::ffi::{c_int, c_long};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long freed memory stays resident, in milliseconds.
const PURGE_DELAY_MS: c_long = 30;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (`include/mimalloc.h` of the
/// `libmimalloc-sys` the lock file pins); the test checks that it still names the purge delay.
const OPTION_PURGE_DELAY: c_int = 15;

unsafe extern "C" {
    // Both are in the mimalloc that `libmimalloc-sys` builds and links for the global allocator.
    #[cfg(test)]
    fn mi_option_get(option: c_int) -> c_long;
    fn mi_option_set(option: c_int, value: c_long);
}

/// Sets the purge delay unless the environment chose one. Called first thing in `main`.
pub(crate) fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        set_purge_delay(PURGE_DELAY_MS);
    }
}

fn set_purge_delay(ms: c_long) {
    // SAFETY: mimalloc's options are plain integers, set and read atomically; any value is
    // valid for the purge delay (0 purges at once, -1 never).
    unsafe { mi_option_set(OPTION_PURGE_DELAY, ms) }
}

#[cfg(test)]
fn purge_delay() -> c_long {
    // SAFETY: reading an option has no precondition.
    unsafe { mi_option_get(OPTION_PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_tuned_is_mimallocs_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // mimalloc 3's default purge delay is 1000 ms, which no neighbouring option shares: a
        // renumbered enum shows here before the wrong option is tuned.
        assert_eq!(purge_delay(), 1000);
        tune();
        assert_eq!(purge_delay(), PURGE_DELAY_MS);
    }
}
