//! The Postgres source: logical replication straight from Postgres (the built-in `pgoutput`
//! plugin, protocol v1), no Sequin in between.
//!
//! - At start-up (and on every reconnect) `checks` verifies `wal_level`, the role's
//!   `REPLICATION` attribute, the publication and its tables (primary key, replica identity)
//!   and the slot, creating the publication and slot when allowed; each failure says what to
//!   change.
//! - Each insert, update and delete becomes the change message Sequin would have sent
//!   (`change`, with values mapped by type in `values`), decoded and delivered like any other
//!   source's message. A `TRUNCATE` is a dead letter (or ignored, as configured).
//! - Postgres is told to forget WAL (the slot's confirmed flush LSN) only up to the end of the
//!   oldest transactions whose rows are all applied (`confirm`); a restart resumes there, so
//!   nothing is lost, and what comes again is harmless in versioned mode (the version is the
//!   commit LSN and the change's index in its transaction).
//! - Postgres gone: reconnect with the one backoff, `/readyz` not ready meanwhile. A slot
//!   dropped under keepwarm stops the source with an error (never re-created silently).
//! - The slot's lag is a gauge, with a warning above `max_slot_lag_bytes`.
//!
//! - [`config`]: the `[[source]]` table. [`backfill`]: `keepwarm backfill`, a table's rows as
//!   `read` messages.

pub mod backfill;
mod change;
mod checks;
pub mod config;
mod confirm;
mod error;
mod values;

use super::{BoxFuture, Sampler, Source, SourceContext, SourceError};
use crate::delivery::{Payload, RawPayload, Settle};
use crate::message::DecodeError;
use change::{Column, Fixed, Relation, Row, TxnInfo};
use config::OnTruncate;
pub use config::PostgresSourceConfig;
use confirm::{Confirm, row_id};
pub use error::{PostgresError, SetupError};
use pg_walstream::{
    EventType, LogicalReplicationStream, ReplicaIdentity, ReplicationError,
    ReplicationStreamConfig, RetryConfig, StreamingMode,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The prefix of the logical message that sets a transaction's annotations (Sequin's).
const ANNOTATIONS_PREFIX: &str = "sequin:transaction_annotations.set";

/// How often the slot's lag is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How often a reader with no change to read confirms what it received (keepalives).
const IDLE_CONFIRM: Duration = Duration::from_secs(1);

/// A configured replication stream.
pub(crate) struct PostgresSource {
    pub(crate) config: PostgresSourceConfig,
    pub(crate) connect: tokio_postgres::Config,
}

impl Source for PostgresSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.run_until_shutdown(ctx))
    }
}

/// What lives across connections.
struct Streamer {
    config: PostgresSourceConfig,
    connect: tokio_postgres::Config,
    fixed: Fixed,
    /// The confirmed flush LSN, shared by every connection's [`Confirm`].
    confirmed: Arc<AtomicU64>,
    /// Every connection's tracker, to wait on at shutdown.
    generations: Vec<Arc<Confirm>>,
    /// Messages delivered through each generation.
    delivered: Vec<u64>,
    /// The checks passed once: from now on a missing slot was dropped, not yet to create.
    checked: bool,
    /// The backfills recorded when the slot was created (`backfill_on_create`), running.
    backfills: Vec<tokio::task::JoinHandle<()>>,
}

