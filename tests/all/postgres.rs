//! The Postgres source against a real logical-replication cluster (`postgres/cluster.rs`):
//! every mapped type reaches a plugin as Sequin would have written it, and so does the whole
//! message (metadata, annotations, `changes`, `unchanged_toast`); inserts, updates and deletes
//! reach the cache; a TRUNCATE is a dead letter; a start-up check says what to change; a cut
//! stream is reopened, a dropped slot stops the source; a `kill -9` loses nothing; a backfill
//! racing live writes ends at the table's state and resumes after its last chunk; and the model
//! test puts all of it together.

mod cluster;
mod refusals;

use crate::util::{KeepwarmProcess, Keys, PATIENCE, TempDir, TestEnv, plugin_wasm, wait_for};
use base64::Engine as _;
use cluster::cluster;
use serde_json::{Value, json};
use std::time::Duration;
use tokio_postgres::Client;

/// A test's database, with the row-cache plugin writing below the env's prefix.
struct Pg {
    env: TestEnv,
    database: String,
    client: Client,
    slot: String,
}

impl Pg {
    async fn new(name: &str, schema: &str) -> Pg {
        Pg::with_env(TestEnv::row_cache(name), name, schema).await
    }

    async fn with_env(env: TestEnv, name: &str, schema: &str) -> Pg {
        let database = cluster().database(name).await;
        let client = cluster().connect(&database).await;
        client.batch_execute(schema).await.unwrap();
        Pg {
            slot: format!("{database}_slot"),
            env,
            database,
            client,
        }
    }

    /// The source's lines: keepwarm creates the publication (for `tables`) and the slot.
    fn source(&self, tables: &str) -> String {
        format!(
            "connection = \"{}\"\npublication = \"kw\"\nslot = \"{}\"\ntables = [{tables}]\n\
             create_publication = true\n",
            cluster().url(&self.database),
            self.slot
        )
    }

