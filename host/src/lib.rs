//! keepwarm: keeps Redis caches in sync with Postgres change streams through WebAssembly plugins.
//!
//! # Layout
//!
//! - [`admin`]: the admin endpoint (plugin status, health) and `keepwarm plugins`.
//! - [`backoff`]: the one capped exponential backoff (sources and lanes).
//! - [`config`]: the daemon's TOML configuration, parsed strictly.
//! - [`daemon`]: wiring for `keepwarm run` and `keepwarm replay`.
//! - [`delivery`]: what sources hand to the pipeline and how it settles them (a leaf both use).
//! - [`inspect`]: `keepwarm version`, the stored versions of a cache key.
//! - [`letter_file`]: the dead-letter file of a Memcached cache without Redis (format, locking;
//!   a leaf the applier and the `dead_letters` source use).
//! - [`message`]: `ChangeMessage`, the one domain type every wire format decodes into.
//! - [`manifest`]: a plugin's manifest (subscriptions, limits, `[config]`, self-tests).
//! - [`runtime`]: wasmtime engine, plugin loading, warm instances, batch calls.
//! - [`ops`]: `Op`, the cache operations plugins return.
//! - [`applier`]: the only module that writes to the cache, Redis or Memcached (operations and dead letters).
//! - [`pipeline`]: lanes by row, batching, plugin calls, apply, then ack.
//! - [`plugin_test`]: `keepwarm test`, a plugin run without Redis.
//! - [`scaffold`]: `keepwarm new`, a plugin project in Rust, JavaScript or Python.
//! - [`sources`]: where messages come from (one folder per kind) and how they are acked.
//! - [`telemetry`]: logging setup (text or JSON), counters and the Prometheus metrics.
//! - [`valid`]: configuration values checked when parsed (ranges, non-empty texts).

#![deny(unsafe_code)]

pub mod admin;
pub mod applier;
pub mod backoff;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod inspect;
pub mod letter_file;
pub mod manifest;
pub mod message;
pub mod ops;
pub mod pipeline;
pub mod plugin_test;
pub mod runtime;
pub mod scaffold;
pub mod sources;
pub mod telemetry;
pub mod valid;
