//! Plain SQL against the source database (tokio-postgres): the start-up checks, whose errors say
//! what to change; the publication and slot, created when allowed; primary keys; slot lag.

use super::config::PostgresSourceConfig;
use std::collections::HashSet;
use tokio_postgres::{Client, NoTls};

/// Why the source cannot stream.
#[derive(Debug, thiserror::Error)]
pub(super) enum PostgresError {
    /// A query or the connection failed: worth another try.
    #[error("postgres: cannot {what}")]
    Sql {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        error: tokio_postgres::Error,
    },
    /// The replication stream failed: worth another try.
    #[error("replication stream: {0}")]
    Stream(#[source] pg_walstream::ReplicationError),
    /// The database is not set up for the source; retrying does not help. The text says what
    /// to change.
    #[error("{0}")]
    Setup(String),
}

impl PostgresError {
    /// Whether another try may work.
    pub(super) fn is_transient(&self) -> bool {
        !matches!(self, PostgresError::Setup(_))
    }
}

fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PostgresError {
    let what = what.into();
    move |error| PostgresError::Sql { what, error }
}

/// `schema.table` → (`schema`, `table`).
pub(crate) fn split_table(name: &str) -> Option<(&str, &str)> {
    let (schema, table) = name.split_once('.')?;
    (!schema.is_empty() && !table.is_empty() && !table.contains('.')).then_some((schema, table))
}

/// An identifier, quoted for SQL.
pub(super) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Opens a plain SQL connection; its driver runs on a task of its own.
pub(super) async fn connect(config: &tokio_postgres::Config) -> Result<Client, PostgresError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(sql("connect to the database"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error, "postgres connection ended");
        }
    });
    Ok(client)
}

/// What the checks found: the tables to stream, as `(schema, table)`.
pub(super) struct Setup {
    pub(super) tables: HashSet<(String, String)>,
}

/// Checks that the database can be streamed, creating the publication and slot when allowed.
/// `first` is true on the first connection of this process: only then may a missing slot be
/// created (a slot that disappears while keepwarm runs means lost changes).
///
/// # Errors
///
/// [`PostgresError::Setup`] saying what to change, or a failed query.
pub(super) async fn check(
    client: &Client,
    config: &PostgresSourceConfig,
    first: bool,
) -> Result<Setup, PostgresError> {
    let one = |row: tokio_postgres::Row| row.get::<_, String>(0);
    let wal_level = one(client.query_one("SHOW wal_level", &[]).await.map_err(sql("read wal_level"))?);
    if wal_level != "logical" {
        return Err(PostgresError::Setup(format!(
            "wal_level is {wal_level:?}; logical replication needs wal_level = logical \
             (ALTER SYSTEM SET wal_level = logical, then restart Postgres)"
        )));
    }
    let date_style = one(client.query_one("SHOW DateStyle", &[]).await.map_err(sql("read DateStyle"))?);
    let interval_style = one(
        client
            .query_one("SHOW IntervalStyle", &[])
            .await
            .map_err(sql("read IntervalStyle"))?,
    );
    if !date_style.starts_with("ISO") || interval_style != "postgres" {
        return Err(PostgresError::Setup(format!(
            "DateStyle is {date_style:?} and IntervalStyle {interval_style:?}; the stream's \
             values are read in the ISO date style and the postgres interval style \
             (ALTER DATABASE … SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres')"
        )));
    }
    let role = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(sql("read the role's attributes"))?;
    let (user, may_replicate): (String, bool) = (role.get(0), role.get(1));
    if !may_replicate {
        return Err(PostgresError::Setup(format!(
            "role {user} may not stream changes: ALTER ROLE {} WITH REPLICATION",
            ident(&user)
        )));
    }
    publication(client, config).await?;
    let tables = tables(client, config).await?;
    if slot(client, config, first, || plan_backfills(config, &tables)).await? == Slot::Created {
        tracing::info!(slot = %config.slot, "replication slot created");
    }
    Ok(Setup { tables })
}

async fn publication(client: &Client, config: &PostgresSourceConfig) -> Result<(), PostgresError> {
    let name = config.publication.as_str();
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(sql("look up the publication"))?
        .is_some();
    if exists {
        return Ok(());
    }
    let target = if config.tables.is_empty() {
        "ALL TABLES".to_owned()
    } else {
        let names: Vec<String> = config
            .tables
            .iter()
            .filter_map(|t| split_table(t))
            .map(|(schema, table)| format!("{}.{}", ident(schema), ident(table)))
            .collect();
        format!("TABLE {}", names.join(", "))
    };
    // A partitioned table's changes are published under its own name, not its partitions'
    // (which no plugin subscribes to).
    let create = format!(
        "CREATE PUBLICATION {} FOR {target} WITH (publish_via_partition_root = true)",
        ident(name)
    );
    if !config.create_publication {
        return Err(PostgresError::Setup(format!(
            "publication {name:?} does not exist: {create}; or set create_publication = true"
        )));
    }
    client
        .batch_execute(&create)
        .await
        .map_err(sql(format!("create publication {name}")))?;
    tracing::info!(publication = name, "publication created");
    Ok(())
}

