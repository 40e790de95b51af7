//! The plugin contracts keepwarm runs: 0.2.0 (`wit/keepwarm.wit`, a batch's texts in one
//! string per change) and 0.1.0 before it (`wit/v0.1.0/keepwarm.wit`, one string per text),
//! which components built with older SDKs export. A component is taken at the newest contract
//! it implements; both answer with the same operations.

use super::bindings::{self, v0_1};
use super::convert;
use super::state::PluginState;
use crate::message::ChangeMessage;
use crate::ops::Op;
use wasmtime::Store;
use wasmtime::component::InstancePre;

/// A plugin's answer for each change of a batch: its operations, or its reason to reject it.
pub type Answers = Vec<Result<Vec<Op>, String>>;

/// A component pre-linked against the contract it implements.
pub enum Pre {
    /// Contract 0.2.0.
    V0_2(bindings::PluginPre<PluginState>),
    /// Contract 0.1.0.
    V0_1(v0_1::PluginPre<PluginState>),
}

impl Pre {
    /// The newest contract the component implements; the error says what is wrong with it
    /// under each.
    ///
    /// # Errors
    ///
    /// When it implements neither.
    pub fn new(instance: InstancePre<PluginState>) -> Result<Pre, wasmtime::Error> {
        let newest = match bindings::PluginPre::new(instance.clone()) {
            Ok(pre) => return Ok(Pre::V0_2(pre)),
            Err(error) => error,
        };
        v0_1::PluginPre::new(instance)
            .map(Pre::V0_1)
            .map_err(|older| {
                wasmtime::Error::msg(format!("as 0.2.0: {newest:#}; as 0.1.0: {older:#}"))
            })
    }

    /// The contract's version.
    pub fn version(&self) -> &'static str {
        match self {
            Pre::V0_2(_) => "0.2.0",
            Pre::V0_1(_) => "0.1.0",
        }
    }

    /// A new instance in `store`.
    ///
    /// # Errors
    ///
    /// As wasmtime's instantiation.
    pub fn instantiate(&self, store: &mut Store<PluginState>) -> wasmtime::Result<Instance> {
        Ok(match self {
            Pre::V0_2(pre) => Instance::V0_2(pre.instantiate(store)?),
            Pre::V0_1(pre) => Instance::V0_1(pre.instantiate(store)?),
        })
    }
}

/// An instance of a plugin, under its contract.
pub enum Instance {
    /// Contract 0.2.0.
    V0_2(bindings::Plugin),
    /// Contract 0.1.0.
    V0_1(v0_1::Plugin),
}

impl Instance {
    /// Calls `handle-batch` with `changes`.
    ///
    /// # Errors
    ///
    /// A trap, a timeout, or an answer that breaks the canonical ABI.
    pub fn handle_batch(
        &self,
        store: &mut Store<PluginState>,
        changes: &[&ChangeMessage],
    ) -> wasmtime::Result<Answers> {
        match self {
            Instance::V0_2(plugin) => {
                let batch = convert::Batch::new(changes);
                let answers = plugin
                    .keepwarm_plugin_transform()
                    .call_handle_batch(store, batch.param())?;
                Ok(host_ops(answers, convert::op))
            }
            Instance::V0_1(plugin) => {
                let pks = convert::batch_pk_refs(changes);
                let params = convert::change_params_v0_1(changes, &pks);
                let answers = plugin
                    .keepwarm_plugin_transform()
                    .call_handle_batch(store, &params)?;
                Ok(host_ops(answers, convert::op_v0_1))
            }
        }
    }
}

fn host_ops<W>(answers: Vec<Result<Vec<W>, String>>, op: fn(W) -> Op) -> Answers {
    answers
        .into_iter()
        .map(|answer| answer.map(|ops| ops.into_iter().map(op).collect()))
        .collect()
}
