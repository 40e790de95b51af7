//! The runtime's errors: what a plugin did wrong on one change ([`PluginError`], which decides
//! the dead letter's reason and the breaker), and why a plugin did not load ([`LoadError`]) or
//! the engine did not start ([`EngineError`]).
//!
//! `wasmtime::Error` does not implement `std::error::Error`, so the variants that hold one
//! print it, with its causes, in their own message.

use crate::message::DecodeError;
use std::path::PathBuf;

/// Why a plugin could not handle a change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    /// The plugin returned an error for the change: its verdict, dead-lettered as is.
    #[error("plugin rejected the change: {0}")]
    Rejected(String),
    /// The instance trapped (a panic, an unreachable, a failed host call).
    #[error("plugin trapped: {message}")]
    Trap {
        /// The trap code, when wasmtime gave one.
        code: Option<wasmtime::Trap>,
        /// The error and its causes, with the guest's backtrace.
        message: String,
    },
    /// The call ran past its CPU deadline.
    #[error("plugin exceeded its deadline of {deadline_ms} ms")]
    Timeout {
        /// The deadline that was exceeded.
        deadline_ms: u64,
    },
    /// The instance grew past its memory cap.
    #[error("plugin exceeded its memory cap: {0}")]
    Memory(MemoryCapExceeded),
    /// Not attempted: the plugin failed on several changes in a row just before (it is paused).
    #[error("not attempted: the plugin is failing on every change")]
    Unattempted,
    /// Not attempted: the engine's instance pool is full (`[plugins] instances`), a condition of
    /// the host, not of the change or the plugin. The batch waits and is called again.
    #[error("not attempted: {0}")]
    PoolFull(String),
    /// The plugin broke the contract or its manifest's limits.
    #[error("plugin misbehaved: {0}")]
    Misbehaved(Misbehavior),
}

impl PluginError {
    /// Whether the instance failed (trap, timeout, memory) rather than the plugin answering.
    pub fn is_instance_failure(&self) -> bool {
        matches!(
            self,
            PluginError::Trap { .. } | PluginError::Timeout { .. } | PluginError::Memory(_)
        )
    }
}

/// A memory growth past the cap, as the limiter refuses it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("memory cap exceeded: the plugin asked for {asked_mib} MiB, its limit is {cap_mib} MiB")]
pub struct MemoryCapExceeded {
    /// The size asked for, rounded up to MiB.
    pub asked_mib: usize,
    /// The cap in MiB.
    pub cap_mib: usize,
}

/// How a plugin broke the contract or its manifest's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Misbehavior {
    /// A batch call returned another number of results than changes.
    #[error("returned {got} results for a batch of {expected} changes")]
    ResultCount {
        /// Changes in the batch.
        expected: usize,
        /// Results returned.
        got: usize,
    },
    /// A call on one change returned no result.
    #[error("no result for the change")]
    NoResult,
    /// More operations for one change than `limits.max_ops_per_change`.
    #[error("returned {count} operations for one change, the limit is {limit}")]
    TooManyOps {
        /// Operations returned.
        count: usize,
        /// The manifest's limit.
        limit: usize,
    },
    /// An operation the manifest's `ops` list does not name.
    #[error("returned a {op} operation, which its manifest's ops {declared:?} do not name")]
    UndeclaredOp {
        /// The operation's name (`hash-set`, …).
        op: &'static str,
        /// The operations the manifest names.
        declared: Vec<&'static str>,
    },
    /// A key outside the manifest's `key_prefixes`.
    #[error("{op} on key {key:?} is outside the plugin's key prefixes {prefixes:?}")]
    OutsidePrefixes {
        /// The operation's command name.
        op: &'static str,
        /// The key it names.
        key: String,
        /// The prefixes the manifest allows.
        prefixes: Vec<String>,
    },
    /// A key of keepwarm's own: the version prefix or the dead-letter stream.
    #[error("{op} on key {key:?} touches keepwarm's own keys")]
    ReservedKey {
        /// The operation's command name.
        op: &'static str,
        /// The key it names.
        key: String,
    },
    /// An operation carrying more than `limits.max_value_bytes`.
    #[error("{op} on key {key:?} carries {bytes} bytes, the limit is {limit}")]
    TooLarge {
        /// The operation's command name.
        op: &'static str,
        /// The key it names.
        key: String,
        /// Payload bytes carried.
        bytes: usize,
        /// The manifest's limit.
        limit: usize,
    },
    /// A sorted-set score that is not a number.
    #[error("ZADD on key {key:?} has a NaN score")]
    NanScore {
        /// The sorted set.
        key: String,
    },
    /// A time to live of zero (Redis refuses it).
    #[error("{op} on key {key:?} has a zero TTL")]
    ZeroTtl {
        /// The operation's command name.
        op: &'static str,
        /// The key it names.
        key: String,
    },
}

