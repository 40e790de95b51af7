//! [`Config`]: the `[config]` table of the plugin's manifest.
//!
//! The host hands the table over as a JSON object text through the `config` import (`{}` when
//! the manifest has none); [`export_plugin!`](crate::export_plugin) reads it once and passes it to
//! [`Plugin::new`](crate::Plugin::new). TOML values arrive as their JSON counterparts.
//!
//! ```
//! use keepwarm_guest::Config;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Settings {
//!     key: String,
//!     ttl_seconds: Option<u64>,
//! }
//!
//! let config = Config::from_json(r#"{"key":"{table}:{pks}","ttl_seconds":60}"#).unwrap();
//! assert_eq!(config.get::<u64>("ttl_seconds"), Ok(Some(60)));
//! assert_eq!(config.get::<u64>("missing"), Ok(None));
//! let settings: Settings = config.parse().unwrap();
//! assert_eq!(settings.key, "{table}:{pks}");
//! ```

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The plugin's configuration: a JSON object.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `[config]` table.
    table: Map<String, Value>,
    /// The table as JSON text. Deserializing from text rather than from `table` gives serde's
    /// full error messages (with `arbitrary_precision`, a `Value` number only says "invalid
    /// number").
    json: String,
}

impl PartialEq for Config {
    /// Configurations are equal when their tables are, however the text was spaced.
    fn eq(&self, other: &Config) -> bool {
        self.table == other.table
    }
}

impl Default for Config {
    /// An empty table, as for a manifest without `[config]`.
    fn default() -> Config {
        Config {
            table: Map::new(),
            json: "{}".to_owned(),
        }
    }
}

impl Config {
    /// Parses a configuration from JSON object text, as the `config` import returns it.
    ///
    /// # Errors
    ///
    /// When the text is not a JSON object.
    pub fn from_json(json: &str) -> Result<Config, String> {
        match serde_json::from_str(json) {
            Ok(Value::Object(table)) => Ok(Config {
                table,
                json: json.to_owned(),
            }),
            Ok(_) => Err("config is not a JSON object".to_owned()),
            Err(error) => Err(format!("config is not valid JSON: {error}")),
        }
    }

    /// The value of one key, deserialized into `T`; `Ok(None)` when the key is absent.
    ///
    /// # Errors
    ///
    /// When the value does not fit `T`; the message names the key.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        self.table
            .get(key)
            .map(|value| {
                serde_json::from_str(&value.to_string())
                    .map_err(|error| format!("{key}: {}", message(&error)))
            })
            .transpose()
    }

    /// The whole table deserialized into `T`, typically a struct with
    /// `#[serde(deny_unknown_fields)]` so that a misspelt key is reported.
    ///
    /// # Errors
    ///
    /// When the table does not fit `T` (missing or unknown keys, wrong types).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.json).map_err(|error| message(&error))
    }

    /// The table as a JSON object.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.table
    }
}

/// The error's message without the " at line L column C" that points into the JSON text: the
/// author wrote TOML, so positions in the JSON would mislead.
fn message(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    match text.strip_suffix(&position) {
        Some(message) => message.to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        key: String,
        #[serde(default)]
        ttl_seconds: Option<u64>,
    }

    #[test]
    fn from_json_wants_an_object() {
        assert_eq!(Config::from_json(" { } "), Ok(Config::default()));
        assert_eq!(
            Config::from_json("[1]").unwrap_err(),
            "config is not a JSON object"
        );
        let error = Config::from_json("{").unwrap_err();
        assert!(
            error.starts_with("config is not valid JSON: EOF"),
            "{error}"
        );
    }

    #[test]
    fn get_names_the_key_on_a_type_error() {
        let config =
            Config::from_json(r#"{"ttl_seconds":"soon","n":18446744073709551615}"#).unwrap();
        assert_eq!(
            config.get::<u64>("ttl_seconds"),
            Err(r#"ttl_seconds: invalid type: string "soon", expected u64"#.to_owned())
        );
        assert_eq!(config.get::<u64>("n"), Ok(Some(u64::MAX)));
        assert_eq!(config.get::<String>("absent"), Ok(None));
        assert_eq!(
            config.get::<u8>("n"),
            Err("n: invalid value: integer `18446744073709551615`, expected u8".to_owned())
        );
    }

    #[test]
    fn parse_reads_the_whole_table() {
        let config = Config::from_json(r#"{"key":"k:{pks}","ttl_seconds":5}"#).unwrap();
        assert_eq!(
            config.parse::<Settings>(),
            Ok(Settings {
                key: "k:{pks}".to_owned(),
                ttl_seconds: Some(5)
            })
        );
        let typo = Config::from_json(r#"{"key":"k","ttl_second":5}"#).unwrap();
        let error = typo.parse::<Settings>().unwrap_err();
        assert!(error.starts_with("unknown field `ttl_second`"), "{error}");
        assert_eq!(
            Config::default().parse::<Settings>(),
            Err("missing field `key`".to_owned())
        );
    }
}