    /// Waits until a walsender streams from the slot: changes committed from then on reach
    /// keepwarm. (A slot is listed while it is still being created, before its consistent
    /// point; a change committed then is not decoded.)
    async fn wait_slot(&self) {
        wait_for("the replication stream", PATIENCE, || async {
            self.client
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r
                     ON r.pid = s.active_pid WHERE s.slot_name = $1",
                    &[&self.slot],
                )
                .await
                .unwrap()
                .is_some()
        })
        .await;
    }

    /// The daemon's config with one Postgres source on `tables`, written into `dir`.
    fn config_file(&self, dir: &TempDir, tables: &str) -> String {
        self.env
            .config()
            .source("postgres", &self.source(tables))
            .write(dir, "keepwarm.toml")
    }

    /// `keepwarm backfill` of `public.<table>` with `config`, progress in `state`, plus `extra`
    /// arguments: its success, stdout and stderr.
    async fn backfill(
        config: &str,
        table: &str,
        state: &str,
        extra: &[&str],
    ) -> (bool, String, String) {
        let table = format!("public.{table}");
        let mut args = vec![
            "backfill", "--config", config, "--table", &table, "--state", state,
        ];
        args.extend_from_slice(extra);
        crate::util::keepwarm_cli_async(&args).await
    }

    /// Waits until the cache holds every row of `items (id, n, label)` exactly; returns the
    /// rows' keys.
    async fn wait_items_cached(&self) -> std::collections::HashSet<String> {
        let rows = self
            .client
            .query("SELECT id, n, label FROM items", &[])
            .await
            .unwrap();
        let mut live = std::collections::HashSet::new();
        for row in &rows {
            let (id, n, label): (i32, i32, String) = (row.get(0), row.get(1), row.get(2));
            let key = self.key("items", &id.to_string());
            let expect = json!({"id": id, "n": n, "label": label});
            self.wait_record(&key, |r| *r == expect).await;
            live.insert(key);
        }
        live
    }

    fn key(&self, table: &str, pks: &str) -> String {
        self.env.key(&format!("public.{table}:{pks}"))
    }

    /// Waits until the cache holds `key` with a record satisfying `check`; returns it.
    async fn wait_record(&self, key: &str, check: impl Fn(&Value) -> bool) -> Value {
        let keys = Keys::connect(self.env.cache_url()).await;
        let mut last = None;
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(text) = keys.get(key).await {
                let value: Value = serde_json::from_str(&text).unwrap();
                if check(&value) {
                    return value;
                }
                last = Some(value);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {key}; last seen {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_gone(&self, key: &str) {
        let keys = Keys::connect(self.env.cache_url()).await;
        wait_for(&format!("{key} to be deleted"), PATIENCE, || async {
            keys.get(key).await.is_none()
        })
        .await;
    }
}

/// `keepwarm run` with `config`, once it streams.
fn streaming(config: &str) -> KeepwarmProcess {
    let mut daemon = KeepwarmProcess::spawn(&["run", "--config", config]);
    daemon.wait_log("streaming changes", PATIENCE);
    daemon
}

const TYPES: &str = "
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE types (
    id int PRIMARY KEY,
    small int2, big int8, flag bool, price numeric(10,2), tiny numeric, ratio float8, single float4,
    nan float8, name text, code varchar(10), fixed char(3), uid uuid, doc json, docb jsonb,
    blob bytea, day date, clock time, clocktz timetz, at timestamp, attz timestamptz,
    span interval, ints int4[], texts text[], grid int4[][], prices numeric[], addr inet,
    cash money, feeling mood, nothing text
);";

#[tokio::test]
async fn every_mapped_type_reaches_the_plugin_as_sequin_writes_it() {
    let pg = Pg::new("kw-pg-types", TYPES).await;
    let daemon = pg
        .env
        .config()
        .source("postgres", &pg.source("\"public.types\""))
        .run();
    pg.wait_slot().await;
    pg.client
        .batch_execute(
            r#"INSERT INTO types VALUES (
            1, 12, 9007199254740993, true, 149.90, 0.0000001, 1.25, 1.5,
            'NaN', 'naïve "quoted" ✓', 'v', 'ab', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
            '{"a": 1}', '{"b": [1, 2.50]}', '\xdeadbeef', '2026-12-02', '06:13:42.123',
            '06:13:42+02', '2026-12-02 06:13:42.5', '2026-12-02 06:13:42.123456+05:30',
            '1 year 2 mons 3 days 04:05:06.5', '{1,NULL,3}', '{"a b",c}', '{{1,2},{3,4}}',
            '{1.50,0.0000001}', '10.0.0.1', 1234.56, 'happy', NULL)"#,
        )
        .await
        .unwrap();
    let record = pg.wait_record(&pg.key("types", "1"), |_| true).await;
    let expect = json!({
        "id": 1, "small": 12, "big": 9007199254740993u64, "flag": true, "price": "149.90",
        "tiny": "1E-7", "ratio": 1.25, "single": 1.5, "nan": "NaN", "name": "naïve \"quoted\" ✓",
        "code": "v", "fixed": "ab ", "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "doc": {"a": 1}, "docb": {"b": [1, 2.50]}, "blob": "\\xdeadbeef", "day": "2026-12-02",
        "clock": "06:13:42", "clocktz": "06:13:42", "at": "2026-12-02T06:13:42.500000",
        "attz": "2026-12-02T00:43:42.123456Z",
        "span": {"months": 14, "days": 3, "microseconds": 14_706_500_000u64},
        "ints": [1, null, 3], "texts": ["a b", "c"], "grid": [[1, 2], [3, 4]],
        "prices": ["1.50", "1E-7"], "addr": "10.0.0.1", "cash": "$1,234.56", "feeling": "happy",
        "nothing": null,
    });
    for (column, value) in expect.as_object().unwrap() {
        assert_eq!(&record[column], value, "column {column}");
    }
    assert_eq!(
        record.as_object().unwrap().len(),
        expect.as_object().unwrap().len()
    );
    daemon.stop().await;
}

#[tokio::test]
async fn inserts_updates_and_deletes_reach_the_cache_and_a_truncate_is_a_dead_letter() {
    let pg = Pg::new(
        "kw-pg-crud",
        "CREATE TABLE orders (id int PRIMARY KEY, status text, note text);
         CREATE TABLE other (id int PRIMARY KEY);
         CREATE PUBLICATION kw FOR TABLE orders, other;",
    )
    .await;
    let daemon = pg
        .env
        .config()
        .source("postgres", &pg.source("\"public.orders\""))
        .run();
    pg.wait_slot().await;
    pg.client
        .batch_execute(
            "INSERT INTO orders VALUES (1, 'new', 'a'), (2, 'new', 'b');
             INSERT INTO other VALUES (1);
             BEGIN; UPDATE orders SET status = 'paid' WHERE id = 1; DELETE FROM orders WHERE id = 2; COMMIT;",
        )
        .await
        .unwrap();
    let one = pg
        .wait_record(&pg.key("orders", "1"), |r| r["status"] == "paid")
        .await;
    assert_eq!(one, json!({"id": 1, "status": "paid", "note": "a"}));
    pg.wait_gone(&pg.key("orders", "2")).await;
    // A table outside `tables` never reaches the plugin, even in the same publication.
    let keys = Keys::connect(pg.env.cache_url()).await;
    assert_eq!(keys.get(&pg.key("other", "1")).await, None);

    pg.client.batch_execute("TRUNCATE orders").await.unwrap();
    wait_for("the truncate's dead letter", PATIENCE, || async {
        !keys.dead_letters(&pg.env.dead).await.is_empty()
    })
    .await;
    let letters = keys.dead_letters(&pg.env.dead).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let text = format!("{:?}", letters[0]);
    assert!(text.contains("public.orders was truncated"), "{text}");
    // The stream goes on after the truncate.
    pg.client
        .batch_execute("INSERT INTO orders VALUES (3, 'new', 'c')")
        .await
        .unwrap();
    pg.wait_record(&pg.key("orders", "3"), |_| true).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_delete_that_lacks_its_primary_key_is_a_dead_letter_saying_why() {
    // The replica identity is another unique index: a delete's old row carries `code` only.
    let pg = Pg::new(
        "kw-pg-ident",
        "CREATE TABLE items (id int PRIMARY KEY, code text NOT NULL UNIQUE, n int);
         ALTER TABLE items REPLICA IDENTITY USING INDEX items_code_key;",
    )
    .await;
    let daemon = pg
        .env
        .config()
        .source("postgres", &pg.source("\"public.items\""))
        .run();
    pg.wait_slot().await;
    pg.client
        .batch_execute("INSERT INTO items VALUES (1, 'a', 0)")
        .await
        .unwrap();
    pg.wait_record(&pg.key("items", "1"), |_| true).await;
    pg.client
        .batch_execute("DELETE FROM items WHERE id = 1")
        .await
        .unwrap();
    let keys = Keys::connect(pg.env.cache_url()).await;
    wait_for("the delete's dead letter", PATIENCE, || async {
        !keys.dead_letters(&pg.env.dead).await.is_empty()
    })
    .await;
    let letters = keys.dead_letters(&pg.env.dead).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let text = format!("{:?}", letters[0]);
    assert!(
        text.contains("the delete of public.items carries no value for its primary key column id"),
        "{text}"
    );
    daemon.stop().await;
}

/// A partitioned table streams under its own name (keepwarm creates the publication with
/// `publish_via_partition_root`), and a publication that would stream its partitions under
/// theirs is refused with the statement that fixes it.
#[tokio::test]
async fn a_partitioned_table_streams_under_its_own_name() {
    const EVENTS: &str =
        "CREATE TABLE events (id int PRIMARY KEY, note text) PARTITION BY RANGE (id);
         CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (0) TO (100);
         CREATE TABLE events_high PARTITION OF events FOR VALUES FROM (100) TO (1000);";
    let pg = Pg::new("kw-pg-part", EVENTS).await;
    let daemon = pg
        .env
        .config()
        .source("postgres", &pg.source("\"public.events\""))
        .run();
    pg.wait_slot().await;
    pg.client
        .batch_execute("INSERT INTO events VALUES (1, 'low'), (500, 'high')")
        .await
        .unwrap();
    let low = pg.wait_record(&pg.key("events", "1"), |_| true).await;
    assert_eq!(low, json!({"id": 1, "note": "low"}));
    pg.wait_record(&pg.key("events", "500"), |r| r["note"] == "high")
        .await;
    daemon.stop().await;

    let leaves = Pg::new(
        "kw-pg-leaves",
        &format!("{EVENTS}\nCREATE PUBLICATION kw FOR TABLE events;"),
    )
    .await;
    let dir = TempDir::new("kw-pg-leaves");
    let config = leaves.config_file(&dir, "\"public.events\"");
    let mut refused = KeepwarmProcess::spawn(&["run", "--config", &config]);
    assert!(!refused.wait_exit(PATIENCE).success());
    let log = refused.log.join("\n");
    assert!(
        log.contains("ALTER PUBLICATION \"kw\" SET (publish_via_partition_root = true)"),
        "{log}"
    );
}

/// `backfill_on_create`: the rows already in the table when keepwarm creates its slot are
/// backfilled beside the stream (versioned: a backfill read never overwrites a change), and the
/// backfill's state file is removed once it is done.
#[tokio::test]
async fn a_slot_created_by_keepwarm_backfills_the_rows_already_there() {
    let pg = Pg::new(
        "kw-pg-warm",
        "CREATE TABLE orders (id int PRIMARY KEY, status text);
         INSERT INTO orders SELECT g, 'old' FROM generate_series(1, 2500) g;",
    )
    .await;
    let dir = TempDir::new("kw-pg-warm");
    let source = format!(
        "{}backfill_on_create = true\nbackfill_state_dir = \"{}\"\n",
        pg.source("\"public.orders\""),
        dir.path().display()
    );
    let state = dir
        .path()
        .join(format!(".keepwarm-backfill-{}-public.orders.json", pg.slot));
    let daemon = pg.env.config().source("postgres", &source).run();
    pg.wait_slot().await;
    pg.client
        .batch_execute("UPDATE orders SET status = 'new' WHERE id = 2400")
        .await
        .unwrap();
    pg.wait_record(&pg.key("orders", "1"), |r| r["status"] == "old")
        .await;
    pg.wait_record(&pg.key("orders", "2500"), |r| r["status"] == "old")
        .await;
    wait_for(
        "the backfill's state file to be removed",
        PATIENCE,
        || async { !state.exists() },
    )
    .await;
    // The change made while the backfill ran is what the cache keeps.
    pg.wait_record(&pg.key("orders", "2400"), |r| r["status"] == "new")
        .await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_missing_publication_stops_the_daemon_with_the_statement_to_run() {
    let pg = Pg::new("kw-pg-check", "CREATE TABLE orders (id int PRIMARY KEY);").await;
    let dir = TempDir::new("kw-pg-check");
    let source = pg
        .source("\"public.orders\"")
        .replace("create_publication = true", "");
    let config = pg
        .env
        .config()
        .source("postgres", &source)
        .write(&dir, "keepwarm.toml");
    let mut daemon = KeepwarmProcess::spawn(&["run", "--config", &config]);
    let status = daemon.wait_exit(PATIENCE);
    assert!(!status.success());
    let log = daemon.log.join("\n");
    assert!(
        log.contains("CREATE PUBLICATION \"kw\" FOR TABLE \"public\".\"orders\""),
        "{log}"
    );
}

#[tokio::test]
async fn a_kill_9_and_a_restart_lose_nothing() {
    let pg = Pg::new(
        "kw-pg-kill",
        "CREATE TABLE items (id int PRIMARY KEY, n int);",
    )
    .await;
    let dir = TempDir::new("kw-pg-kill");
    let config = pg.config_file(&dir, "\"public.items\"");
    let mut first = streaming(&config);
    // Many small transactions, some applied and confirmed before the kill, some in flight.
    for i in 0..200 {
        pg.client
            .execute("INSERT INTO items VALUES ($1, 0)", &[&i])
            .await
            .unwrap();
    }
    pg.wait_record(&pg.key("items", "20"), |_| true).await;
    first.signal("KILL");
    first.wait_exit(PATIENCE);
    // Written while keepwarm is down.
    pg.client
        .batch_execute(
            "UPDATE items SET n = id * 2 WHERE id % 3 = 0; DELETE FROM items WHERE id % 7 = 1;",
        )
        .await
        .unwrap();
    let mut second = streaming(&config);
    let keys = Keys::connect(pg.env.cache_url()).await;
    for i in 0..200 {
        let key = pg.key("items", &i.to_string());
        if i % 7 == 1 {
            pg.wait_gone(&key).await;
            continue;
        }
        let n = if i % 3 == 0 { i * 2 } else { 0 };
        pg.wait_record(&key, |r| r["n"] == n).await;
    }
    assert!(keys.get(&pg.key("items", "200")).await.is_none());
    second.signal("TERM");
    assert!(second.wait_exit(PATIENCE).success());
}

#[tokio::test]
async fn the_slot_confirms_wal_of_tables_it_does_not_stream() {
    let pg = Pg::new(
        "kw-pg-idle",
        "CREATE TABLE items (id int PRIMARY KEY, n int); CREATE TABLE other (id int PRIMARY KEY, n int);",
    )
    .await;
    let dir = TempDir::new("kw-pg-idle");
    // The publication carries `items` only.
    let config = pg.config_file(&dir, "\"public.items\"");
    let mut daemon = streaming(&config);
    pg.wait_slot().await;
    pg.client
        .execute("INSERT INTO items VALUES (1, 0)", &[])
        .await
        .unwrap();
    pg.wait_record(&pg.key("items", "1"), |_| true).await;
    // WAL the publication does not carry: Postgres sends keepalives, no change. The slot must
    // still confirm past it, or it holds that WAL on disk for good.
    pg.client
        .batch_execute("INSERT INTO other SELECT g, g FROM generate_series(1, 1000) g")
        .await
        .unwrap();
    let written: String = pg
        .client
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_for(
        "the slot to confirm the other table's WAL",
        PATIENCE,
        || async {
            pg.client
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots
                     WHERE slot_name = $2",
                    &[&written, &pg.slot],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        },
    )
    .await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(PATIENCE).success());
}

/// The whole message a plugin sees, read back from the dead letter of a plugin that rejects every
/// change (row-cache with a key naming a column that is always null).
async fn seen_messages(pg: &Pg, n: usize) -> Vec<Value> {
    let keys = Keys::connect(pg.env.cache_url()).await;
    wait_for("the probe's dead letters", PATIENCE, || async {
        keys.dead_letters(&pg.env.dead).await.len() >= n
    })
    .await;
    keys.dead_letters(&pg.env.dead)
        .await
        .iter()
        .map(|letter| serde_json::from_str(&letter.field("payload")).unwrap())
        .collect()
}

#[tokio::test]
async fn the_message_a_plugin_sees_is_sequins_change_message() {
    let env = TestEnv::new("kw-pg-meta");
    let manifest = format!("[config]\nkey = \"{}:probe:{{nothing}}\"\n", env.prefix);
    env.add_plugin("probe", &plugin_wasm("row-cache"), &manifest);
    let pg = Pg::with_env(
        env,
        "kw-pg-meta",
        "CREATE TABLE orders (id int PRIMARY KEY, status text, nothing text);
         ALTER TABLE orders REPLICA IDENTITY FULL;
         CREATE TABLE docs (id int PRIMARY KEY, title text, body text, nothing text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
    )
    .await;
    let daemon = pg
        .env
        .config()
        .source("postgres", &pg.source("\"public.orders\", \"public.docs\""))
        .run();
    pg.wait_slot().await;
    pg.client
        .batch_execute(
            r#"BEGIN;
            SELECT pg_logical_emit_message(true, 'sequin:transaction_annotations.set', '{"request_id": "r1"}');
            INSERT INTO orders VALUES (1, 'new', NULL);
            UPDATE orders SET status = 'paid' WHERE id = 1;
            DELETE FROM orders WHERE id = 1;
            COMMIT;"#,
        )
        .await
        .unwrap();
    let seen = seen_messages(&pg, 3).await;
    let lsn = seen[0]["metadata"]["commit_lsn"].as_u64().unwrap();
    for (at, (action, record, changes)) in [
        (
            "insert",
            json!({"id": 1, "status": "new", "nothing": null}),
            Value::Null,
        ),
        (
            "update",
            json!({"id": 1, "status": "paid", "nothing": null}),
            json!({"status": "new"}),
        ),
        (
            "delete",
            json!({"id": 1, "status": "paid", "nothing": null}),
            Value::Null,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let message = &seen[at];
        assert_eq!(message.as_object().unwrap().len(), 4, "{message}");
        assert_eq!(message["action"], action);
        assert_eq!(message["record"], record, "{action}");
        assert_eq!(message["changes"], changes, "{action}");
        let meta = &message["metadata"];
        assert_eq!(meta.as_object().unwrap().len(), 12, "{meta}");
        assert_eq!(meta["table_schema"], "public");
        assert_eq!(meta["table_name"], "orders");
        assert_eq!(meta["commit_lsn"], lsn, "one commit LSN per transaction");
        // The annotation's logical message took index 0.
        let idx = at as u64 + 1;
        assert_eq!(meta["commit_idx"], idx);
        let key = base64::engine::general_purpose::STANDARD.encode(format!("{lsn}:{idx}"));
        assert_eq!(meta["idempotency_key"], key);
        assert_eq!(meta["record_pks"], json!(["1"]));
        assert_eq!(meta["transaction_annotations"], json!({"request_id": "r1"}));
        assert_eq!(meta["enrichment"], Value::Null);
        assert_eq!(meta["database_name"], pg.database.as_str());
        assert_eq!(meta["database"]["database"], pg.database.as_str());
        assert_eq!(meta["consumer"]["name"], pg.slot.as_str());
        let at = meta["commit_timestamp"].as_str().unwrap();
        assert!(
            at.len() == 27 && at.ends_with('Z') && at.as_bytes()[19] == b'.',
            "{at}"
        );
    }

    // Default identity: an update that leaves a TOASTed column alone does not carry it.
    let body: String = (0..1000).map(|i| format!("{:x}", i * 7919)).collect();
    pg.client
        .execute("INSERT INTO docs VALUES (1, 'a', $1, NULL)", &[&body])
        .await
        .unwrap();
    pg.client
        .batch_execute("UPDATE docs SET title = 'b' WHERE id = 1")
        .await
        .unwrap();
    let seen = seen_messages(&pg, 5).await;
    assert_eq!(seen[3]["record"]["body"], body.as_str());
    assert_eq!(seen[4]["action"], "update");
    assert_eq!(seen[4]["record"]["title"], "b");
    assert_eq!(seen[4]["record"]["body"], "unchanged_toast");
    assert_eq!(seen[4]["changes"], json!({}));
    assert_eq!(seen[4]["metadata"]["transaction_annotations"], Value::Null);
    assert_eq!(seen[4]["metadata"]["commit_idx"], 0);
    daemon.stop().await;
}

/// Ends the walsender streaming from the slot, as a network cut or a Postgres restart would.
async fn cut_the_stream(pg: &Pg) {
    let ended: bool = pg
        .client
        .query_one(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&pg.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ended);
}

async fn ready(daemon: &crate::util::Daemon) -> u16 {
    crate::util::http_get(&daemon.admin_url("/readyz"))
        .await
        .map_or(0, |(status, _)| status)
}

#[tokio::test]
async fn a_table_without_a_primary_key_is_skipped_when_every_table_streams() {
    // `tables = []` streams the whole publication (FOR ALL TABLES). A table created later
    // without a primary key is skipped: no dead letter per change, and a reconnect (whose
    // checks see it) does not stop the source.
    let pg = Pg::new(
        "kw-pg-nokey",
        "CREATE TABLE items (id int PRIMARY KEY, n int); CREATE PUBLICATION kw FOR ALL TABLES;",
    )
    .await;
    let daemon = pg.env.config().source("postgres", &pg.source("")).run();
    pg.wait_slot().await;
    pg.client
        .batch_execute(
            "CREATE TABLE nokey (n int); INSERT INTO nokey VALUES (1);
             INSERT INTO items VALUES (1, 1);",
        )
        .await
        .unwrap();
    pg.wait_record(&pg.key("items", "1"), |_| true).await;
    cut_the_stream(&pg).await;
    pg.client
        .batch_execute("INSERT INTO nokey VALUES (2); INSERT INTO items VALUES (2, 2);")
        .await
        .unwrap();
    pg.wait_record(&pg.key("items", "2"), |_| true).await;
    daemon.stop().await;
    let keys = Keys::connect(pg.env.cache_url()).await;
    assert!(keys.dead_letters(&pg.env.dead).await.is_empty());
}

#[tokio::test]
async fn a_cut_stream_is_reopened_and_nothing_is_lost() {
    let pg = Pg::new(
        "kw-pg-cut",
        "CREATE TABLE items (id int PRIMARY KEY, n int);",
    )
    .await;
    let daemon = pg
        .env
        .config()
        .admin()
        .source("postgres", &pg.source("\"public.items\""))
        .run();
    pg.wait_slot().await;
    pg.client
        .batch_execute("INSERT INTO items VALUES (1, 1)")
        .await
        .unwrap();
    pg.wait_record(&pg.key("items", "1"), |_| true).await;
    cut_the_stream(&pg).await;
    // Committed while keepwarm reconnects.
    pg.client
        .batch_execute("INSERT INTO items VALUES (2, 2); UPDATE items SET n = 10 WHERE id = 1")
        .await
        .unwrap();
    pg.wait_record(&pg.key("items", "2"), |_| true).await;
    pg.wait_record(&pg.key("items", "1"), |r| r["n"] == 10)
        .await;
    wait_for("/readyz to be ready again", PATIENCE, || async {
        ready(&daemon).await == 200
    })
    .await;
    // The slot's lag is sampled into a gauge.
    let source = format!("postgres:{}", pg.slot);
    wait_for("the slot lag gauge", PATIENCE, || async {
        let Some((_, text)) = crate::util::http_get(&daemon.admin_url("/metrics")).await else {
            return false;
        };
        let lag = crate::util::metric(
            &text,
            "keepwarm_postgres_slot_lag_bytes",
            &[("source", &source)],
        );
        lag.is_some_and(|bytes| bytes >= 0.0)
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_dropped_slot_stops_the_source_with_a_clear_error_and_readyz_says_not_ready() {
    let pg = Pg::new("kw-pg-drop", "CREATE TABLE items (id int PRIMARY KEY);").await;
    let dir = TempDir::new("kw-pg-drop");
    let admin = format!("127.0.0.1:{}", crate::util::free_port());
    let config = pg
        .env
        .config()
        .set("admin", &format!("listen = \"{admin}\""))
        .source("postgres", &pg.source("\"public.items\""))
        .write(&dir, "keepwarm.toml");
    let mut daemon = streaming(&config);
    let readyz = format!("http://{admin}/readyz");
    wait_for("/readyz to be ready", PATIENCE, || async {
        crate::util::http_get(&readyz).await.map(|r| r.0) == Some(200)
    })
    .await;
    // The slot can only be dropped while no walsender holds it; keepwarm reconnects quickly.
    wait_for("the slot to be dropped", PATIENCE, || async {
        let _ = pg
            .client
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&pg.slot],
            )
            .await;
        pg.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&pg.slot])
            .await
            .is_ok()
    })
    .await;
    let line = daemon.wait_log("source failed", PATIENCE);
    assert!(
        line.contains("was dropped while keepwarm was streaming"),
        "{line}"
    );
    assert_eq!(crate::util::http_get(&readyz).await.map(|r| r.0), Some(503));
    // Never re-created behind the user's back.
    let slot = pg
        .client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&pg.slot],
        )
        .await
        .unwrap();
    assert!(slot.is_none());
    daemon.signal("TERM");
    daemon.wait_exit(PATIENCE);
}

#[tokio::test]
async fn a_backfill_racing_live_writes_ends_with_the_tables_final_state() {
    // Rows written before keepwarm ever streamed: only a backfill brings them.
    let pg = Pg::new(
        "kw-pg-backfill",
        "CREATE TABLE items (id int PRIMARY KEY, n int, label text);
         INSERT INTO items SELECT i, 0, 'old' FROM generate_series(1, 3000) i;",
    )
    .await;
    let dir = TempDir::new("kw-pg-backfill");
    let config = pg.config_file(&dir, "\"public.items\"");
    let mut stream = streaming(&config);
    let state = dir.path().join("backfill.json").display().to_string();
    let backfill = Pg::backfill(&config, "items", &state, &[]);
    // Live changes while the backfill reads: updates, deletes and inserts.
    let writes = async {
        for i in (1..=3000).step_by(50) {
            pg.client
                .batch_execute(&format!(
                    "UPDATE items SET n = n + 1, label = 'new' WHERE id = {i};
                     DELETE FROM items WHERE id = {};
                     INSERT INTO items VALUES ({}, 7, 'inserted');",
                    i + 1,
                    10_000 + i
                ))
                .await
                .unwrap();
        }
    };
    let ((ok, _, stderr), ()) = tokio::join!(backfill, writes);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("backfilled"), "{stderr}");
    assert!(
        !std::path::Path::new(&state).exists(),
        "a finished backfill leaves no state"
    );
    // The cache equals the table.
    let live = pg.wait_items_cached().await;
    let keys = Keys::connect(pg.env.cache_url()).await;
    let cached: std::collections::HashSet<String> = keys
        .matching(&format!("{}:public.items:*", pg.env.prefix))
        .await
        .into_iter()
        .collect();
    assert_eq!(cached, live);
    stream.signal("TERM");
    assert!(stream.wait_exit(PATIENCE).success());
}