impl PostgresSource {
    async fn run_until_shutdown(self, ctx: SourceContext) -> Result<(), SourceError> {
        let PostgresSource { config, connect } = self;
        let dbname = connect
            .get_dbname()
            .or(connect.get_user())
            .unwrap_or("postgres")
            .to_owned();
        let host = match connect.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_owned(),
        };
        let database_name = config
            .database_name
            .as_deref()
            .unwrap_or(&dbname)
            .to_owned();
        let consumer_name = config
            .consumer_name
            .as_deref()
            .unwrap_or(&config.slot)
            .to_owned();
        let mut streamer = Streamer {
            fixed: Fixed::new(&database_name, &consumer_name, &dbname, &host),
            config,
            connect,
            confirmed: Arc::new(AtomicU64::new(0)),
            generations: Vec::new(),
            delivered: Vec::new(),
            checked: false,
            backfills: Vec::new(),
        };
        let sampler = tokio::spawn(sample_lag(
            streamer.connect.clone(),
            streamer.config.slot.to_string(),
            streamer.config.max_slot_lag_bytes,
            ctx.clone(),
        ));
        let mut backoff = ctx.backoff();
        let outcome = loop {
            if ctx.shutdown.is_cancelled() {
                break Ok(());
            }
            let result = streamer.session(&ctx, &mut backoff).await;
            ctx.set_up(false);
            match result {
                Ok(()) => break Ok(()),
                Err(error) if error.is_transient() => {
                    tracing::warn!(source = %ctx.name, error = %error, "replication session ended; reconnecting");
                    if !ctx.wait(&mut backoff).await {
                        break Ok(());
                    }
                }
                Err(error) => {
                    break Err(SourceError::Client {
                        what: format!("postgres source {}", ctx.name),
                        error: Box::new(error),
                    });
                }
            }
        };
        sampler.abort();
        for backfill in streamer.backfills.drain(..) {
            let _ = backfill.await;
        }
        for (confirm, delivered) in streamer.generations.iter().zip(&streamer.delivered) {
            confirm
                .tally
                .wait_settled(*delivered, Duration::from_secs(5), |_| {})
                .await;
        }
        tracing::info!(source = %ctx.name, "source stopped");
        outcome
    }
}

impl Streamer {
    /// Starts the backfills recorded on slot creation that are not done (a state file each):
    /// they run beside the stream, and one cut short resumes at the next start.
    fn resume_backfills(&mut self, ctx: &SourceContext, tables: &HashSet<(String, String)>) {
        for (schema, name) in tables {
            let table = format!("{schema}.{name}");
            let state = backfill::state_path(&self.config, &table);
            if !state.exists() {
                continue;
            }
            let request = backfill::BackfillRequest {
                table: table.clone(),
                filter: None,
                state,
            };
            let (config, ctx) = (self.config.clone(), ctx.clone());
            self.backfills.push(tokio::spawn(async move {
                tracing::info!(source = %ctx.name, table, "backfilling the table: its slot was created by keepwarm");
                match backfill::run(&config, &request, ctx.clone()).await {
                    Ok(summary) => {
                        tracing::info!(source = %ctx.name, table, rows = summary.rows, abandoned = summary.abandoned, "backfill finished");
                    }
                    Err(error) => {
                        tracing::warn!(source = %ctx.name, table, error = %error, "backfill failed; it resumes at the next start");
                    }
                }
            }));
        }
    }

