//! Reading what the daemon wrote: cache keys ([`Keys`]) and dead letters ([`DeadLetter`]).

use redis::AsyncCommands as _;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamRangeReply};
use std::collections::HashMap;

/// A connection to the Redis at `url`. Its timeouts are generous (redis-rs's defaults are 1 s
/// to connect and 500 ms per reply): on two cores running the suite's tests side by side, a
/// test's own reads must not fail before the daemon it checks does.
pub async fn connect(url: &str) -> MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(10)))
        .set_response_timeout(Some(std::time::Duration::from_secs(10)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// The companion key where versioned writes keep the versions of `key`.
pub fn version_key(key: &str) -> String {
    format!("kw:v:{{{key}}}")
}

/// The cache, read under a key prefix: `keys.get("public.orders:1001")` reads
/// `<prefix>:public.orders:1001`. Every read panics on a Redis error.
#[derive(Clone)]
pub struct Keys {
    conn: MultiplexedConnection,
    prefix: String,
}

impl Keys {
    /// The cache at `url`, keys named in full.
    pub async fn connect(url: &str) -> Keys {
        Keys::under(url, "").await
    }

    /// The cache at `url`, keys named below `prefix` (`"{prefix}:"` is prepended).
    pub async fn under(url: &str, prefix: &str) -> Keys {
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}:")
        };
        Keys {
            conn: connect(url).await,
            prefix,
        }
    }

    /// The full name of `key`.
    pub fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A raw command on the connection, for what the helpers do not cover.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        self.try_query(cmd).await.unwrap()
    }

    /// [`Keys::query`] for a command that may fail.
    pub async fn try_query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        cmd.query_async(&mut self.conn.clone()).await
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        self.conn.clone().get(self.name(key)).await.unwrap()
    }

    /// `MGET` of many keys at once.
    pub async fn get_all(&self, keys: impl IntoIterator<Item = String>) -> Vec<Option<String>> {
        let names: Vec<String> = keys.into_iter().map(|k| self.name(&k)).collect();
        self.conn.clone().mget(names).await.unwrap()
    }

    /// How many of `keys` exist.
    pub async fn exist(&self, keys: impl IntoIterator<Item = String>) -> u64 {
        let names: Vec<String> = keys.into_iter().map(|k| self.name(&k)).collect();
        self.conn.clone().exists(names).await.unwrap()
    }

    /// The members of a set, sorted.
    pub async fn members(&self, key: &str) -> Vec<String> {
        let mut members: Vec<String> = self.conn.clone().smembers(self.name(key)).await.unwrap();
        members.sort();
        members
    }

    pub async fn hgetall(&self, key: &str) -> HashMap<String, String> {
        self.conn.clone().hgetall(self.name(key)).await.unwrap()
    }

    pub async fn hkeys(&self, key: &str) -> Vec<String> {
        self.conn.clone().hkeys(self.name(key)).await.unwrap()
    }

    pub async fn pttl(&self, key: &str) -> i64 {
        self.conn.clone().pttl(self.name(key)).await.unwrap()
    }

    /// The keys matching `pattern` (below the prefix).
    pub async fn matching(&self, pattern: &str) -> Vec<String> {
        self.conn.clone().keys(self.name(pattern)).await.unwrap()
    }

    /// Every entry of the dead-letter stream `stream` (named in full), oldest first.
    pub async fn dead_letters(&self, stream: &str) -> Vec<DeadLetter> {
        let reply: StreamRangeReply = self.conn.clone().xrange_all(stream).await.unwrap();
        reply.ids.into_iter().map(DeadLetter).collect()
    }
}

/// One entry of the dead-letter stream.
pub struct DeadLetter(StreamId);

impl DeadLetter {
    /// A field as text (lossy); panics when it is missing.
    pub fn field(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.raw(name)).into_owned()
    }

    /// A field byte for byte; panics when it is missing.
    pub fn raw(&self, name: &str) -> Vec<u8> {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("no field {name} in {self:?}"))
    }
}

impl std::fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut fields: Vec<(&String, String)> = self
            .0
            .map
            .keys()
            .map(|k| (k, String::from_utf8_lossy(&self.raw(k)).into_owned()))
            .collect();
        fields.sort();
        f.debug_map().entries(fields).finish()
    }
}

/// The dead letter of each `(payload, reason)`, checking that its reason says `reason`.
pub fn find_letters<'a>(
    letters: &'a [DeadLetter],
    expected: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<&'a DeadLetter> {
    expected
        .into_iter()
        .map(|(payload, reason)| {
            let letter = letters
                .iter()
                .find(|l| l.field("payload") == payload)
                .unwrap_or_else(|| panic!("no dead letter for {payload}"));
            assert!(letter.field("reason").contains(reason), "{letter:?}");
            letter
        })
        .collect()
}

/// Bodies every source must dead-letter, each with what its dead letter's reason says: not
/// JSON, JSON that is not a change message, a bare string (a Sequin transform's output).
pub const MALFORMED: [(&str, &str); 3] = [
    ("this is not JSON", "invalid JSON"),
    (
        r#"{"id":1,"name":"not a change message"}"#,
        "missing field `action`",
    ),
    (
        r#""a bare string from a Sequin transform""#,
        "a JSON string, not a change message",
    ),
];

/// What a malformed-input test sends: the [`MALFORMED`] bodies, then one good change (the
/// first fixture, cached as `public.orders:1001`).
pub fn malformed_then_good() -> Vec<String> {
    let mut bodies: Vec<String> = MALFORMED
        .iter()
        .map(|(body, _)| (*body).to_owned())
        .collect();
    bodies.push(crate::util::fixtures()[0].to_owned());
    bodies
}

/// The dead letters of the [`MALFORMED`] bodies, which must be all of `letters`, each a decode
/// failure with its reason.
pub fn malformed_letters(letters: &[DeadLetter]) -> Vec<&DeadLetter> {
    assert_eq!(letters.len(), MALFORMED.len(), "{letters:?}");
    let found = find_letters(letters, MALFORMED);
    for letter in &found {
        assert_eq!(letter.field("kind"), "decode");
    }
    found
}
