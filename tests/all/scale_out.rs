//! Scale-out: several keepwarm processes in one consumer group share a stream.

use crate::stream_source::record_text;
use crate::util::*;
use std::time::Duration;

fn order(row: u64) -> String {
    order_change(fixtures()[0], row, None)
}

/// Three real processes on one stream and group; one is killed with SIGKILL mid-run. The
/// survivors reclaim its pending entries: at the end every entry is in the cache and
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_a_stream_and_survive_one_killed() {
    let url = redis_url();
    let prefix = unique("scale");
    let (stream, group) = (format!("{prefix}:stream"), "kw");
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(&prefix, ""),
    );
    let dir = TempDir::new("kw-scale");
    let mut workers: Vec<KeepwarmProcess> = (1..=3)
        .map(|i| {
            let text = format!(
                "{}consumer = \"worker-{i}\"\n",
                stream_config_text(plugins.path(), &stream, group, "")
            );
            let path = dir.path().join(format!("worker-{i}.toml"));
            std::fs::write(&path, text).unwrap();
            KeepwarmProcess::spawn(&["run", "--config", &path.display().to_string()])
        })
        .collect();
    for worker in &mut workers {
        worker.wait_log("reading stream", Duration::from_secs(60));
    }

    let mut conn = connect(&url).await;
    let n: u64 = 6000;
    let lines: Vec<String> = (0..n).map(order).collect();
    let (first, rest) = lines.split_at(3000);
    for chunk in first.chunks(500) {
        xadd_sequin(&mut conn, &stream, chunk).await;
    }
    wait_for("the group to be under way", Duration::from_secs(60), || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { group_progress(&mut conn, &stream, group).await.0 >= 500 }
    })
    .await;
    let victim = workers.remove(1);
    victim.signal("KILL");
    drop(victim);
    // What the killed worker held: entries read, not acknowledged.
    let held: Vec<String> = redis::cmd("XPENDING")
        .arg(&stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .arg("worker-2")
        .query_async::<Vec<(String, String, u64, u64)>>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _, _, _)| id)
        .collect();
    for chunk in rest.chunks(500) {
        xadd_sequin(&mut conn, &stream, chunk).await;
    }
    wait_all_acked(&url, &stream, group, n, Duration::from_secs(120)).await;

    let record = record_text(&order(0));
    let expected = |row: u64| record.replace(r#""id":0"#, &format!(r#""id":{row}"#));
    let keys: Vec<String> = (0..n)
        .map(|row| format!("{prefix}:public.orders:{row}"))
        .collect();
    let values: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    for (row, value) in values.into_iter().enumerate() {
        assert_eq!(value, Some(expected(row as u64)), "row {row}");
    }

    for worker in &workers {
        worker.signal("TERM");
    }
    for worker in &mut workers {
        let status = worker.wait_exit(Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "{}", worker.log.join("\n"));
    }
    if !held.is_empty() {
        assert!(
            workers.iter().any(|w| w
                .log
                .iter()
                .any(|l| l.contains("reclaimed entries left pending"))),
            "the killed worker held {} entries; nobody reclaimed them",
            held.len()
        );
    }
    eprintln!("the killed worker held {} entries", held.len());
    // Still nothing pending once the survivors are gone.
    assert_eq!(group_progress(&mut conn, &stream, group).await, (n, 0));
}
