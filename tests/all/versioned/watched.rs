//! Versioned writes of whole keys as `WATCH`ed transactions (applier/watched.rs): a write that
//! lands between the transaction's read and its `EXEC` wins, a companion holding member versions
//! is left to the script beside new keys, and a Redis that refuses `WATCH` leaves everything to
//! the script.

use super::applier::{applier, apply, sadd};
use crate::util::*;
use keepwarm::applier::{MessageOutcome, MessageWrites};
use keepwarm::message::Version;
use keepwarm::ops::Op;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn set(key: &str, value: &str) -> Op {
    Op::Set {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        ttl_ms: None,
    }
}

/// `host:port` of a `redis://host:port/db` URL.
fn host_port(url: &str) -> String {
    let rest = url.trim_start_matches("redis://");
    rest.split('/').next().unwrap_or(rest).to_owned()
}

fn stored(lsn: u64) -> String {
    format!("{lsn:020}:{:020}", 0)
}

/// A write run once, when the first `MULTI` passes the proxy.
type Hook = Box<dyn FnOnce() -> tokio::task::JoinHandle<()> + Send>;

/// A proxy to `upstream` that runs `hook` (and waits for it) before it forwards the first
/// `MULTI` a client sends after a `WATCH`: another writer, between a transaction's read and
/// its writes.
async fn intercepting_proxy(upstream: String, hook: Arc<Mutex<Option<Hook>>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = TcpStream::connect(&upstream).await.unwrap();
            let hook = Arc::clone(&hook);
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                // Only a MULTI after this connection's WATCH is a transaction's (a new
                // connection's probe sends MULTI and DISCARD first).
                let mut watching = false;
                loop {
                    let Ok(n) = client_read.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    let chunk = &buf[..n];
                    watching |= chunk.windows(9).any(|w| w == b"\r\nWATCH\r\n");
                    if watching && chunk.windows(9).any(|w| w == b"\r\nMULTI\r\n") {
                        let run = hook.lock().unwrap().take();
                        if let Some(run) = run {
                            run().await.unwrap();
                        }
                    }
                    if server_write.write_all(chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("redis://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_between_a_transactions_read_and_its_exec_is_not_overwritten() {
    let url = redis_url();
    let key = unique("watched-race");
    let hook: Arc<Mutex<Option<Hook>>> = Arc::new(Mutex::new(None));
    let proxied = intercepting_proxy(host_port(&url), Arc::clone(&hook)).await;
    let (applier, keys) = applier(&proxied).await;
    // Written at 10 (a new key: a transaction too); the key now has a string version.
    assert_eq!(apply(&applier, 10, &[set(&key, "at 10")]).await, 0);
    assert_eq!(keys.get(&version_key(&key)).await, Some(stored(10)));
    // Another writer (another keepwarm) writes the change at 30 after the transaction has read
    // version 10, before its EXEC.
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (other, at_30) = (keys.clone(), fired.clone());
    let (data, companion) = (key.clone(), version_key(&key));
    *hook.lock().unwrap() = Some(Box::new(move || {
        tokio::spawn(async move {
            let () = other
                .query(
                    redis::cmd("MSET")
                        .arg(&data)
                        .arg("at 30")
                        .arg(&companion)
                        .arg(stored(30)),
                )
                .await;
            at_30.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    }));
    // The change at 20 must not overwrite it: the transaction is refused, and the script finds
    // 30 newer.
    assert_eq!(apply(&applier, 20, &[set(&key, "at 20")]).await, 1);
    assert!(
        fired.load(std::sync::atomic::Ordering::SeqCst),
        "no transaction was sent"
    );
    assert_eq!(keys.get(&key).await.as_deref(), Some("at 30"));
    assert_eq!(keys.get(&version_key(&key)).await, Some(stored(30)));
    // The next change goes through a transaction again.
    assert_eq!(apply(&applier, 40, &[set(&key, "at 40")]).await, 0);
    assert_eq!(keys.get(&key).await.as_deref(), Some("at 40"));
    assert_eq!(apply(&applier, 35, &[set(&key, "at 35")]).await, 1);
    assert_eq!(keys.get(&key).await.as_deref(), Some("at 40"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_key_write_over_member_versions_keeps_them() {
    let (applier, keys) = applier(&redis_url()).await;
    let key = unique("watched-members");
    let sadd = Op::SetAdd {
        key: key.clone(),
        members: vec!["a".to_owned()],
    };
    assert_eq!(apply(&applier, 30, &[sadd]).await, 0);
    // A string over the aggregate, by an older change and a newer one: the member's version
    // stays beside the key's (a transaction would have replaced the hash with a string).
    assert_eq!(apply(&applier, 20, &[set(&key, "at 20")]).await, 0);
    assert_eq!(apply(&applier, 40, &[set(&key, "at 40")]).await, 0);
    assert_eq!(keys.get(&key).await.as_deref(), Some("at 40"));
    let versions = keys.hgetall(&version_key(&key)).await;
    assert_eq!(versions.get(""), Some(&stored(40)));
    assert_eq!(versions.get("m:a"), Some(&stored(30)));
}

/// A new key, a key with a string version and a key with member versions in one batch: one
/// transaction reads all three companions, and only the hash is left to the script (`MGET`
/// answers nothing for it, as for the new key; `EXISTS` tells them apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transaction_tells_a_new_key_from_member_versions() {
    let (applier, keys) = applier(&redis_url()).await;
    let [fresh, string, members] =
        ["fresh", "string", "members"].map(|k| unique(&format!("watched-{k}")));
    assert_eq!(apply(&applier, 10, &[set(&string, "at 10")]).await, 0);
    assert_eq!(apply(&applier, 30, &[sadd(&members, "a")]).await, 0);
    let messages = [
        (set(&fresh, "at 20"), 20),
        (set(&string, "at 20"), 20),
        (set(&members, "at 20"), 20),
        (set(&string, "at 5"), 5),
    ];
    let writes: Vec<MessageWrites<'_>> = messages
        .iter()
        .map(|(op, lsn)| MessageWrites {
            version: Some(Version { lsn: *lsn, idx: 0 }),
            plain: &[],
            versioned: std::slice::from_ref(op),
        })
        .collect();
    let outcomes = applier.apply(&writes, &[]).await.unwrap();
    let stale: Vec<u64> = outcomes
        .iter()
        .map(|outcome| match outcome {
            MessageOutcome::Applied { stale } => *stale,
            MessageOutcome::Refused(reason) => panic!("refused: {reason}"),
        })
        .collect();
    assert_eq!(stale, [0, 0, 0, 1]);
    for key in [&fresh, &string, &members] {
        assert_eq!(keys.get(key).await.as_deref(), Some("at 20"), "{key}");
    }
    assert_eq!(keys.get(&version_key(&fresh)).await, Some(stored(20)));
    assert_eq!(keys.get(&version_key(&string)).await, Some(stored(20)));
    // Written over by a transaction's `MSET`, this would be a string.
    let versions = keys.hgetall(&version_key(&members)).await;
    assert_eq!(versions.get(""), Some(&stored(20)));
    assert_eq!(versions.get("m:a"), Some(&stored(30)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_watch_gets_every_write_through_the_script() {
    refused_for_good("-watch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_multi_gets_every_write_through_the_script() {
    refused_for_good("-multi").await;
}

/// An ACL user without one of a transaction's commands: the writes still apply, through the
/// script.
async fn refused_for_good(rule: &str) {
    let url = redis_url();
    let keys = Keys::connect(&url).await;
    let user = unique("kw-notx");
    let () = keys
        .query(
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg(&user)
                .arg("on")
                .arg(">secret")
                .arg("~*")
                .arg("&*")
                .arg("+@all")
                .arg(rule),
        )
        .await;
    let (applier, _) = applier(&format!("redis://{user}:secret@{}", host_port(&url))).await;
    let key = unique("notx");
    assert_eq!(apply(&applier, 10, &[set(&key, "at 10")]).await, 0);
    assert_eq!(apply(&applier, 20, &[set(&key, "at 20")]).await, 0);
    assert_eq!(apply(&applier, 15, &[set(&key, "at 15")]).await, 1);
    assert_eq!(keys.get(&key).await.as_deref(), Some("at 20"));
    assert_eq!(keys.get(&version_key(&key)).await, Some(stored(20)));
    let _: u64 = keys
        .query(redis::cmd("ACL").arg("DELUSER").arg(&user))
        .await;
}
