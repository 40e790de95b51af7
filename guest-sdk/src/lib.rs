//! Write keepwarm plugins in Rust.
//!
//! A keepwarm plugin is a WebAssembly component that turns Postgres changes (decoded from Sequin
//! change messages) into Redis cache operations. The contract is the WIT package
//! `keepwarm:plugin@0.2.0` in `wit/keepwarm.wit`; this crate wraps its generated bindings so that a
//! plugin is one type implementing [`Plugin`] and one call to [`export_plugin!`].
//!
//! # A complete plugin
//!
//! ```
//! use keepwarm_guest::{Change, Config, KeyTemplate, Op, Plugin, log, ops};
//! use serde::Deserialize;
//!
//! /// Keeps `user:<id>:email` in sync with the `users` table.
//! struct UserEmails {
//!     key: KeyTemplate,
//! }
//!
//! #[derive(Deserialize)]
//! struct Settings {
//!     #[serde(default = "default_key")]
//!     key: String,
//! }
//!
//! fn default_key() -> String {
//!     "user:{id}:email".to_owned()
//! }
//!
//! #[derive(Deserialize)]
//! struct User {
//!     email: Option<String>,
//! }
//!
//! impl Plugin for UserEmails {
//!     fn new(config: &Config) -> Result<Self, String> {
//!         let settings: Settings = config.parse()?;
//!         Ok(UserEmails { key: KeyTemplate::parse(&settings.key)? })
//!     }
//!
//!     fn handle(&self, change: &Change) -> Result<Vec<Op>, String> {
//!         let key = self.key.render(change)?;
//!         if change.action().is_delete() || change.has_unchanged_toast() {
//!             return Ok(vec![ops::del(key)]);
//!         }
//!         match change.record::<User>()?.email {
//!             Some(email) => Ok(vec![ops::set(key, email)]),
//!             None => {
//!                 log::debug("user without an email");
//!                 Ok(vec![ops::del(key)])
//!             }
//!         }
//!     }
//! }
//!
//! keepwarm_guest::export_plugin!(UserEmails);
//! #
//! # let plugin = UserEmails::new(&Config::default()).unwrap();
//! # let line = r#"{"record":{"id":7,"email":"a@example.com"},"changes":null,"action":"insert",
//! #   "metadata":{"table_schema":"public","table_name":"users","commit_timestamp":"2025-03-14T09:26:53.601022Z",
//! #   "commit_lsn":1,"commit_idx":0,"idempotency_key":"MTow","record_pks":["7"]}}"#;
//! # let change = Change::from_message_json(line).unwrap();
//! # assert_eq!(plugin.handle(&change).unwrap(), vec![ops::set("user:7:email", "a@example.com")]);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2` (as a `cdylib`); the result is a component.
//! Off wasm32 the crate still compiles, so plugins can be unit-tested natively: build changes with
//! [`Change::from_message_json`] and the plugin with [`Config::from_json`]. Logging prints to
//! stderr there; the `config` import is only reached by [`export_plugin!`].
//!
//! # Layout
//!
//! - [`bindings`]: the code `wit-bindgen` generates for the `plugin` world.
//! - `change.rs`: [`Change`], typed access to one change; `message.rs` builds one from a Sequin
//!   change message; [`wire`] reads the batch the host sends into changes.
//! - [`ops`]: builders for the cache operations.
//! - [`key`]: key templates such as `{schema}.{table}:{pks}`.
//! - [`config`]: [`Config`], the plugin's `[config]` table.
//! - [`log`]: logging through the host.
//! - [`export`]: the [`Plugin`] trait and the [`export_plugin!`] macro.

#![deny(missing_docs)]

/// The bindings `wit-bindgen` generates for the `plugin` world of `wit/keepwarm.wit`.
///
/// The types a plugin meets are re-exported at the crate root ([`Op`], [`Action`], ...); reach in
/// here for the raw import functions or to implement the exported `Guest` trait by hand.
#[allow(
    missing_docs,
    reason = "wit-bindgen emits undocumented namespace modules"
)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        // Plugins live in other crates: they call `export!` through `export_plugin!`.
        pub_export_macro: true,
        default_bindings_module: "keepwarm_guest::bindings",
        // Lets tests and plugins compare operations and changes with `==`.
        additional_derives: [PartialEq],
    });
}

pub mod config;
pub mod export;
pub mod key;
pub mod log;
pub mod ops;
pub mod wire;

mod change;
mod message;

#[cfg(test)]
mod fixtures;

/// The README's example plugin, compiled as a doctest so that it stays correct.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}

pub use bindings::keepwarm::plugin::types::{
    Action, ChangeResult, ExpireOp, FieldValue, HashSetOp, Level, MembersOp, Op, PublishOp,
    ScoredMember, SetOp, SortedSetAddOp,
};
pub use change::{Change, ChangeParts};
pub use config::Config;
pub use export::Plugin;
pub use key::{KeyTemplate, format_key};
pub use wit_bindgen;

/// The raw WIT `batch` record a plugin receives; [`wire`] reads it into [`Change`]s.
pub type WitBatch = bindings::keepwarm::plugin::types::Batch;

impl Action {
    /// The action's name as Sequin writes it: `insert`, `update`, `delete` or `read`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Insert => "insert",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Read => "read",
        }
    }

    /// Whether the row is gone after this change (`delete`).
    pub fn is_delete(self) -> bool {
        self == Action::Delete
    }
}
