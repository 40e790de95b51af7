//! Plain SQL against the source database (tokio-postgres): the start-up checks, whose errors say
//! what to change; the publication and slot, created when allowed; primary keys; slot lag.

use super::config::PostgresSourceConfig;
use super::error::{PostgresError, SetupError};
use std::collections::HashSet;
use tokio_postgres::{Client, NoTls};

fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PostgresError {
    PostgresError::sql(what)
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
/// [`SetupError`] saying what to change, or a failed query.
pub(super) async fn check(
    client: &Client,
    config: &PostgresSourceConfig,
    first: bool,
) -> Result<Setup, PostgresError> {
    let one = |row: tokio_postgres::Row| row.get::<_, String>(0);
    let wal_level = one(client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(sql("read wal_level"))?);
    if wal_level != "logical" {
        return Err(SetupError::WalLevel { found: wal_level }.into());
    }
    let date_style = one(client
        .query_one("SHOW DateStyle", &[])
        .await
        .map_err(sql("read DateStyle"))?);
    let interval_style = one(client
        .query_one("SHOW IntervalStyle", &[])
        .await
        .map_err(sql("read IntervalStyle"))?);
    if !date_style.starts_with("ISO") || interval_style != "postgres" {
        return Err(SetupError::DateStyle {
            date_style,
            interval_style,
        }
        .into());
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
        return Err(SetupError::NoReplication {
            statement: format!("ALTER ROLE {} WITH REPLICATION", ident(&user)),
            role: user,
        }
        .into());
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
        return Err(SetupError::NoPublication {
            publication: name.to_owned(),
            statement: create,
        }
        .into());
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
        return Err(SetupError::PartitionPublished {
            publication: publication.to_owned(),
            partition: format!("{schema}.{partition}"),
            statement: format!(
                "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                ident(publication)
            ),
        }
        .into());
    }
    let published: Vec<(String, String, String, bool)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let mut wanted = HashSet::new();
    for table in &config.tables {
        let Some((schema, name)) = split_table(table) else {
            continue;
        };
        if !published.iter().any(|(s, t, ..)| s == schema && t == name) {
            return Err(SetupError::NotPublished {
                table: table.to_string(),
                publication: publication.to_owned(),
                statement: format!(
                    "ALTER PUBLICATION {} ADD TABLE {}.{}",
                    ident(publication),
                    ident(schema),
                    ident(name)
                ),
            }
            .into());
        }
        wanted.insert((schema.to_owned(), name.to_owned()));
    }
    for (schema, name, identity, has_pk) in &published {
        if !config.tables.is_empty() && !wanted.contains(&(schema.clone(), name.clone())) {
            continue;
        }
        let full = format!("{}.{}", ident(schema), ident(name));
        if !has_pk && config.tables.is_empty() {
            // Every table of the publication is streamed: one without a key cannot be cached
            // by row, and must not stop the others (it may have been created since the start).
            tracing::warn!(publication, table = %format!("{schema}.{name}"), "table has no primary key: its changes are not streamed (add one to cache it)");
            continue;
        }
        if !has_pk {
            return Err(SetupError::NoPrimaryKey {
                table: format!("{schema}.{name}"),
                statement: format!("ALTER TABLE {full} ADD PRIMARY KEY (…)"),
            }
            .into());
        }
        if identity == "n" {
            return Err(SetupError::NoReplicaIdentity {
                table: format!("{schema}.{name}"),
                statement: format!("ALTER TABLE {full} REPLICA IDENTITY DEFAULT"),
            }
            .into());
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
            SetupError::BackfillState {
                table: format!("{schema}.{table}"),
                dir: config.backfill_state_dir.clone(),
                error,
            }
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
            "SELECT plugin::text, database::text, current_database()::text,
                    wal_status = 'lost'
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("look up the replication slot"))?;
    match row {
        Some(row) => {
            let (plugin, database, current): (Option<String>, Option<String>, String) =
                (row.get(0), row.get(1), row.get(2));
            if plugin.as_deref() != Some("pgoutput")
                || database.as_deref() != Some(current.as_str())
            {
                return Err(SetupError::ForeignSlot {
                    slot: slot.to_owned(),
                    database: current,
                    plugin,
                    slot_database: database,
                }
                .into());
            }
            // Invalidated (`max_slot_wal_keep_size`): the WAL it needed is gone, and so are the
            // changes in it; Postgres refuses to stream from it for good.
            if row.get::<_, Option<bool>>(3) == Some(true) {
                return Err(SetupError::SlotLost {
                    slot: slot.to_owned(),
                }
                .into());
            }
            Ok(Slot::Existing)
        }
        None if !first => Err(SetupError::SlotDropped {
            slot: slot.to_owned(),
        }
        .into()),
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
        None => Err(SetupError::NoSlot {
            slot: slot.to_owned(),
            statement: format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
        }
        .into()),
    }
}

/// The checks once at start-up, when the database answers within a few seconds; an unreachable
/// one is not an error here (the source retries it).
///
/// # Errors
///
/// Those that are not transient only ([`SetupError`], or Postgres refusing the role).
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
