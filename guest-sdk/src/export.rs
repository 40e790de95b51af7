//! The [`Plugin`] trait and [`export_plugin!`](crate::export_plugin), which exports a plugin as
//! the component's `transform` interface.
//!
//! The host calls `handle-batch` with a list of changes and expects exactly one result per
//! change, in order. The generated export:
//!
//! 1. on the first batch, reads the `[config]` table through the `config` import and builds the
//!    plugin with [`Plugin::new`]; the plugin (or the error) is kept for the instance's life;
//! 2. calls [`Plugin::handle`] once per change, in order;
//! 3. if `new` failed, answers every change of every batch with
//!    `Err("plugin configuration: <reason>")`.
//!
//! A panic aborts the instance; the host contains the trap and dead-letters the batch. Return
//! `Err` for a change you cannot handle instead: only that change is dead-lettered.
//!
//! ```
//! use keepwarm_guest::{Change, Config, Op, Plugin, ops};
//!
//! /// Drops a marker key per changed row.
//! struct Touch;
//!
//! impl Plugin for Touch {
//!     fn new(_config: &Config) -> Result<Self, String> {
//!         Ok(Touch)
//!     }
//!
//!     fn handle(&self, change: &Change) -> Result<Vec<Op>, String> {
//!         Ok(vec![ops::set(format!("touched:{}", change.table()), change.commit_timestamp())])
//!     }
//! }
//!
//! keepwarm_guest::export_plugin!(Touch);
//! ```

use std::cell::OnceCell;

use crate::{Change, ChangeResult, Config, Op, WitBatch, wire};

/// A keepwarm plugin: built once from its configuration, then asked for the cache operations of
/// each change.
///
/// Implementations must be pure: the same change gives the same answer (no clock, no
/// randomness, no state carried from one change to the next that changes the result).
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from the `[config]` table of its manifest. Validate everything here:
    /// a configuration error here is reported for every change, with the reason.
    ///
    /// # Errors
    ///
    /// When the configuration is invalid.
    fn new(config: &Config) -> Result<Self, String>;

    /// The cache operations for one change; an empty list when the change is of no interest.
    ///
    /// # Errors
    ///
    /// When the change cannot be handled. The change goes to the dead-letter stream with this
    /// reason and is not retried.
    fn handle(&self, change: &Change) -> Result<Vec<Op>, String>;
}

/// Exports a [`Plugin`] as the component's `transform` interface.
///
/// Use it once, at the top level of a `cdylib` crate. `$plugin` is a type that implements
/// [`Plugin`]. See the [module documentation](crate::export) for what the export does.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            #[allow(dead_code, reason = "only exported on wasm32")]
            struct KeepwarmExport;

            impl $crate::bindings::exports::keepwarm::plugin::transform::Guest for KeepwarmExport {
                fn handle_batch(batch: $crate::WitBatch) -> ::std::vec::Vec<$crate::ChangeResult> {
                    ::std::thread_local! {
                        static PLUGIN: ::std::cell::OnceCell<
                            ::std::result::Result<$plugin, ::std::string::String>,
                        > = const { ::std::cell::OnceCell::new() };
                    }
                    PLUGIN.with(|plugin| {
                        $crate::export::__private::handle_batch(
                            plugin,
                            batch,
                            $crate::bindings::keepwarm::plugin::config::get,
                        )
                    })
                }
            }

            // Native linkers reject the component-model export names, and native builds (unit
            // tests) have no host to call them anyway.
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::export! { KeepwarmExport with_types_in $crate::bindings }
        };
    };
}

#[doc(hidden)]
pub mod __private {
    //! What [`export_plugin!`](crate::export_plugin) expands to call; not a stable API.

    use super::*;

    /// Answers one batch: builds the plugin on first use from `config`, then one result per
    /// change. A batch that breaks the contract (a host's bug) fails every change, saying why.
    pub fn handle_batch<P: Plugin>(
        plugin: &OnceCell<Result<P, String>>,
        batch: WitBatch,
        config: impl FnOnce() -> String,
    ) -> Vec<ChangeResult> {
        let count = batch.actions.len();
        let plugin = plugin.get_or_init(|| {
            let config = Config::from_json(&config())?;
            P::new(&config)
        });
        let fail_all = |error: String| vec![Err(error); count];
        let changes: Vec<Change> = match wire::changes(batch) {
            Ok(changes) => changes,
            Err(reason) => return fail_all(format!("keepwarm-guest: {reason}")),
        };
        match plugin {
            Ok(plugin) => changes.iter().map(|change| plugin.handle(change)).collect(),
            Err(reason) => fail_all(format!("plugin configuration: {reason}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::__private::handle_batch;
    use super::*;
    use crate::{fixtures, ops};

    /// Deletes the row's key, and fails on tables named in `reject`.
    struct Deleter {
        reject: String,
    }

    impl Plugin for Deleter {
        fn new(config: &Config) -> Result<Self, String> {
            let reject = config.get("reject")?.ok_or("reject is required")?;
            Ok(Deleter { reject })
        }

        fn handle(&self, change: &Change) -> Result<Vec<Op>, String> {
            if change.table() == self.reject {
                return Err(format!("{} is rejected", change.table()));
            }
            Ok(vec![ops::del(change.pks().join(":"))])
        }
    }

    fn batch() -> WitBatch {
        let changes: Vec<Change> = fixtures::all()
            .iter()
            .map(|fixture| Change::from_message_json(&fixture.line).unwrap())
            .collect();
        wire::batch(&changes)
    }

    #[test]
    fn one_result_per_change_in_order() {
        let plugin = OnceCell::new();
        let results = handle_batch::<Deleter>(&plugin, batch(), || r#"{"reject":"orders"}"#.into());
        assert_eq!(results.len(), 12);
        assert_eq!(results[0], Err("orders is rejected".to_owned()));
        assert_eq!(results[1], Ok(vec![ops::del("1001:1")]));
        assert_eq!(
            results[11],
            Ok(vec![ops::del("2025-03-13:9007199254740993")])
        );
        assert_eq!(
            handle_batch::<Deleter>(&plugin, wire::batch(&[]), || unreachable!()),
            []
        );
        let mut broken = batch();
        broken.layout.pop();
        let results = handle_batch::<Deleter>(&plugin, broken, || unreachable!());
        assert_eq!(results.len(), 12);
        let error = results[3].clone().unwrap_err();
        assert!(
            error.starts_with("keepwarm-guest: malformed batch: 12 actions"),
            "{error}"
        );
    }

    #[test]
    fn config_is_read_once_per_instance() {
        let plugin = OnceCell::new();
        let reads = Cell::new(0);
        let config = || {
            reads.set(reads.get() + 1);
            r#"{"reject":"none"}"#.to_owned()
        };
        handle_batch::<Deleter>(&plugin, batch(), config);
        handle_batch::<Deleter>(&plugin, batch(), config);
        assert_eq!(reads.get(), 1);
    }

    #[test]
    fn a_configuration_error_fails_every_change_of_every_batch() {
        let plugin = OnceCell::new();
        let expect = Err("plugin configuration: reject is required".to_owned());
        for _ in 0..2 {
            let results = handle_batch::<Deleter>(&plugin, batch(), || "{}".into());
            assert_eq!(results, vec![expect.clone(); 12]);
        }
        let plugin = OnceCell::new();
        let results = handle_batch::<Deleter>(&plugin, batch(), || "[]".into());
        assert_eq!(
            results[0],
            Err("plugin configuration: config is not a JSON object".to_owned())
        );
    }
}
