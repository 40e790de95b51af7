//! The on-disk cache of compiled components, so that a restart or re-adding a known plugin
//! skips compilation.
//!
//! An entry is keyed by the SHA-256 of the component's bytes and by wasmtime's compatibility
//! hash of the engine (its version and configuration), so an entry is only ever loaded into an
//! engine that could have produced it. Entries are written to a temporary name and renamed, so a
//! crash never leaves a half-written entry under a real name. A cache that cannot be written
//! (read-only directory) only costs speed.

use sha2::{Digest as _, Sha256};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use wasmtime::Engine;
use wasmtime::component::Component;

/// Whether a component was compiled now or taken from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    /// Compiled from the WebAssembly bytes.
    Cold,
    /// Loaded from the artifact cache.
    Cached,
}

impl Compiled {
    /// `"cold"` or `"cached"`, for logs and `keepwarm plugins`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compiled::Cold => "cold",
            Compiled::Cached => "cached",
        }
    }
}

/// The artifact cache of one engine.
pub(crate) struct ArtifactCache {
    dir: Option<PathBuf>,
    engine_tag: String,
}

/// Feeds `Hash` output into SHA-256, for a hash that is stable across processes.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl ArtifactCache {
    /// A cache in `dir` (none: always compile).
    pub(crate) fn new(dir: Option<PathBuf>, engine: &Engine) -> ArtifactCache {
        let mut hasher = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        ArtifactCache {
            dir,
            engine_tag: hex::encode(&hasher.0.finalize()[..8]),
        }
    }

    /// The compiled component for `wasm`, from the cache when possible.
    ///
    /// # Errors
    ///
    /// The bytes do not compile.
    pub(crate) fn component(
        &self,
        engine: &Engine,
        wasm: &[u8],
    ) -> wasmtime::Result<(Component, Compiled)> {
        let Some(dir) = &self.dir else {
            return Ok((Component::new(engine, wasm)?, Compiled::Cold));
        };
        let path = dir.join(format!(
            "{}-{}.cwasm",
            hex::encode(Sha256::digest(wasm)),
            self.engine_tag
        ));
        if path.is_file() {
            match deserialize(engine, &path) {
                Ok(component) => return Ok((component, Compiled::Cached)),
                Err(error) => {
                    tracing::warn!(path = %path.display(), error = %error, "unusable cache entry; compiling again");
                }
            }
        }
        let component = Component::new(engine, wasm)?;
        if let Err(error) = component
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|artifact| write_atomically(&path, &artifact))
        {
            tracing::warn!(dir = %dir.display(), error = %error, "cannot write the artifact cache");
        }
        Ok((component, Compiled::Cold))
    }
}

#[expect(
    unsafe_code,
    reason = "deserializing native code: the entry was serialized by this cache for this exact engine \
              (its name carries the engine's compatibility hash), and wasmtime checks its header"
)]
fn deserialize(engine: &Engine, path: &std::path::Path) -> wasmtime::Result<Component> {
    // SAFETY: the file is one this cache wrote with `Component::serialize` for an engine
    // with the same compatibility hash; the cache directory belongs to keepwarm.
    unsafe { Component::deserialize_file(engine, path) }
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
