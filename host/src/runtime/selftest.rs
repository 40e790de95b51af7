//! Running a manifest's `[[test]]` cases against a freshly loaded plugin, before it takes
//! traffic.

use super::Plugin;
use super::error::{Misbehavior, PluginError, SelfTestError};
use crate::message::ChangeMessage;

/// Runs every self-test of the plugin's manifest.
///
/// # Errors
///
/// The first case whose input does not decode, or whose answer differs from the expectation.
pub(super) fn run(plugin: &Plugin) -> Result<(), SelfTestError> {
    for (index, case) in plugin.manifest.tests.iter().enumerate() {
        let name = case
            .name
            .clone()
            .unwrap_or_else(|| format!("#{}", index + 1));
        let message = match ChangeMessage::from_json(&case.input) {
            Ok(message) => message,
            Err(error) => return Err(SelfTestError::Input { name, error }),
        };
        let outcome = plugin
            .call_batch(&[&message])
            .pop()
            .unwrap_or(Err(PluginError::Misbehaved(Misbehavior::NoResult)));
        match (outcome, &case.expect, &case.expect_error) {
            (Ok(ops), Some(expect), _) => {
                let got = serde_json::Value::Array(ops.iter().map(|op| op.to_json()).collect());
                if &got != expect {
                    return Err(SelfTestError::Ops {
                        name,
                        expected: expect.clone(),
                        got,
                    });
                }
            }
            (Err(PluginError::Rejected(reason)), None, Some(expected)) => {
                if !reason.contains(expected.as_str()) {
                    return Err(SelfTestError::NotRejected {
                        name,
                        expected: expected.clone(),
                        got: format!("{reason:?}"),
                    });
                }
            }
            (Ok(ops), None, Some(expected)) => {
                return Err(SelfTestError::NotRejected {
                    name,
                    expected: expected.clone(),
                    got: format!("{} operations", ops.len()),
                });
            }
            (Err(error), _, _) => return Err(SelfTestError::Failed { name, error }),
            (Ok(_), None, None) => {}
        }
    }
    Ok(())
}
