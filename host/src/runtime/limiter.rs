//! Memory cap and high-water mark of one plugin instance.

use super::error::MemoryCapExceeded;

/// A `wasmtime::ResourceLimiter` that caps linear memory and remembers the largest size asked for,
/// so that a slowly leaking instance is recycled before it reaches the cap.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    cap: usize,
    peak: usize,
}

impl MemoryLimiter {
    /// A limiter allowing at most `cap` bytes per linear memory.
    pub(crate) fn new(cap: usize) -> MemoryLimiter {
        MemoryLimiter { cap, peak: 0 }
    }

    /// The largest memory size this instance has grown to, in bytes.
    pub(crate) fn peak(&self) -> usize {
        self.peak
    }

    /// The cap, in bytes.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            // Typed, so that the runtime finds it again in the trap it causes.
            return Err(wasmtime::Error::new(MemoryCapExceeded {
                asked_mib: desired.div_ceil(1 << 20),
                cap_mib: self.cap >> 20,
            }));
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > 1_000_000 {
            wasmtime::bail!("table limit exceeded: the plugin asked for {desired} elements");
        }
        Ok(true)
    }
}