/// Why a plugin did not load. A plugin that fails any step never serves.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The plugin directory cannot be listed.
    #[error("cannot read plugin directory {}: {error}", dir.display())]
    ListDir {
        /// The plugin directory.
        dir: PathBuf,
        /// The file system's error.
        error: std::io::Error,
    },
    /// A plugin file cannot be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The component or the manifest.
        path: PathBuf,
        /// The file system's error.
        error: std::io::Error,
    },
    /// The manifest is not valid.
    #[error("invalid manifest {}: {reason}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The manifest names an operation the cache cannot apply (in `ops` or a self-test).
    #[error("the manifest uses the operation {op}, which {cache} cannot apply")]
    Unsupported {
        /// The operation's name (`hash-set`, …).
        op: &'static str,
        /// The cache (`memcached`).
        cache: &'static str,
    },
    /// The file does not start with the WebAssembly magic number.
    #[error("not a WebAssembly file (bad magic number)")]
    NotWasm,
    /// The component does not compile.
    #[error("compile failed: {0:#}")]
    Compile(wasmtime::Error),
    /// The component imports something keepwarm does not provide.
    #[error("the component needs imports keepwarm does not provide: {0:#}")]
    Imports(wasmtime::Error),
    /// The component does not export this contract's `transform`.
    #[error(
        "the component does not implement the keepwarm:plugin/transform contract (0.2.0, or 0.1.0 before it): {0:#}"
    )]
    Contract(wasmtime::Error),
    /// Instantiating it trapped, or ran out of time or memory.
    #[error(transparent)]
    Instantiate(PluginError),
    /// A self-test of its manifest failed.
    #[error(transparent)]
    SelfTest(#[from] SelfTestError),
    /// Loading the named plugin failed (at start-up, where one failure fails all).
    #[error("plugin {name} failed to load: {error}")]
    Plugin {
        /// The plugin's name.
        name: String,
        /// The step that failed.
        error: Box<LoadError>,
    },
}

/// A manifest `[[test]]` case that failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    /// The case's input does not decode.
    #[error("self-test {name}: input is not a change message: {error}")]
    Input {
        /// The case's name (or `#n`).
        name: String,
        /// Why the input does not decode.
        error: DecodeError,
    },
    /// The plugin answered other operations than expected.
    #[error("self-test {name} failed: expected {expected}, got {got}")]
    Ops {
        /// The case's name.
        name: String,
        /// The expected operations (JSON).
        expected: serde_json::Value,
        /// The operations returned (JSON).
        got: serde_json::Value,
    },
    /// The plugin did not reject the change with the expected error.
    #[error("self-test {name} failed: expected an error containing {expected:?}, got {got}")]
    NotRejected {
        /// The case's name.
        name: String,
        /// The text the error should contain.
        expected: String,
        /// What came instead.
        got: String,
    },
    /// The call failed otherwise than expected.
    #[error("self-test {name} failed: {error}")]
    Failed {
        /// The case's name.
        name: String,
        /// The plugin's error.
        error: PluginError,
    },
}

impl LoadError {
    /// Whether the load failed only because the engine's instance pool was full: a condition of
    /// the host, not of the plugin, so the version is tried again rather than remembered as
    /// failed.
    pub fn is_pool_full(&self) -> bool {
        match self {
            LoadError::Instantiate(PluginError::PoolFull(_))
            | LoadError::SelfTest(SelfTestError::Failed {
                error: PluginError::PoolFull(_),
                ..
            }) => true,
            LoadError::Plugin { error, .. } => error.is_pool_full(),
            _ => false,
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Wasmtime refused the configuration or the linker definitions.
    #[error("cannot create the wasmtime engine: {0:#}")]
    Wasmtime(wasmtime::Error),
    /// The epoch ticker thread could not be started.
    #[error("cannot start the epoch ticker thread: {0}")]
    EpochThread(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> PluginError {
        PluginError::PoolFull("no room".to_owned())
    }

    #[test]
    fn only_a_full_pool_is_a_load_failure_tried_again() {
        let in_self_test = LoadError::SelfTest(SelfTestError::Failed {
            name: "case".to_owned(),
            error: full(),
        });
        let named = LoadError::Plugin {
            name: "p".to_owned(),
            error: Box::new(LoadError::Instantiate(full())),
        };
        for error in [LoadError::Instantiate(full()), in_self_test, named] {
            assert!(error.is_pool_full(), "{error}");
        }
        let broken = [
            LoadError::NotWasm,
            LoadError::Instantiate(PluginError::Unattempted),
            LoadError::Plugin {
                name: "p".to_owned(),
                error: Box::new(LoadError::NotWasm),
            },
        ];
        for error in broken {
            assert!(!error.is_pool_full(), "{error}");
        }
    }
}
