//! `keepwarm backfill`: re-warms a cache from a table's current rows, read in primary-key order
//! in chunks (keyset pagination) and handed to the plugins as `read` messages, as Sequin's
//! backfills are: `commit_lsn` and `commit_idx` null, `commit_timestamp` the time of the read,
//! the idempotency key Base64 of `"<backfill id>:<pk…>"`.
//!
//! Consistency with the live stream is the versioned writes' (Sequin's watermark-free rule): a
//! read fills a key only when no change version is stored for it, so a row changed while the
//! backfill runs keeps its newer value, whether the change lands before or after the read.
//! Plain-mode plugins get no such guarantee.
//!
//! Resumable: after every chunk whose rows are all settled, the last primary key is written to
//! a state file (write, then rename); a backfill started again with the same table and filter
//! continues after it. The file is removed when the backfill completes.

use super::change::{Column, Fixed, Relation};
use super::checks::{self, ident, split_table};
use super::config::PostgresSourceConfig;
use super::error::{PostgresError, SetupError};
use super::values::{quoted, write_value};
use crate::delivery::Settle;
use crate::sources::jsonl::Progress;
use crate::sources::{SourceContext, SourceError, Tally};
use base64::Engine as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows per chunk.
const CHUNK: i64 = 1000;

/// What to backfill.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    /// `schema.table`.
    pub table: String,
    /// An SQL condition on the table's rows (`status = 'open'`), trusted as written.
    pub filter: Option<String>,
    /// Where progress is kept between runs.
    pub state: PathBuf,
}

/// What a backfill did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackfillSummary {
    /// Rows read in this run.
    pub rows: u64,
    /// Rows applied, dead-lettered, or taken by no plugin.
    pub done: u64,
    /// Rows abandoned (shutdown while the cache was unavailable): run it again.
    pub abandoned: u64,
    /// Rows per second over the run.
    pub rows_per_second: u64,
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct State {
    id: String,
    table: String,
    filter: Option<String>,
    /// The last primary key whose chunk was settled, as Postgres texts.
    after: Vec<String>,
}

impl State {
    fn new(table: &str, filter: Option<String>) -> State {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        State {
            id: format!("{:x}", now.map_or(0, |d| d.as_nanos())),
            table: table.to_owned(),
            filter,
            after: Vec::new(),
        }
    }
}

/// The state file of `table`'s backfill on slot creation (`backfill_on_create`).
pub(super) fn state_path(config: &PostgresSourceConfig, table: &str) -> PathBuf {
    config
        .backfill_state_dir
        .join(format!(".keepwarm-backfill-{}-{table}.json", config.slot))
}

/// Records that `table` is to be backfilled from its start (unless a backfill of it is already
/// recorded): the source runs what is recorded, and [`run`] removes the file when done.
///
/// # Errors
///
/// The state file cannot be written.
pub(super) fn plan(config: &PostgresSourceConfig, table: &str) -> std::io::Result<()> {
    let path = state_path(config, table);
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&config.backfill_state_dir)?;
    std::fs::write(&path, serde_json::to_vec(&State::new(table, None))?)
}

fn failed(error: PostgresError) -> SourceError {
    SourceError::Client {
        what: "backfill".to_owned(),
        error: Box::new(error),
    }
}

