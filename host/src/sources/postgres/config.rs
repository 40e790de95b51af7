//! `[[source]] kind = "postgres"`.

use super::PostgresSource;
use crate::sources::{
    Built, Source, SourceConfigError, SourceConfigure, SourceEnv, SourceError, SourceLimits,
};
use crate::valid::NonEmpty;
use serde::Deserialize;
use std::str::FromStr;

/// Logical replication straight from Postgres (the built-in `pgoutput` plugin), turned into
/// the change messages Sequin would have sent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
    /// Connection string, as a URL (`postgresql://user@host:5432/db`) or `key=value` pairs.
    /// The role needs the `REPLICATION` attribute (or to be a superuser).
    pub connection: NonEmpty,
    /// An environment variable holding the password, so that it stays out of the file.
    #[serde(default)]
    pub password_env: Option<NonEmpty>,
    /// The publication to stream.
    pub publication: NonEmpty,
    /// The logical replication slot; it remembers how far keepwarm has confirmed.
    pub slot: NonEmpty,
    /// Tables to stream (`schema.table`); empty means every table of the publication.
    #[serde(default)]
    pub tables: Vec<NonEmpty>,
    /// Create the publication when it is missing (`FOR TABLE` the `tables`, or `FOR ALL
    /// TABLES` when none are listed). Needs the right to create publications.
    #[serde(default)]
    pub create_publication: bool,
    /// Create the slot when it is missing (on the first start). A slot that disappears later
    /// is an error, never silently re-created: changes made meanwhile would be lost.
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// What a `TRUNCATE` of a streamed table does: a dead letter naming the table (the cache
    /// may now hold rows that no longer exist), or nothing.
    #[serde(default)]
    pub truncate: OnTruncate,
    /// A warning is logged when the slot holds back more WAL than this many bytes.
    #[serde(default = "default_max_slot_lag_bytes")]
    pub max_slot_lag_bytes: u64,
    /// `metadata.database_name` (Sequin's name for the database); defaults to the Postgres
    /// database name.
    #[serde(default)]
    pub database_name: Option<NonEmpty>,
    /// `metadata.consumer.name` (Sequin's sink name); defaults to the slot name.
    #[serde(default)]
    pub consumer_name: Option<NonEmpty>,
    /// When keepwarm creates the slot (the first start, or after the slot was dropped while
    /// keepwarm was stopped), backfill every streamed table once, alongside the stream.
    #[serde(default)]
    pub backfill_on_create: bool,
    /// Where such backfills keep their progress (a file per table), to resume after a crash.
    #[serde(default = "default_backfill_state_dir")]
    pub backfill_state_dir: std::path::PathBuf,
}

/// What a `TRUNCATE` does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnTruncate {
    /// One dead letter per truncated table.
    #[default]
    DeadLetter,
    /// Nothing (logged).
    Ignore,
}

fn yes() -> bool {
    true
}
fn default_backfill_state_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(".")
}

fn default_max_slot_lag_bytes() -> u64 {
    1 << 30
}

impl PostgresSourceConfig {
    /// The connection settings, with the password from `password_env` when set.
    ///
    /// # Errors
    ///
    /// The connection string does not parse, asks for TLS, or the variable is unset.
    pub(super) fn connect_config(&self) -> Result<tokio_postgres::Config, SourceConfigError> {
        let mut config = tokio_postgres::Config::from_str(self.connection.as_str())
            .map_err(|error| SourceConfigError::new("connection", error.to_string()))?;
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(SourceConfigError::new(
                "connection",
                "sslmode=require is not supported yet; connect over a trusted network or a \
                 TLS tunnel, with sslmode=disable or prefer",
            ));
        }
        if let Some(var) = &self.password_env {
            let password = std::env::var(var.as_str()).map_err(|_| {
                SourceConfigError::new(
                    "password_env",
                    format!("environment variable {var} is not set"),
                )
            })?;
            config.password(password);
        }
        if config.get_hosts().is_empty() {
            config.host("localhost");
        }
        Ok(config)
    }
}

impl SourceConfigure for PostgresSourceConfig {
    fn name(&self) -> String {
        format!("postgres:{}", self.slot.as_str())
    }

    fn validate(&self, _limits: &SourceLimits) -> Result<(), SourceConfigError> {
        tokio_postgres::Config::from_str(self.connection.as_str())
            .map_err(|error| SourceConfigError::new("connection", error.to_string()))?;
        for table in &self.tables {
            super::checks::split_table(table).ok_or_else(|| {
                SourceConfigError::new(
                    "tables",
                    format!("{table:?} is not of the form schema.table"),
                )
            })?;
        }
        let slot_ok = self
            .slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !slot_ok {
            return Err(SourceConfigError::new(
                "slot",
                "a slot name may only hold lower-case letters, digits and underscores",
            ));
        }
        Ok(())
    }

    fn build(self: Box<Self>, _env: SourceEnv) -> Built {
        Box::pin(async move {
            let connect = self.connect_config()?;
            // A database that is reachable but not set up stops the daemon at start-up, with
            // what to change; one that is unreachable is retried by the running source.
            super::checks::check_at_start(&connect, &self)
                .await
                .map_err(|error| SourceError::Client {
                    what: format!("postgres source {}", self.name()),
                    error: Box::new(error),
                })?;
            Ok(Box::new(PostgresSource {
                config: *self,
                connect,
            }) as Box<dyn Source>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PostgresSourceConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults_and_checks() {
        let config = parse(
            r#"connection = "postgresql://keepwarm@db/shop"
               publication = "keepwarm"
               slot = "keepwarm""#,
        )
        .unwrap();
        assert!(config.create_slot && !config.create_publication);
        assert_eq!(config.truncate, OnTruncate::DeadLetter);
        let limits = SourceLimits {
            max_in_flight: 10,
            cache_redis: true,
            cache_cluster: false,
        };
        config.validate(&limits).unwrap();
        let bad_slot = parse(
            r#"connection = "host=db"
               publication = "p"
               slot = "Bad-Slot""#,
        )
        .unwrap();
        assert!(
            bad_slot
                .validate(&limits)
                .unwrap_err()
                .to_string()
                .contains("slot")
        );
        let bad_table = parse(
            r#"connection = "host=db"
               publication = "p"
               slot = "s"
               tables = ["orders"]
               truncate = "ignore""#,
        )
        .unwrap();
        assert!(
            bad_table
                .validate(&limits)
                .unwrap_err()
                .to_string()
                .contains("schema.table")
        );
        let unknown = parse("connection = \"x\"\npublication = \"p\"\nslot = \"s\"\ncolour = 1");
        assert!(unknown.unwrap_err().to_string().contains("colour"));
    }
}