#[tokio::test]
async fn a_backfill_resumes_after_its_last_settled_chunk() {
    let pg = Pg::new(
        "kw-pg-resume",
        "CREATE TABLE items (id int PRIMARY KEY, n int);
         INSERT INTO items SELECT i, i FROM generate_series(1, 2500) i;",
    )
    .await;
    let dir = TempDir::new("kw-pg-resume");
    let config = pg.config_file(&dir, "\"public.items\"");
    // What an interrupted run left: its chunks up to id 1500 were settled.
    let state = dir.write(
        "backfill.json",
        r#"{"id":"b1","table":"public.items","filter":null,"after":["1500"]}"#,
    );
    let (ok, _, stderr) = Pg::backfill(&config, "items", &state, &["--where", "n <> 2000"]).await;
    // Another filter is another backfill: it starts from the beginning.
    assert!(ok, "{stderr}");
    assert!(stderr.contains("backfilled 2499 rows"), "{stderr}");
    let keys = Keys::connect(pg.env.cache_url()).await;
    keys.query::<()>(redis::cmd("DEL").arg(pg.key("items", "1")))
        .await;
    let state = dir.write(
        "backfill.json",
        r#"{"id":"b1","table":"public.items","filter":null,"after":["1500"]}"#,
    );
    let (ok, _, stderr) = Pg::backfill(&config, "items", &state, &[]).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("backfilled 1000 rows"), "{stderr}");
    // Rows after the saved key were read; row 1 (before it) was not read again.
    assert!(keys.get(&pg.key("items", "1")).await.is_none());
    let record: Value =
        serde_json::from_str(&keys.get(&pg.key("items", "2500")).await.unwrap()).unwrap();
    assert_eq!(record, json!({"id": 2500, "n": 2500}));
}

