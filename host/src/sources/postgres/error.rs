//! Why the Postgres source cannot stream (or a backfill cannot read), typed so that a caller
//! tells a failure worth another try ([`PostgresError::is_transient`]) from a database that is
//! not set up for keepwarm ([`SetupError`], whose message names the statement that fixes it).

use std::path::PathBuf;

/// Why the source cannot stream.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// A query or the connection failed. Worth another try, unless Postgres refused for a reason
    /// that only a change of configuration fixes (see [`PostgresError::is_transient`]).
    #[error("postgres: cannot {what}")]
    Sql {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        error: tokio_postgres::Error,
    },
    /// The replication stream failed: worth another try (a slot that is gone is then found by
    /// the checks).
    #[error("replication stream: {0}")]
    Stream(#[source] pg_walstream::ReplicationError),
    /// A row was left unapplied outside shutdown (its lane's plugin call failed): the session
    /// ends, so that Postgres sends it again from the confirmed position.
    #[error("a change was left unapplied; reopening the stream so that Postgres sends it again")]
    Abandoned,
    /// The database is not set up for the source: retrying does not help.
    #[error(transparent)]
    Setup(#[from] SetupError),
}

impl PostgresError {
    /// Whether another try may work: the connection or the stream failed, or Postgres refused
    /// for a passing reason. Not when the database is not set up ([`PostgresError::Setup`]), nor
    /// when Postgres refused the role (authentication, a missing database, a missing privilege).
    pub fn is_transient(&self) -> bool {
        match self {
            PostgresError::Sql { error, .. } => !is_refusal(error),
            PostgresError::Stream(_) | PostgresError::Abandoned => true,
            PostgresError::Setup(_) => false,
        }
    }

    /// The failed SQL of `what`.
    pub(super) fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let what = what.into();
        move |error| PostgresError::Sql { what, error }
    }
}

/// Postgres refused the role: SQLSTATE class 28 (invalid authorization: a wrong password, no
/// `pg_hba.conf` entry), 3D000 (no such database) or 42501 (insufficient privilege, e.g. to
/// create the publication or the slot). Another try meets the same refusal.
fn is_refusal(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|state| {
        let code = state.code();
        code.starts_with("28") || code == "3D000" || code == "42501"
    })
}

