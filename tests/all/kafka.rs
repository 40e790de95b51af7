//! The Kafka source against a real Kafka-protocol broker (Tansu): messages written as Sequin's
//! Kafka sink writes them (the row's key, the change message as the value, one row per
//! partition), offsets committed only for what is applied, rebalances and a SIGKILL without
//! loss, malformed values dead-lettered.

pub mod broker;

use crate::util::*;
pub use broker::{PrivateBroker, Record, Topic};
use std::time::Duration;

/// The update of order `row` to status `v<version>`, as a record of a topic of `partitions`.
fn change(row: u64, version: u64, partitions: i32) -> Record {
    Record::change(row, &order_line(row, version), partitions)
}

/// Waits until every row `0..rows` holds version `version`'s record.
async fn wait_rows(env: &TestEnv, rows: u64, version: u64) {
    let keys = env.keys().await;
    let names = || (0..rows).map(|row| format!("public.orders:{row}"));
    let expected: Vec<Option<String>> = (0..rows)
        .map(|row| Some(record_text(&order_line(row, version))))
        .collect();
    let start = std::time::Instant::now();
    loop {
        let values = keys.get_all(names()).await;
        if values == expected {
            return;
        }
        if start.elapsed() > PATIENCE {
            let wrong: Vec<(u64, Option<String>)> = (0..rows)
                .zip(values)
                .filter(|(row, v)| *v != expected[*row as usize])
                .take(3)
                .collect();
            panic!("rows not at v{version} after {PATIENCE:?}, e.g. {wrong:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many records of `records` went to each partition.
fn counts(records: &[Record], partitions: i32) -> Vec<i64> {
    (0..partitions)
        .map(|p| records.iter().filter(|r| r.partition == p).count() as i64)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_sequin_messages_over_three_partitions_are_cached_in_row_order_and_committed() {
    let env = TestEnv::row_cache("kafka-keyed");
    let topic = Topic::create("kw-keyed", 3).await;
    let (rows, versions) = (30u64, 4u64);
    let records: Vec<Record> = (0..versions)
        .flat_map(|version| (0..rows).map(move |row| change(row, version, 3)))
        .collect();
    let expected = counts(&records, 3);
    topic.produce(records).await;
    // Plain writes: the cache ends at the last version only if each row's changes were applied
    // in order. Four messages in flight at most: the consumer is starved of permits over and
    // over, pauses, holds what it fetched and resumes, in order.
    env.add_row_cache("consistency = \"plain\"");
    let daemon = topic
        .config(&env, "")
        .pipeline("max_in_flight = 4\nbatch_size = 2")
        .run();
    wait_rows(&env, rows, versions - 1).await;
    topic.wait_committed(&expected).await;
    daemon.stop().await;
    assert!(env.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_dead_lettered_with_topic_partition_and_offset() {
    let env = TestEnv::row_cache("kafka-malformed");
    let topic = Topic::create("kw-malformed", 1).await;
    let records = vec![
        Record::raw(Some(b"this is not JSON"), 0),
        Record::raw(Some(br#"{"id":1,"name":"not a change message"}"#), 0),
        Record::raw(None, 0),
        change(7, 0, 1),
    ];
    topic.produce(records).await;
    let daemon = topic.config(&env, "").run();
    wait_rows_from(&env, 7, 0).await;
    // The offset moves on past what was dead-lettered.
    topic.wait_committed(&[4]).await;
    daemon.stop().await;
    let letters = env.dead_letters().await;
    let mut ids: Vec<String> = letters.iter().map(|l| l.field("source_id")).collect();
    ids.sort();
    let expected: Vec<String> = (0..3).map(|o| format!("{}/0/{o}", topic.name)).collect();
    assert_eq!(ids, expected, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.field("kind"), "decode");
        assert_eq!(letter.field("source"), format!("kafka:{}", topic.group));
    }
    let reasons: Vec<String> = letters.iter().map(|l| l.field("reason")).collect();
    assert!(
        reasons.iter().any(|r| r.contains("invalid JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("missing field")),
        "{reasons:?}"
    );
}

/// Waits until row `row` holds version `version`'s record.
async fn wait_rows_from(env: &TestEnv, row: u64, version: u64) {
    let keys = env.keys().await;
    let expected = record_text(&order_line(row, version));
    let key = format!("public.orders:{row}");
    wait_for(&format!("row {row} at v{version}"), PATIENCE, || async {
        keys.get(&key).await.as_deref() == Some(expected.as_str())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_topic_leaves_the_in_flight_budget_to_the_other_sources() {
    // One budget of four for both sources. The Kafka consumer reserves ahead for what it
    // fetches; on a topic with nothing to read it must give that back, or the stream source
    // beside it waits for ever.
    let env = TestEnv::row_cache("kafka-quiet");
    let topic = Topic::create("kw-quiet", 1).await;
    let daemon = topic
        .config(&env, "")
        .source("redis-stream", &env.stream_source())
        .pipeline("max_in_flight = 4\nbatch_size = 2")
        .run();
    env.wait_group().await;
    let lines: Vec<String> = (0..20).map(|row| order_line(row, 0)).collect();
    env.xadd(&lines).await;
    env.wait_drained(lines.len() as u64).await;
    daemon.stop().await;
    assert!(env.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_commit() {
    let env = TestEnv::row_cache("kafka-restart");
    let topic = Topic::create("kw-restart", 1).await;
    let rows = 10u64;
    // A malformed value first: read twice, it would be dead-lettered twice.
    let mut first = vec![Record::raw(Some(b"not JSON"), 0)];
    first.extend((0..rows).map(|row| change(row, 0, 1)));
    topic.produce(first).await;
    let daemon = topic.config(&env, "").run();
    wait_rows(&env, rows, 0).await;
    topic.wait_committed(&[rows as i64 + 1]).await;
    daemon.stop().await;

    topic
        .produce((0..rows).map(|row| change(row, 1, 1)).collect())
        .await;
    let daemon = topic.config(&env, "").run();
    wait_rows(&env, rows, 1).await;
    topic.wait_committed(&[2 * rows as i64 + 1]).await;
    daemon.stop().await;
    assert_eq!(
        env.dead_letters().await.len(),
        1,
        "the second run re-read the first"
    );
}

/// Adds the hostile plugin in `stall` mode: a change of a row in `victims` busy-waits in its
/// plugin call until its record's `stall_until_ms` (see [`stalled`]).
fn add_stalling_plugin(env: &TestEnv, victims: &[&str]) {
    let manifest = format!(
        "[limits]\ndeadline_ms = 30000\n[grants]\nclock = true\n[config]\nprefix = \"{}:\"\n\
         mode = \"stall\"\nvictims = {victims:?}\n",
        env.prefix
    );
    env.add_plugin("hostile", &test_plugin_wasm("hostile"), &manifest);
}

/// `line`, a change of row `row`, made to stall for `ms` milliseconds from now.
fn stalled(line: &str, row: u64, ms: u64) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let id = format!(r#""id":{row}"#);
    line.replace(&id, &format!(r#"{id},"stall_until_ms":{}"#, now_ms + ms))
}

/// Row 2's change stalls in its plugin call while the changes after it in the partition are
/// applied: the group's commit must stay at row 2's offset until it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_never_passes_a_message_not_yet_applied() {
    let env = TestEnv::new("kafka-early");
    add_stalling_plugin(&env, &["2"]);
    let topic = Topic::create("kw-early", 1).await;
    let daemon = topic
        .config(&env, "")
        .pipeline("lanes = 16\nbatch_size = 1")
        .run();
    let order = |row: u64| order_change(fixtures()[0], row, Some(5_000 + row));
    // Offsets 0 and 1 go first, so the group is joined and committing before the stall.
    topic
        .produce(
            (0..2)
                .map(|row| Record::change(row, &order(row), 1))
                .collect(),
        )
        .await;
    topic.wait_committed(&[2]).await;
    let mut records = vec![Record::change(2, &stalled(&order(2), 2, 8_000), 1)];
    records.extend((3..10).map(|row| Record::change(row, &order(row), 1)));
    topic.produce(records).await;

    let keys = env.keys().await;
    // Some change after row 2's is applied (rows that share row 2's lane wait behind it).
    wait_for(
        "a change after the stalled one applied",
        PATIENCE,
        || async { keys.exist((3..10).map(|row| row.to_string())).await > 0 },
    )
    .await;
    let mut looks = 0;
    while keys.get("2").await.is_none() {
        let committed = topic.committed().await;
        assert!(
            committed[0] <= 2,
            "committed {committed:?} while offset 2 is not applied"
        );
        looks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        looks > 0,
        "the stall ended before the commit could be looked at"
    );
    topic.wait_committed(&[10]).await;
    daemon.stop().await;
    assert!(env.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_in_flight_budget_pauses_the_partition_and_loses_nothing() {
    // A budget of two, both taken by changes that stall for two seconds: the poll thread finds
    // no permit, pauses the partition (librdkafka drops what it had prefetched) and holds
    // whatever a poll still returns; when the permits come back it delivers what it held, then
    // resumes, and librdkafka fetches again from the last message returned. Nothing is lost,
    // and every row's changes are applied in order (plain writes: the last one applied is what
    // stays cached).
    let env = TestEnv::new("kafka-held");
    add_stalling_plugin(&env, &["0", "1"]);
    let topic = Topic::create("kw-held", 1).await;
    let daemon = topic
        .config(&env, "")
        .pipeline("max_in_flight = 2\nbatch_size = 1")
        .run();
    // One change first, so that the group is joined before the stall's clock starts.
    topic.produce(vec![change(10, 0, 1)]).await;
    topic.wait_committed(&[1]).await;
    let mut records: Vec<Record> = (0..2)
        .map(|row| Record::change(row, &stalled(&order_line(row, 0), row, 2_000), 1))
        .collect();
    let (rows, versions) = (2..10, 6);
    for version in 0..versions {
        records.extend(rows.clone().map(|row| change(row, version, 1)));
    }
    let total = 1 + records.len() as i64;
    topic.produce(records).await;

    let keys = env.keys().await;
    let expected: Vec<Option<String>> = rows
        .clone()
        .map(|row| Some(record_text(&order_line(row, versions - 1))))
        .collect();
    wait_for("every row at its last change", PATIENCE, || async {
        keys.get_all(rows.clone().map(|row| row.to_string())).await == expected
    })
    .await;
    topic.wait_committed(&[total]).await;
    assert!(keys.get("0").await.is_some() && keys.get("1").await.is_some());
    daemon.stop().await;
    assert!(env.dead_letters().await.is_empty());
}

/// A worker's config file and process.
fn worker(env: &TestEnv, topic: &Topic, dir: &TempDir, name: &str) -> KeepwarmProcess {
    let config = topic.config(env, "").write(dir, &format!("{name}.toml"));
    KeepwarmProcess::spawn(&["run", "--config", &config])
}

/// Versioned writes: every row ends at its last change though a killed worker's uncommitted
/// messages are delivered again to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_in_one_group_survive_one_killed() {
    let env = TestEnv::row_cache("kafka-kill");
    let topic = Topic::create("kw-kill", 3).await;
    let dir = TempDir::new("kw-kafka-kill");
    let mut workers = vec![
        worker(&env, &topic, &dir, "one"),
        worker(&env, &topic, &dir, "two"),
    ];
    for worker in &mut workers {
        worker.wait_log("partitions assigned", PATIENCE);
    }
    let (rows, versions) = (60u64, 8u64);
    let batch = |range: std::ops::Range<u64>| -> Vec<Record> {
        range
            .flat_map(|version| (0..rows).map(move |row| change(row, version, 3)))
            .collect()
    };
    topic.produce(batch(0..4)).await;
    let keys = env.keys().await;
    wait_for("every row cached", PATIENCE, || async {
        keys.exist((0..rows).map(|row| format!("public.orders:{row}")))
            .await
            == rows
    })
    .await;
    let victim = workers.remove(1);
    victim.signal("KILL");
    drop(victim);
    workers.push(worker(&env, &topic, &dir, "three"));
    topic.produce(batch(4..versions)).await;
    wait_rows(&env, rows, versions - 1).await;
    let total: i64 = (rows * versions) as i64;
    let expected = counts(&batch(0..versions), 3);
    assert_eq!(expected.iter().sum::<i64>(), total);
    topic.wait_committed(&expected).await;
    for worker in &workers {
        worker.signal("TERM");
    }
    for worker in &mut workers {
        let status = worker.wait_exit(PATIENCE);
        assert_eq!(status.code(), Some(0), "{}", worker.log.join("\n"));
    }
    assert!(env.dead_letters().await.is_empty());
}

/// A second worker joins while the first is busy, then the first leaves: each rebalance
/// revokes partitions with messages in flight. Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_rebalance_under_load_loses_nothing() {
    let env = TestEnv::row_cache("kafka-rebalance");
    let topic = Topic::create("kw-rebalance", 3).await;
    let dir = TempDir::new("kw-kafka-rebalance");
    let (rows, versions) = (100u64, 9u64);
    let batch = |range: std::ops::Range<u64>| -> Vec<Record> {
        range
            .flat_map(|version| (0..rows).map(move |row| change(row, version, 3)))
            .collect()
    };
    let mut first = worker(&env, &topic, &dir, "first");
    first.wait_log("partitions assigned", PATIENCE);
    topic.produce(batch(0..3)).await;
    let mut second = worker(&env, &topic, &dir, "second");
    topic.produce(batch(3..6)).await;
    second.wait_log("partitions assigned", PATIENCE);
    first.wait_log("partitions revoked", PATIENCE);
    first.signal("TERM");
    topic.produce(batch(6..versions)).await;
    let status = first.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(0), "{}", first.log.join("\n"));
    wait_rows(&env, rows, versions - 1).await;
    topic.wait_committed(&counts(&batch(0..versions), 3)).await;
    second.signal("TERM");
    let status = second.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(0), "{}", second.log.join("\n"));
    assert!(env.dead_letters().await.is_empty());
}

/// `keepwarm check` validates the Kafka table, librdkafka properties included, without
/// connecting (the broker address is a port nothing listens on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_validates_the_kafka_table_without_connecting() {
    let env = TestEnv::row_cache("kafka-check");
    let dir = TempDir::new("kw-kafka-check");
    let lines = "brokers = \"127.0.0.1:1\"\ntopics = [\"t\"]\ngroup_id = \"g\"";
    let good = env.config().source("kafka", lines).write(&dir, "good.toml");
    let (ok, out, err) = keepwarm_cli_async(&["check", "--config", &good]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("kafka:g"), "{out}");
    let unknown = format!("{lines}\nlibrdkafka = {{ \"no.such.property\" = \"1\" }}");
    let bad = env
        .config()
        .source("kafka", &unknown)
        .write(&dir, "bad.toml");
    let (ok, out, err) = keepwarm_cli_async(&["check", "--config", &bad]).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("librdkafka") && err.contains("no.such.property"),
        "{err}"
    );
    let owned = format!("{lines}\nlibrdkafka = {{ \"enable.auto.commit\" = \"true\" }}");
    let bad = env
        .config()
        .source("kafka", &owned)
        .write(&dir, "owned.toml");
    let (ok, _, err) = keepwarm_cli_async(&["check", "--config", &bad]).await;
    assert!(!ok && err.contains("set by keepwarm"), "{err}");
}

/// A broker outage: the source is down (`keepwarm_source_up` 0, `/readyz` 503) while the broker
/// is gone, and reads again once it is back; the lag gauge is published per partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_shows_as_down_and_is_ridden_out() {
    let env = TestEnv::row_cache("kafka-outage");
    let broker = PrivateBroker::start().await;
    let topic = Topic::create_on(&broker.address(), "kw-outage", 1).await;
    let refresh = "librdkafka = { \"topic.metadata.refresh.interval.ms\" = \"1000\" }";
    let daemon = topic.config(&env, refresh).admin().run();
    topic.produce(vec![change(1, 0, 1)]).await;
    wait_rows_from(&env, 1, 0).await;
    let source = format!("kafka:{}", topic.group);
    let metrics = daemon.admin_url("/metrics");
    let up = |wanted: f64| {
        let (metrics, source) = (metrics.clone(), source.clone());
        async move {
            let text = http_get(&metrics)
                .await
                .map(|(_, body)| body)
                .unwrap_or_default();
            metric(&text, "keepwarm_source_up", &[("source", &source)]) == Some(wanted)
        }
    };
    wait_for("the source up", PATIENCE, || up(1.0)).await;
    let lag_labels = [
        ("source", source.as_str()),
        ("topic", topic.name.as_str()),
        ("partition", "0"),
    ];
    wait_for("the lag gauge of partition 0", PATIENCE, || async {
        let text = http_get(&metrics)
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        metric(&text, "keepwarm_kafka_lag", &lag_labels) == Some(0.0)
    })
    .await;
    assert_eq!(http_get(&daemon.admin_url("/readyz")).await.unwrap().0, 200);

    broker.cut();
    wait_for("the source down", PATIENCE, || up(0.0)).await;
    assert_eq!(http_get(&daemon.admin_url("/readyz")).await.unwrap().0, 503);

    broker.resume();
    topic.produce(vec![change(2, 0, 1)]).await;
    wait_rows_from(&env, 2, 0).await;
    wait_for("the source up again", PATIENCE, || up(1.0)).await;
    daemon.stop().await;
}