/// Reads the table and feeds every row through the pipeline, then waits until all are settled.
///
/// # Errors
///
/// The database cannot be read, or the state file cannot be written.
pub async fn run(
    config: &PostgresSourceConfig,
    request: &BackfillRequest,
    ctx: SourceContext,
) -> Result<BackfillSummary, SourceError> {
    let connect = config.connect_config()?;
    let client = checks::connect(&connect).await.map_err(failed)?;
    let Some((schema, name)) = split_table(&request.table) else {
        return Err(crate::sources::SourceConfigError::new(
            "table",
            format!("{:?} is not of the form schema.table", request.table),
        )
        .into());
    };
    let qualified = format!("{}.{}", ident(schema), ident(name));
    let oid: u32 = client
        .query_one("SELECT $1::text::regclass::oid", &[&qualified])
        .await
        .map_err(|error| {
            failed(PostgresError::Sql {
                what: format!("find table {}", request.table),
                error,
            })
        })?
        .get(0);
    let columns = client
        .query(
            "SELECT attname::text, atttypid, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(|error| {
            failed(PostgresError::Sql {
                what: "read the columns".into(),
                error,
            })
        })?;
    let types: Vec<(String, u32, String)> = columns
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let pk = checks::primary_key(&client, oid).await.map_err(failed)?;
    if pk.is_empty() {
        // Read in primary-key order, keyed by it.
        return Err(failed(
            SetupError::NoPrimaryKey {
                table: request.table.clone(),
                statement: format!("ALTER TABLE {qualified} ADD PRIMARY KEY (…)"),
            }
            .into(),
        ));
    }
    let relation = Relation {
        schema: schema.to_owned(),
        table: name.to_owned(),
        columns: types
            .iter()
            .map(|(name, oid, _)| Column {
                name: Arc::from(name.as_str()),
                type_oid: *oid,
            })
            .collect(),
        pks: pk
            .iter()
            .filter_map(|p| types.iter().position(|(name, ..)| name == p))
            .collect(),
        full_identity: true,
    };
    let dbname = connect.get_dbname().unwrap_or("postgres");
    let fixed = Fixed::new(
        config.database_name.as_deref().unwrap_or(dbname),
        config.consumer_name.as_deref().unwrap_or(&config.slot),
        dbname,
        "",
    );
    // Resume, or start afresh with a new id.
    let mut state = match std::fs::read(&request.state) {
        Ok(bytes) => serde_json::from_slice::<State>(&bytes)
            .ok()
            .filter(|s| s.table == request.table && s.filter == request.filter),
        Err(_) => None,
    }
    .unwrap_or_else(|| State::new(&request.table, request.filter.clone()));
    if !state.after.is_empty() {
        tracing::info!(table = %request.table, after = ?state.after, "resuming the backfill");
    }
    let select: Vec<String> = types
        .iter()
        .map(|(name, ..)| format!("{}::text", ident(name)))
        .collect();
    // Qualified: a bare name in ORDER BY would sort by the `::text` output column of that name.
    let key_cols: Vec<String> = pk.iter().map(|p| format!("src.{}", ident(p))).collect();
    let key_params: Vec<String> = pk
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ty = types
                .iter()
                .find(|(n, ..)| n == p)
                .map_or("text", |(_, _, ty)| ty.as_str());
            format!("${}::text::{ty}", i + 1)
        })
        .collect();
    let filter = request.filter.as_deref().map(|f| format!("({f})"));
    let count_sql = format!(
        "SELECT count(*) FROM {qualified}{}",
        filter
            .as_deref()
            .map(|f| format!(" WHERE {f}"))
            .unwrap_or_default()
    );
    let total: i64 = client
        .query_one(&count_sql, &[])
        .await
        .map_err(|error| {
            failed(PostgresError::Sql {
                what: "count the rows".into(),
                error,
            })
        })?
        .get(0);
    let progress = Progress::messages(u64::try_from(total).unwrap_or(0));
    let tally = Arc::new(Tally::default());
    let settle: Arc<dyn Settle> = Arc::clone(&tally) as Arc<dyn Settle>;
    let started = Instant::now();
    let mut rows_read = 0u64;
    loop {
        let mut conditions = Vec::new();
        if !state.after.is_empty() {
            conditions.push(format!(
                "({}) > ({})",
                key_cols.join(", "),
                key_params.join(", ")
            ));
        }
        if let Some(f) = &filter {
            conditions.push(f.clone());
        }
        let sql = format!(
            "SELECT {} FROM {qualified} AS src{} ORDER BY {} LIMIT {CHUNK}",
            select.join(", "),
            if conditions.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", conditions.join(" AND "))
            },
            key_cols.join(", "),
        );
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = if state.after.is_empty() {
            Vec::new()
        } else {
            state
                .after
                .iter()
                .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect()
        };
        let rows = client.query(&sql, &params).await.map_err(|error| {
            failed(PostgresError::Sql {
                what: format!("read {}", request.table),
                error,
            })
        })?;
        if rows.is_empty() {
            break;
        }
        let now = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        let mut last = Vec::new();
        let abandoned_before = tally.counts().abandoned;
        for row in &rows {
            let texts: Vec<Option<String>> = (0..types.len()).map(|i| row.get(i)).collect();
            let pks: Vec<String> = relation
                .pks
                .iter()
                .map(|&i| texts[i].clone().unwrap_or_default())
                .collect();
            let json = read_message(&relation, &texts, &pks, &state.id, &now, &fixed);
            let Some(mut permits) = ctx.reserve(1).await else {
                return Ok(summary(&tally, rows_read, started));
            };
            let Some(permit) = permits.take() else { break };
            rows_read += 1;
            ctx.deliver(
                permit,
                ctx.decode_json(json.as_bytes()),
                format!("{}:{}", request.table, pks.join(":")),
                &settle,
            );
            last = pks;
        }
        // The chunk is settled before its end is remembered, so a crash re-reads at most it.
        tally
            .wait_settled(rows_read, Duration::from_millis(500), |counts| {
                progress.update(counts.finished(), rows_read, counts.finished());
            })
            .await;
        if tally.counts().abandoned > abandoned_before {
            // A row of the chunk was left unapplied (shutdown while the cache was down): the
            // state keeps the chunk's start, so that a rerun reads it again.
            break;
        }
        state.after = last;
        save(&request.state, &state)?;
        log_rate(&request.table, rows_read, started, total);
        if ctx.shutdown.is_cancelled() || (rows.len() as i64) < CHUNK {
            break;
        }
    }
    progress.finish();
    let summary = summary(&tally, rows_read, started);
    if summary.abandoned == 0 && !ctx.shutdown.is_cancelled() {
        let _ = std::fs::remove_file(&request.state);
    }
    Ok(summary)
}