/// A database that is not set up for the source; each message says what to change, naming
/// the statement to run where there is one.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `wal_level` is not `logical`.
    #[error(
        "wal_level is {found:?}; logical replication needs wal_level = logical \
         (ALTER SYSTEM SET wal_level = logical, then restart Postgres)"
    )]
    WalLevel {
        /// The server's `wal_level`.
        found: String,
    },
    /// The session's date or interval style is not the one the stream's values are read in.
    #[error(
        "DateStyle is {date_style:?} and IntervalStyle {interval_style:?}; the stream's values \
         are read in the ISO date style and the postgres interval style \
         (ALTER DATABASE … SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres')"
    )]
    DateStyle {
        /// The session's `DateStyle`.
        date_style: String,
        /// The session's `IntervalStyle`.
        interval_style: String,
    },
    /// The role has neither `REPLICATION` nor superuser.
    #[error("role {role} may not stream changes: {statement}")]
    NoReplication {
        /// The role.
        role: String,
        /// The statement that grants it.
        statement: String,
    },
    /// The publication is missing and keepwarm may not create it.
    #[error(
        "publication {publication:?} does not exist: {statement}; or set create_publication = true"
    )]
    NoPublication {
        /// The publication.
        publication: String,
        /// The statement that creates it.
        statement: String,
    },
    /// The publication streams a partition under its own name.
    #[error(
        "publication {publication:?} publishes partition {partition} under its own name, so \
         plugins subscribed to its table would not see its changes: {statement}"
    )]
    PartitionPublished {
        /// The publication.
        publication: String,
        /// The partition, `schema.table`.
        partition: String,
        /// The statement that publishes partitions under their root's name.
        statement: String,
    },
    /// A configured table is not in the publication.
    #[error("table {table} is not in publication {publication:?}: {statement}")]
    NotPublished {
        /// The table, `schema.table`.
        table: String,
        /// The publication.
        publication: String,
        /// The statement that adds it.
        statement: String,
    },
    /// A table has no primary key to key its changes (or order its backfill) by.
    #[error("table {table} has no primary key; change messages are keyed by it: {statement}")]
    NoPrimaryKey {
        /// The table, `schema.table`.
        table: String,
        /// The statement to complete.
        statement: String,
    },
    /// A table's updates and deletes are not streamed.
    #[error(
        "table {table} has REPLICA IDENTITY NOTHING, so its updates and deletes cannot be \
         streamed: {statement} (or FULL, for old values in `changes`)"
    )]
    NoReplicaIdentity {
        /// The table, `schema.table`.
        table: String,
        /// The statement that gives it the default identity.
        statement: String,
    },
    /// The slot belongs to another plugin or database.
    #[error(
        "slot {slot:?} exists but is not a pgoutput slot of database {database:?} \
         (plugin {plugin:?}, database {slot_database:?}); pick another slot name"
    )]
    ForeignSlot {
        /// The slot.
        slot: String,
        /// The database keepwarm is connected to.
        database: String,
        /// The slot's output plugin.
        plugin: Option<String>,
        /// The slot's database.
        slot_database: Option<String>,
    },
    /// The slot disappeared while keepwarm streamed from it.
    #[error(
        "replication slot {slot:?} was dropped while keepwarm was streaming from it; changes \
         made since are lost to it. Re-create it (or restart keepwarm with create_slot = true) \
         and re-warm the cache"
    )]
    SlotDropped {
        /// The slot.
        slot: String,
    },
    /// Postgres invalidated the slot (its WAL passed `max_slot_wal_keep_size`).
    #[error(
        "replication slot {slot:?} was invalidated by Postgres (its WAL passed \
         max_slot_wal_keep_size): the changes in the removed WAL are lost to it. Drop it \
         (SELECT pg_drop_replication_slot('{slot}')), let keepwarm create it again \
         (create_slot = true), and re-warm the cache"
    )]
    SlotLost {
        /// The slot.
        slot: String,
    },
    /// The slot is missing and keepwarm may not create it.
    #[error("replication slot {slot:?} does not exist: {statement}; or set create_slot = true")]
    NoSlot {
        /// The slot.
        slot: String,
        /// The statement that creates it.
        statement: String,
    },
    /// The backfills to run on slot creation cannot be recorded.
    #[error("cannot record the backfill of {table} in {}", dir.display())]
    BackfillState {
        /// The table, `schema.table`.
        table: String,
        /// `backfill_state_dir`.
        dir: PathBuf,
        /// Why.
        #[source]
        error: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_are_not_transient_and_name_the_statement() {
        let error = PostgresError::from(SetupError::NoPublication {
            publication: "kw".into(),
            statement: "CREATE PUBLICATION \"kw\" FOR ALL TABLES".into(),
        });
        assert!(!error.is_transient());
        assert_eq!(
            error.to_string(),
            "publication \"kw\" does not exist: CREATE PUBLICATION \"kw\" FOR ALL TABLES; \
             or set create_publication = true"
        );
        let partition = SetupError::PartitionPublished {
            publication: "kw".into(),
            partition: "public.events_low".into(),
            statement: "ALTER PUBLICATION \"kw\" SET (publish_via_partition_root = true)".into(),
        };
        assert!(
            partition
                .to_string()
                .contains("under its own name, so plugins"),
            "{partition}"
        );
    }

    #[test]
    fn the_backfill_state_keeps_its_io_error_as_the_source() {
        let error = SetupError::BackfillState {
            table: "public.orders".into(),
            dir: PathBuf::from("/state"),
            error: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let source = std::error::Error::source(&error).expect("a source");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
        assert_eq!(
            error.to_string(),
            "cannot record the backfill of public.orders in /state"
        );
    }
}