/// The tables to stream: those configured (each must be in the publication) or the
/// publication's. Each needs a primary key and a replica identity other than NOTHING.
async fn tables(
    client: &Client,
    config: &PostgresSourceConfig,
) -> Result<HashSet<(String, String)>, PostgresError> {
    let publication = config.publication.as_str();
    let rows = client
        .query(
            "SELECT t.schemaname::text, t.tablename::text, c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    c.relispartition
             FROM pg_publication_tables t
             JOIN pg_namespace n ON n.nspname = t.schemaname
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename
             WHERE t.pubname = $1",
            &[&publication],
        )
        .await
        .map_err(sql("list the publication's tables"))?;
    // Without publish_via_partition_root the publication lists (and streams) the partitions
    // under their own names: a plugin subscribed to the table would never see their changes.
    if let Some(row) = rows.iter().find(|row| row.get::<_, bool>(4)) {
        let (schema, partition): (String, String) = (row.get(0), row.get(1));
        return Err(PostgresError::Setup(format!(
            "publication {publication:?} publishes partition {schema}.{partition} under its own              name, so plugins subscribed to its table would not see its changes:              ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
            ident(publication)
        )));
    }
    let published: Vec<(String, String, String, bool)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let mut wanted = HashSet::new();
    for table in &config.tables {
        let Some((schema, name)) = split_table(table) else { continue };
        if !published.iter().any(|(s, t, ..)| s == schema && t == name) {
            return Err(PostgresError::Setup(format!(
                "table {table} is not in publication {publication:?}: \
                 ALTER PUBLICATION {} ADD TABLE {}.{}",
                ident(publication),
                ident(schema),
                ident(name)
            )));
        }
        wanted.insert((schema.to_owned(), name.to_owned()));
    }
    for (schema, name, identity, has_pk) in &published {
        if !config.tables.is_empty() && !wanted.contains(&(schema.clone(), name.clone())) {
            continue;
        }
        let full = format!("{}.{}", ident(schema), ident(name));
        if !has_pk {
            return Err(PostgresError::Setup(format!(
                "table {schema}.{name} has no primary key; change messages are keyed by it: \
                 ALTER TABLE {full} ADD PRIMARY KEY (…)"
            )));
        }
        if identity == "n" {
            return Err(PostgresError::Setup(format!(
                "table {schema}.{name} has REPLICA IDENTITY NOTHING, so its updates and deletes \
                 cannot be streamed: ALTER TABLE {full} REPLICA IDENTITY DEFAULT (or FULL, for \
                 old values in `changes`)"
            )));
        }
        wanted.insert((schema.clone(), name.clone()));
    }
    if wanted.is_empty() {
        tracing::warn!(publication, "the publication has no tables yet");
    }
    Ok(wanted)
}

/// Whether the slot was there or keepwarm created it.
#[derive(Debug, PartialEq, Eq)]
enum Slot {
    Existing,
    Created,
}

/// With `backfill_on_create`, the backfill of every streamed table is recorded (a state file
/// each) before the slot is created: a crash between the two, or during the backfills, resumes
/// them at the next start.
fn plan_backfills(
    config: &PostgresSourceConfig,
    tables: &HashSet<(String, String)>,
) -> Result<(), PostgresError> {
    if !config.backfill_on_create {
        return Ok(());
    }
    for (schema, table) in tables {
        super::backfill::plan(config, &format!("{schema}.{table}")).map_err(|error| {
            PostgresError::Setup(format!(
                "cannot record the backfill of {schema}.{table} in {}: {error}",
                config.backfill_state_dir.display()
            ))
        })?;
    }
    Ok(())
}

async fn slot(
    client: &Client,
    config: &PostgresSourceConfig,
    first: bool,
    before_create: impl FnOnce() -> Result<(), PostgresError>,
) -> Result<Slot, PostgresError> {
    let slot = config.slot.as_str();
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, current_database()::text
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("look up the replication slot"))?;
    match row {
        Some(row) => {
            let (plugin, database, current): (Option<String>, Option<String>, String) =
                (row.get(0), row.get(1), row.get(2));
            if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(current.as_str()) {
                return Err(PostgresError::Setup(format!(
                    "slot {slot:?} exists but is not a pgoutput slot of database {current:?} \
                     (plugin {plugin:?}, database {database:?}); pick another slot name"
                )));
            }
            Ok(Slot::Existing)
        }
        None if !first => Err(PostgresError::Setup(format!(
            "replication slot {slot:?} was dropped while keepwarm was streaming from it; \
             changes made since are lost to it. Re-create it (or restart keepwarm with \
             create_slot = true) and re-warm the cache"
        ))),
        None if config.create_slot => {
            before_create()?;
            client
                .query_one(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')::text",
                    &[&slot],
                )
                .await
                .map_err(sql(format!("create replication slot {slot}")))?;
            Ok(Slot::Created)
        }
        None => Err(PostgresError::Setup(format!(
            "replication slot {slot:?} does not exist: \
             SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); \
             or set create_slot = true"
        ))),
    }
}

/// The checks once at start-up, when the database answers within a few seconds; an unreachable
/// one is not an error here (the source retries it).
///
/// # Errors
///
/// [`PostgresError::Setup`] only.
pub(super) async fn check_at_start(
    connect: &tokio_postgres::Config,
    config: &PostgresSourceConfig,
) -> Result<(), PostgresError> {
    let attempt = async {
        let client = self::connect(connect).await?;
        check(&client, config, true).await.map(|_| ())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), attempt).await {
        Ok(Err(error)) if !error.is_transient() => Err(error),
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "postgres not reachable at start-up; will retry");
            Ok(())
        }
        Ok(Ok(())) | Err(_) => Ok(()),
    }
}

/// The primary-key column names of table `oid`, in column order.
pub(super) async fn primary_key(client: &Client, oid: u32) -> Result<Vec<String>, PostgresError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(sql("read a primary key"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Bytes of WAL the slot holds back; `None` when the slot is gone.
pub(super) async fn slot_lag(client: &Client, slot: &str) -> Result<Option<i64>, PostgresError> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("read the slot's lag"))?;
    Ok(row.map(|row| row.get::<_, Option<i64>>(0).unwrap_or(0)))
}
