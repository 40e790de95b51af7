//! Running a manifest's `[[test]]` cases against a freshly loaded plugin, before it takes
//! traffic.

use super::{Plugin, PluginError};
use crate::message::ChangeMessage;
use anyhow::{Context as _, bail};

/// Runs every self-test of the plugin's manifest.
///
/// # Errors
///
/// The first case whose input does not decode, or whose answer differs from the expectation.
pub fn run(plugin: &Plugin) -> anyhow::Result<()> {
    for (index, case) in plugin.manifest.tests.iter().enumerate() {
        let name = case
            .name
            .clone()
            .unwrap_or_else(|| format!("#{}", index + 1));
        let message = ChangeMessage::from_json(&case.input)
            .with_context(|| format!("self-test {name}: input is not a change message"))?;
        let outcome = plugin
            .call_batch(&[&message])
            .pop()
            .unwrap_or_else(|| Err(PluginError::Misbehaved("no result".to_owned())));
        match (outcome, &case.expect, &case.expect_error) {
            (Ok(ops), Some(expect), _) => {
                let got = serde_json::Value::Array(ops.iter().map(|op| op.to_json()).collect());
                if &got != expect {
                    bail!("self-test {name} failed: expected {expect}, got {got}");
                }
            }
            (Err(PluginError::Rejected(reason)), None, Some(expected)) => {
                if !reason.contains(expected.as_str()) {
                    bail!(
                        "self-test {name} failed: expected an error containing {expected:?}, got {reason:?}"
                    );
                }
            }
            (Ok(ops), None, Some(expected)) => {
                bail!(
                    "self-test {name} failed: expected an error containing {expected:?}, got {} operations",
                    ops.len()
                );
            }
            (Err(error), _, _) => bail!("self-test {name} failed: {error}"),
            (Ok(_), None, None) => {}
        }
    }
    Ok(())
}