fn summary(tally: &Tally, rows: u64, started: Instant) -> BackfillSummary {
    let counts = tally.counts();
    let seconds = started.elapsed().as_secs_f64().max(1e-3);
    BackfillSummary {
        rows,
        done: counts.finished(),
        abandoned: counts.abandoned,
        rows_per_second: (rows as f64 / seconds) as u64,
    }
}

fn log_rate(table: &str, rows: u64, started: Instant, total: i64) {
    let seconds = started.elapsed().as_secs_f64().max(1e-3);
    let rate = rows as f64 / seconds;
    let left = (total as f64 - rows as f64).max(0.0);
    let eta = if rate > 0.0 { left / rate } else { 0.0 };
    tracing::info!(
        table,
        rows,
        total,
        rows_per_second = rate as u64,
        eta_seconds = eta as u64,
        "backfill progress"
    );
}

fn save(path: &PathBuf, state: &State) -> Result<(), SourceError> {
    let tmp = path.with_extension("tmp");
    let write = |error| SourceError::Read {
        what: format!("backfill state {}", path.display()),
        error,
    };
    let text = serde_json::to_vec(state).unwrap_or_default();
    std::fs::write(&tmp, text).map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}

/// A `read` message as Sequin's backfills write it.
fn read_message(
    relation: &Relation,
    texts: &[Option<String>],
    pks: &[String],
    id: &str,
    now: &str,
    fixed: &Fixed,
) -> String {
    let mut record = String::from("{");
    for (i, (column, text)) in relation.columns.iter().zip(texts).enumerate() {
        if i > 0 {
            record.push(',');
        }
        record.push_str(&quoted(&column.name));
        record.push(':');
        match text {
            Some(text) => write_value(&mut record, column.type_oid, text),
            None => record.push_str("null"),
        }
    }
    record.push('}');
    let key = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{}", pks.join(":")));
    let record_pks: Vec<String> = pks.iter().map(|p| quoted(p)).collect();
    format!(
        r#"{{"record":{record},"changes":null,"action":"read","metadata":{{"table_schema":{},"table_name":{},"commit_timestamp":"{now}","commit_lsn":null,"commit_idx":null,"transaction_annotations":null,"idempotency_key":"{key}","record_pks":[{}],"enrichment":null,{}}}}}"#,
        quoted(&relation.schema),
        quoted(&relation.table),
        record_pks.join(","),
        fixed.json
    )
}