    /// One connection: checks, then the stream until shutdown (`Ok`) or a failure.
    async fn session(
        &mut self,
        ctx: &SourceContext,
        backoff: &mut crate::backoff::Backoff,
    ) -> Result<(), PostgresError> {
        let client = checks::connect(&self.connect).await?;
        let first = !self.checked;
        let setup = checks::check(&client, &self.config, first).await?;
        self.checked = true;
        if first {
            self.resume_backfills(ctx, &setup.tables);
        }
        let stream_config = ReplicationStreamConfig::builder(
            self.config.slot.to_string(),
            self.config.publication.to_string(),
        )
        // Whole transactions after their commit, never in progress: keepwarm could apply an
        // in-progress one no earlier (docs/sources.md, "Large transactions").
        .with_protocol_version(1)
        .with_streaming_mode(StreamingMode::Off)
        .with_messages(true)
        .with_feedback_interval(Duration::from_secs(1))
        .with_connection_timeout(Duration::from_secs(10))
        // Reconnecting is this source's job, with the daemon's one backoff.
        .with_retry_config(RetryConfig {
            max_attempts: 1,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(100),
            multiplier: 1.0,
            max_duration: Duration::from_secs(10),
            jitter: false,
        });
        let mut stream =
            LogicalReplicationStream::new(&replication_url(&self.connect), stream_config)
                .await
                .map_err(PostgresError::Stream)?;
        // From the slot's confirmed flush LSN.
        stream.start(None).await.map_err(PostgresError::Stream)?;
        ctx.set_up(true);
        backoff.reset();
        tracing::info!(source = %ctx.name, slot = %self.config.slot, publication = %self.config.publication, "streaming changes");
        let confirm = Arc::new(Confirm::new(Arc::clone(&self.confirmed)));
        self.generations.push(Arc::clone(&confirm));
        self.delivered.push(0);
        let generation = self.delivered.len() - 1;
        let settle: Arc<dyn Settle> = Arc::clone(&confirm) as Arc<dyn Settle>;
        let mut reader = Reader {
            ctx,
            client: &client,
            wanted: (!self.config.tables.is_empty()).then_some(setup.tables),
            truncate: self.config.truncate,
            fixed: &self.fixed,
            relations: HashMap::new(),
            txn: None,
            confirm: &confirm,
            settle,
            delivered: 0,
        };
        let cancel = ctx.shutdown.child_token();
        // Wakes the loop when no change comes: Postgres sends nothing for transactions that
        // touch no published table, only keepalives (which pg_walstream reads inside
        // `next_event`, moving the received position). Without the wake-up an idle reader
        // would never confirm that position, and the slot would hold back the WAL of every
        // other table and database.
        let mut tick = tokio::time::interval(IDLE_CONFIRM);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            stream
                .shared_lsn_feedback
                .update_applied_lsn(confirm.confirmed());
            // Dropping `next_event` on a tick is safe: it waits for the socket with what it
            // has read kept in libpq's buffers, and a frame once read is returned without
            // another wait.
            let next = tokio::select! {
                biased;
                event = stream.next_event(&cancel) => Next::Event(event),
                _ = tick.tick() => Next::Tick,
                // Not at shutdown, where abandoned rows are expected and the final feedback
                // below is wanted.
                () = confirm.abandoned.cancelled(), if !ctx.shutdown.is_cancelled() => {
                    Next::Abandoned
                }
            };
            let event = match next {
                Next::Event(event) => Some(event),
                Next::Tick => None,
                Next::Abandoned => break Err(PostgresError::Abandoned),
            };
            if let Some(event) = event {
                let event = match event {
                    Ok(event) => event,
                    Err(ReplicationError::Cancelled(_)) => break Ok(()),
                    Err(error) => break Err(PostgresError::Stream(error)),
                };
                match reader.handle(event.event_type).await {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(error) => break Err(error),
                }
            }
            // Between transactions with nothing outstanding, everything received is applied:
            // confirm it, so an idle slot (or one whose WAL is about other tables) keeps up.
            if reader.txn.is_none() && confirm.is_idle() {
                stream
                    .shared_lsn_feedback
                    .update_applied_lsn(stream.current_lsn());
            }
            stream.maybe_send_feedback().await;
        };
        self.delivered[generation] = reader.delivered;
        if result.is_ok() {
            // Shutdown: let what was delivered settle, then tell Postgres how far it got.
            confirm
                .tally
                .wait_settled(reader.delivered, Duration::from_secs(5), |_| {})
                .await;
            stream
                .shared_lsn_feedback
                .update_applied_lsn(confirm.confirmed());
            if let Err(error) = stream.stop().await {
                tracing::debug!(source = %ctx.name, error = %error, "final feedback failed");
            }
        }
        result
    }
}

/// What woke the session's loop.
enum Next<E> {
    Event(E),
    /// Time to confirm what an idle reader received.
    Tick,
    /// A row was abandoned outside shutdown.
    Abandoned,
}

/// A transaction being read.
struct OpenTxn {
    info: TxnInfo,
    next_idx: u64,
}

/// The state of one connection's reading.
struct Reader<'a> {
    ctx: &'a SourceContext,
    client: &'a tokio_postgres::Client,
    /// The configured tables; `None` streams every table of the publication.
    wanted: Option<HashSet<(String, String)>>,
    truncate: OnTruncate,
    fixed: &'a Fixed,
    relations: HashMap<u32, Relation>,
    txn: Option<OpenTxn>,
    confirm: &'a Confirm,
    settle: Arc<dyn Settle>,
    delivered: u64,
}