/// A small deterministic generator (no dependency): the same history on every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// The model test: random multi-row transactions while keepwarm streams, a backfill racing
/// them, a `kill -9` in the middle and a restart; at the end the cache is the table.
#[tokio::test]
async fn random_writes_a_racing_backfill_and_a_kill_9_end_with_the_cache_equal_to_the_table() {
    let pg = Pg::new(
        "kw-pg-model",
        "CREATE TABLE items (id int PRIMARY KEY, n int, label text);
         ALTER TABLE items REPLICA IDENTITY FULL;
         INSERT INTO items SELECT i, 0, 'seed' FROM generate_series(1, 400) i;",
    )
    .await;
    let dir = TempDir::new("kw-pg-model");
    let config = pg.config_file(&dir, "\"public.items\"");
    let mut daemon = streaming(&config);
    let state = dir.path().join("backfill.json").display().to_string();
    let backfill = Pg::backfill(&config, "items", &state, &[]);
    let mut rng = Lcg(19);
    let mut history = |count: usize| {
        (0..count)
            .map(|_| {
                let statements: Vec<String> = (0..1 + rng.below(4))
                    .map(|_| {
                        let id = 1 + rng.below(600);
                        match rng.below(3) {
                            0 => format!(
                                "INSERT INTO items VALUES ({id}, {}, 'ins') ON CONFLICT (id) DO UPDATE SET n = excluded.n, label = 'upsert'",
                                rng.below(1000)
                            ),
                            1 => format!("UPDATE items SET n = n + 1, label = 'upd' WHERE id = {id}"),
                            _ => format!("DELETE FROM items WHERE id = {id}"),
                        }
                    })
                    .collect();
                format!("BEGIN; {}; COMMIT;", statements.join("; "))
            })
            .collect::<Vec<_>>()
    };
    let first = history(300);
    let second = history(300);
    let writes = async {
        for txn in &first {
            pg.client.batch_execute(txn).await.unwrap();
        }
    };
    let ((ok, _, stderr), ()) = tokio::join!(backfill, writes);
    assert!(ok, "{stderr}");
    daemon.signal("KILL");
    daemon.wait_exit(PATIENCE);
    for txn in &second[..150] {
        pg.client.batch_execute(txn).await.unwrap();
    }
    let mut daemon = streaming(&config);
    for txn in &second[150..] {
        pg.client.batch_execute(txn).await.unwrap();
    }
    let live = pg.wait_items_cached().await;
    let keys = Keys::connect(pg.env.cache_url()).await;
    let pattern = format!("{}:public.items:*", pg.env.prefix);
    wait_for("deleted rows to leave the cache", PATIENCE, || async {
        keys.matching(&pattern)
            .await
            .iter()
            .all(|k| live.contains(k))
    })
    .await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(PATIENCE).success());
}
