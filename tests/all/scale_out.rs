//! Scale-out: several keepwarm processes in one consumer group share a stream.

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
    let env = TestEnv::row_cache("scale");
    let dir = TempDir::new("kw-scale");
    let mut workers: Vec<KeepwarmProcess> = (1..=3)
        .map(|i| {
            let config = env
                .stream_config()
                .source_lines(&format!("consumer = \"worker-{i}\""))
                .write(&dir, &format!("worker-{i}.toml"));
            KeepwarmProcess::spawn(&["run", "--config", &config])
        })
        .collect();
    for worker in &mut workers {
        worker.wait_log("reading stream", Duration::from_secs(60));
    }

    let n: u64 = 6000;
    let lines: Vec<String> = (0..n).map(order).collect();
    let (first, rest) = lines.split_at(3000);
    for chunk in first.chunks(500) {
        env.xadd(chunk).await;
    }
    env.wait("the group to be under way", |read, _| read >= 500)
        .await;
    let victim = workers.remove(1);
    victim.signal("KILL");
    drop(victim);
    // What the killed worker held: entries read, not acknowledged.
    let held = env.pending(Some("worker-2")).await;
    for chunk in rest.chunks(500) {
        env.xadd(chunk).await;
    }
    env.wait_drained(n).await;

    let record = record_text(&order(0));
    let expected = |row: u64| record.replace(r#""id":0"#, &format!(r#""id":{row}"#));
    let keys = (0..n).map(|row| format!("public.orders:{row}"));
    let values = env.keys().await.get_all(keys).await;
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
    assert_eq!(env.progress().await, (n, 0));
}