impl Reader<'_> {
    /// Handles one event; false on shutdown.
    async fn handle(&mut self, event: EventType) -> Result<bool, PostgresError> {
        match event {
            EventType::Relation {
                relation_id,
                namespace,
                relation_name,
                replica_identity,
                columns,
            } => {
                let pk = checks::primary_key(self.client, relation_id).await?;
                let columns: Vec<Column> = columns
                    .into_iter()
                    .map(|c| Column {
                        name: c.name,
                        type_oid: c.type_id,
                    })
                    .collect();
                let pks: Vec<usize> = pk
                    .iter()
                    .filter_map(|name| columns.iter().position(|c| &*c.name == name.as_str()))
                    .collect();
                if pks.is_empty() && self.wanted.is_none() {
                    tracing::warn!(source = %self.ctx.name, table = %format!("{namespace}.{relation_name}"), "table has no primary key: its changes are not streamed (add one to cache it)");
                }
                self.relations.insert(
                    relation_id,
                    Relation {
                        schema: namespace.to_string(),
                        table: relation_name.to_string(),
                        columns,
                        pks,
                        full_identity: replica_identity == ReplicaIdentity::Full,
                    },
                );
            }
            EventType::Begin {
                final_lsn,
                commit_timestamp,
                ..
            } => {
                self.confirm.begin(final_lsn.value());
                self.txn = Some(OpenTxn {
                    info: TxnInfo {
                        commit_lsn: final_lsn.value(),
                        commit_timestamp: commit_timestamp
                            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                            .to_string(),
                        annotations: None,
                    },
                    next_idx: 0,
                });
            }
            EventType::Commit { end_lsn, .. } => {
                if let Some(txn) = self.txn.take() {
                    self.confirm.commit(txn.info.commit_lsn, end_lsn.value());
                }
            }
            EventType::Insert {
                relation_oid, data, ..
            } => return self.row(relation_oid, &Row::Insert(&data)).await,
            EventType::Update {
                relation_oid,
                old_data,
                new_data,
                ..
            } => {
                let row = Row::Update {
                    old: old_data.as_ref(),
                    new: &new_data,
                };
                return self.row(relation_oid, &row).await;
            }
            EventType::Delete {
                relation_oid,
                old_data,
                ..
            } => return self.row(relation_oid, &Row::Delete(&old_data)).await,
            EventType::Truncate { tables, .. } => {
                for table in tables {
                    if !self.truncated(&table).await {
                        return Ok(false);
                    }
                }
            }
            EventType::Message {
                flags,
                prefix,
                content,
                ..
            } => {
                let Some(txn) = self.txn.as_mut() else {
                    return Ok(true);
                };
                txn.next_idx += 1;
                if flags & 1 == 1 && &*prefix == ANNOTATIONS_PREFIX {
                    let text = String::from_utf8_lossy(&content);
                    match serde_json::from_str::<serde_json::Value>(&text) {
                        Ok(serde_json::Value::Object(_)) => {
                            txn.info.annotations = Some(text.into_owned());
                        }
                        _ => {
                            tracing::warn!(source = %self.ctx.name, "transaction annotations are not a JSON object; left null")
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(true)
    }

    /// Delivers one row change; false on shutdown.
    async fn row(&mut self, relation_oid: u32, row: &Row<'_>) -> Result<bool, PostgresError> {
        let Some(txn) = self.txn.as_mut() else {
            return Ok(true);
        };
        let idx = txn.next_idx;
        txn.next_idx += 1;
        let Some(relation) = self.relations.get(&relation_oid) else {
            tracing::warn!(source = %self.ctx.name, relation_oid, "change to a table not described by the stream; skipped");
            return Ok(true);
        };
        if let Some(wanted) = &self.wanted
            && !wanted.contains(&(relation.schema.clone(), relation.table.clone()))
        {
            return Ok(true);
        }
        // Streaming every table of the publication: one without a primary key is skipped (the
        // checks and the relation say so), rather than a dead letter per change.
        if self.wanted.is_none() && relation.pks.is_empty() {
            return Ok(true);
        }
        let json = change::message(relation, &txn.info, idx, row, self.fixed);
        let lsn = txn.info.commit_lsn;
        let payload = match change::missing_key(relation, row) {
            // Its row id would be empty: no plugin could find the cached row.
            Some(column) => Payload::Malformed {
                raw: RawPayload::Body(json.into_bytes()),
                reason: DecodeError::Invalid(format!(
                    "the {} of {}.{} carries no value for its primary key column {column} \
                     (a replica identity index without the primary key?); the cached row \
                     cannot be found",
                    row.action(),
                    relation.schema,
                    relation.table
                )),
            },
            None => self.ctx.decode_json(json.as_bytes()),
        };
        Ok(self.deliver(lsn, idx, payload).await)
    }

    /// A table was truncated: a dead letter, unless ignored. False on shutdown.
    async fn truncated(&mut self, table: &str) -> bool {
        let Some(txn) = self.txn.as_mut() else {
            return true;
        };
        let idx = txn.next_idx;
        txn.next_idx += 1;
        let lsn = txn.info.commit_lsn;
        let wanted = match (&self.wanted, checks::split_table(table)) {
            (None, _) => true,
            (Some(wanted), Some((schema, name))) => {
                wanted.contains(&(schema.to_owned(), name.to_owned()))
            }
            (Some(_), None) => false,
        };
        if !wanted {
            return true;
        }
        if self.truncate == OnTruncate::Ignore {
            tracing::warn!(source = %self.ctx.name, table, "table truncated; ignored as configured (the cache may hold rows that no longer exist)");
            return true;
        }
        let body = serde_json::json!({
            "truncate": table,
            "commit_lsn": lsn,
            "commit_idx": idx,
        });
        let payload = Payload::Malformed {
            raw: RawPayload::Body(body.to_string().into_bytes()),
            reason: DecodeError::Invalid(format!(
                "table {table} was truncated; its cached rows may no longer exist (re-warm it)"
            )),
        };
        self.deliver(lsn, idx, payload).await
    }

    async fn deliver(&mut self, lsn: u64, idx: u64, payload: Payload) -> bool {
        let Some(mut permits) = self.ctx.reserve(1).await else {
            return false;
        };
        let Some(permit) = permits.take() else {
            return false;
        };
        self.confirm.row(lsn);
        self.delivered += 1;
        self.ctx
            .deliver(permit, payload, row_id(lsn, idx), &self.settle);
        true
    }
}

/// The connection as a replication URL for pg_walstream (which reads `PGPASSWORD` itself when
/// no password is given).
fn replication_url(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let password = config
        .get_password()
        .map(|p| format!(":{}", encode(&String::from_utf8_lossy(p))))
        .unwrap_or_default();
    let dbname = config.get_dbname().unwrap_or(user);
    format!(
        "postgresql://{}{password}@{}:{port}/{}?replication=database&sslmode=disable",
        encode(user),
        encode(&host),
        encode(dbname)
    )
}

/// Percent-encodes everything but unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Samples the slot's lag into the gauge until shutdown; warns above `bound`, and when the
/// slot is gone.
async fn sample_lag(connect: tokio_postgres::Config, slot: String, bound: u64, ctx: SourceContext) {
    let gauge = ctx
        .metrics()
        .pg_slot_lag_bytes
        .get_or_create(ctx.labels())
        .clone();
    let mut client = None;
    let mut over = false;
    let mut every = Sampler::every(SAMPLE_EVERY);
    while every.tick(&ctx).await {
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            client = checks::connect(&connect).await.ok();
        }
        let Some(c) = client.as_ref() else { continue };
        match checks::slot_lag(c, &slot).await {
            Ok(Some(lag)) => {
                gauge.set(lag);
                let now_over = lag.unsigned_abs() > bound && lag > 0;
                if now_over && !over {
                    tracing::warn!(source = %ctx.name, slot = %slot, lag_bytes = lag, bound_bytes = bound, "the replication slot holds back more WAL than max_slot_lag_bytes; Postgres keeps it until keepwarm confirms it");
                }
                over = now_over;
            }
            Ok(None) => {
                tracing::warn!(source = %ctx.name, slot = %slot, "the replication slot does not exist")
            }
            Err(error) => {
                tracing::debug!(source = %ctx.name, error = %error, "cannot sample the slot's lag")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn the_replication_url_keeps_every_part_encoded() {
        let mut config =
            tokio_postgres::Config::from_str("host=db.internal port=6543 user=kw dbname=shop")
                .unwrap();
        config.password("p@ss word");
        assert_eq!(
            replication_url(&config),
            "postgresql://kw:p%40ss%20word@db.internal:6543/shop?replication=database&sslmode=disable"
        );
    }
}
