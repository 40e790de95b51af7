//! The model of the consistency harness: a seeded random history of the table
//! `public.users (id, email unique, team, name, rev)` with `REPLICA IDENTITY FULL`, the Sequin
//! messages it produces, and the cache those messages must leave behind.
//!
//! The expected cache follows the versioning rules, not arrival order:
//!
//! - a string key holds what the newest change (by `(commit_lsn, commit_idx)`) that touched it
//!   wrote, and nothing when that change deleted it;
//! - a set member is present when the newest change that touched it added it;
//! - a key (member) that no change touched holds what backfill reads wrote.
//!
//! Because every change of a row touches every key the row occupies (an update that moves a row
//! off a key deletes the old key), those rules do not depend on delivery order, and they agree
//! with the table's final state for every row the messages mention: [`Workload::check`] asserts
//! both, so a generator mistake cannot pass for a keepwarm bug.

use std::collections::{BTreeMap, BTreeSet};

/// xorshift64*: small, fast, and the same sequence for a seed everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that nearby seeds start far apart (and never at zero).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One row of the model table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: u64,
    pub email: String,
    pub team: String,
    pub name: String,
    pub rev: u64,
}

impl User {
    /// The record as Sequin writes it: compact, columns in byte order.
    pub fn json(&self) -> String {
        serde_json::json!({
            "email": self.email,
            "id": self.id,
            "name": self.name,
            "rev": self.rev,
            "team": self.team,
        })
        .to_string()
    }

    /// The old values of the columns that differ in `new` (an update's `changes` under
    /// REPLICA IDENTITY FULL).
    fn changes_to(&self, new: &User) -> String {
        let mut old = serde_json::Map::new();
        if self.email != new.email {
            old.insert("email".into(), self.email.clone().into());
        }
        if self.name != new.name {
            old.insert("name".into(), self.name.clone().into());
        }
        if self.rev != new.rev {
            old.insert("rev".into(), self.rev.into());
        }
        if self.team != new.team {
            old.insert("team".into(), self.team.clone().into());
        }
        serde_json::Value::Object(old).to_string()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Insert,
    Update,
    Delete,
    Read,
}

/// `(commit_lsn, commit_idx)`.
pub type Version = (u64, u64);

/// One generated change message.
#[derive(Clone, Debug)]
pub struct Message {
    pub action: Action,
    /// The new row (insert, update, read) or the old row (delete).
    pub user: User,
    /// For updates, the row before.
    pub before: Option<User>,
    /// `None` for backfill reads.
    pub version: Option<Version>,
    /// The Sequin JSON line.
    pub line: String,
}

/// What one message does to the cache, as the `model-cache` plugin computes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheOp {
    Set(String, String),
    Del(String),
    Add(String, String),
    Remove(String, String),
}

impl Message {
    /// The operations the `model-cache` plugin returns for this message, keys under `prefix`.
    pub fn ops(&self, prefix: &str) -> Vec<CacheOp> {
        let u = &self.user;
        let (row, by_email, team) = keys(prefix, u);
        let id = u.id.to_string();
        let json = u.json();
        let mut ops = Vec::new();
        match self.action {
            Action::Delete => {
                return vec![
                    CacheOp::Del(row),
                    CacheOp::Del(by_email),
                    CacheOp::Remove(team, id),
                ];
            }
            Action::Update => {
                let before = self.before.as_ref().unwrap();
                if before.email != u.email {
                    ops.push(CacheOp::Del(format!("{prefix}user:{}", before.email)));
                }
                if before.team != u.team {
                    ops.push(CacheOp::Remove(
                        format!("{prefix}team:{}", before.team),
                        id.clone(),
                    ));
                }
            }
            Action::Insert | Action::Read => {}
        }
        ops.push(CacheOp::Set(row, json.clone()));
        ops.push(CacheOp::Set(by_email, json));
        ops.push(CacheOp::Add(team, id));
        ops
    }

    /// A short description for failure reports.
    pub fn describe(&self) -> String {
        let version = match self.version {
            Some((lsn, idx)) => format!("{lsn}/{idx}"),
            None => "read".to_owned(),
        };
        format!("{:?} {} {}", self.action, version, self.user.json())
    }
}

fn keys(prefix: &str, u: &User) -> (String, String, String) {
    (
        format!("{prefix}row:{}", u.id),
        format!("{prefix}user:{}", u.email),
        format!("{prefix}team:{}", u.team),
    )
}

/// A cache entry: a string, or a set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Text(String),
    Members(BTreeSet<String>),
}

/// The cache, key by key.
pub type Cache = BTreeMap<String, Entry>;

/// Sizes of a generated history.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    /// Stop after this many messages (a transaction may run a few over).
    pub messages: usize,
    /// Rows that exist before the stream starts; only backfill reads or changes reveal them.
    pub initial_rows: u64,
    /// Distinct emails: few, so that freed emails are taken by other rows.
    pub emails: u64,
    /// Distinct teams.
    pub teams: u64,
}

/// A generated history: the messages in commit order (reads where they were taken) and the
/// table at the end.
pub struct Workload {
    pub messages: Vec<Message>,
    pub rows: BTreeMap<u64, User>,
    /// Rows that some message mentions.
    pub seen: BTreeSet<u64>,
    /// Counts by kind, for the report.
    pub transactions: usize,
    pub key_moves: usize,
    pub reinserts: usize,
}

impl Workload {
    /// Backfill reads among the messages.
    pub fn reads(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.action == Action::Read)
            .count()
    }
}

const NAMES: [&str; 6] = ["Ada", "Zoë", "José", "東京", "Ren", "O'Brien"];

/// Generates a history for `seed`.
pub fn generate(seed: u64, size: Size) -> Workload {
    let mut rng = Rng::new(seed);
    let mut rows: BTreeMap<u64, User> = BTreeMap::new();
    let mut used: BTreeSet<String> = BTreeSet::new();
    let email = |n: u64| format!("u{n}@x.io");
    let free_email = |rng: &mut Rng, used: &BTreeSet<String>| loop {
        let e = email(rng.below(size.emails));
        if !used.contains(&e) {
            return e;
        }
    };
    // A user with an email no other row has, and a random team and name.
    let new_user = |rng: &mut Rng, used: &mut BTreeSet<String>, id: u64, rev: u64| {
        let email = free_email(rng, &*used);
        used.insert(email.clone());
        User {
            id,
            email,
            team: format!("t{}", rng.below(size.teams)),
            name: rng.pick(&NAMES).to_string(),
            rev,
        }
    };
    for id in 1..=size.initial_rows {
        let user = new_user(&mut rng, &mut used, id, 1);
        rows.insert(id, user);
    }
    let mut next_id = size.initial_rows + 1;
    // Every change gets a new `rev` (like an `updated_at`), so no two versions of a row (also
    // across a delete and re-insert) cache the same value and every stale write shows.
    let mut rev = 1;
    let mut deleted: Vec<u64> = Vec::new();
    let mut lsn = 0x0100_0000 + rng.below(1 << 20);
    let mut work = Workload {
        messages: Vec::new(),
        rows: BTreeMap::new(),
        seen: BTreeSet::new(),
        transactions: 0,
        key_moves: 0,
        reinserts: 0,
    };
    let max_rows = size.initial_rows.max(8) * 2;
    assert!(
        size.emails > max_rows,
        "every row needs an email of its own"
    );
    while work.messages.len() < size.messages {
        if rng.percent(15) && !rows.is_empty() {
            // A backfill read of a few rows as they are now.
            for _ in 0..rng.between(1, 4) {
                let ids: Vec<u64> = rows.keys().copied().collect();
                let user = rows[rng.pick(&ids)].clone();
                work.messages
                    .push(message(Action::Read, user, None, None, &mut rng));
            }
            continue;
        }
        // A transaction: one commit LSN, increasing commit_idx with gaps (other tables, logical
        // messages).
        work.transactions += 1;
        lsn += rng.between(1, 5000);
        let mut idx = rng.below(3);
        let mut last_row: Option<u64> = None;
        for _ in 0..rng.between(1, 4) {
            let version = Some((lsn, idx));
            idx += rng.between(1, 3);
            rev += 1;
            let n_rows = rows.len() as u64;
            let roll = rng.below(100);
            let kind = if n_rows == 0 || (roll < 25 && n_rows < max_rows) {
                Action::Insert
            } else if roll < 75 || n_rows < 3 {
                Action::Update
            } else {
                Action::Delete
            };
            match kind {
                Action::Insert => {
                    let id = if !deleted.is_empty() && rng.percent(50) {
                        work.reinserts += 1;
                        deleted.swap_remove(rng.below(deleted.len() as u64) as usize)
                    } else {
                        next_id += 1;
                        next_id - 1
                    };
                    let user = new_user(&mut rng, &mut used, id, rev);
                    rows.insert(id, user.clone());
                    last_row = Some(id);
                    work.messages
                        .push(message(Action::Insert, user, None, version, &mut rng));
                }
                Action::Update => {
                    // Often the row this transaction just changed: one key written twice in
                    // one transaction, where only commit_idx orders the writes.
                    let id = match last_row.filter(|id| rows.contains_key(id)) {
                        Some(id) if rng.percent(40) => id,
                        _ => *rng.pick(&rows.keys().copied().collect::<Vec<_>>()),
                    };
                    let before = rows[&id].clone();
                    let mut user = before.clone();
                    user.rev = rev;
                    if rng.percent(40) {
                        let email = free_email(&mut rng, &used);
                        used.remove(&user.email);
                        used.insert(email.clone());
                        user.email = email;
                        work.key_moves += 1;
                    }
                    if rng.percent(30) {
                        user.team = format!("t{}", rng.below(size.teams));
                    }
                    if rng.percent(30) {
                        user.name = rng.pick(&NAMES).to_string();
                    }
                    rows.insert(user.id, user.clone());
                    last_row = Some(user.id);
                    work.messages.push(message(
                        Action::Update,
                        user,
                        Some(before),
                        version,
                        &mut rng,
                    ));
                }
                // (Reads are not changes: they come between transactions.)
                Action::Delete | Action::Read => {
                    let ids: Vec<u64> = rows.keys().copied().collect();
                    let user = rows.remove(rng.pick(&ids)).unwrap();
                    used.remove(&user.email);
                    deleted.push(user.id);
                    last_row = Some(user.id);
                    work.messages
                        .push(message(Action::Delete, user, None, version, &mut rng));
                }
            }
        }
    }
    work.seen = work.messages.iter().map(|m| m.user.id).collect();
    work.rows = rows;
    work
}

fn message(
    action: Action,
    user: User,
    before: Option<User>,
    version: Option<Version>,
    rng: &mut Rng,
) -> Message {
    let changes = match &before {
        Some(before) => before.changes_to(&user),
        None => "null".to_owned(),
    };
    let (lsn, idx, key) = match version {
        Some((lsn, idx)) => (
            lsn.to_string(),
            idx.to_string(),
            base64(format!("{lsn}:{idx}").as_bytes()),
        ),
        None => (
            "null".to_owned(),
            "null".to_owned(),
            base64(format!("backfill-{}:{}", rng.below(1000), user.id).as_bytes()),
        ),
    };
    let action_text = match action {
        Action::Insert => "insert",
        Action::Update => "update",
        Action::Delete => "delete",
        Action::Read => "read",
    };
    let line = format!(
        concat!(
            r#"{{"record":{record},"changes":{changes},"action":"{action}","metadata":{{"#,
            r#""consumer":{{"id":"6c1e1a52-0000-4000-8000-000000000001","name":"model","annotations":{{}}}},"#,
            r#""table_schema":"public","table_name":"users","commit_timestamp":"2025-03-14T09:26:53.601022Z","#,
            r#""commit_lsn":{lsn},"commit_idx":{idx},"database_name":"model","transaction_annotations":null,"#,
            r#""idempotency_key":"{key}","record_pks":["{id}"],"enrichment":null,"#,
            r#""database":{{"id":"6c1e1a52-0000-4000-8000-000000000002","name":"model","annotations":{{}},"database":"model","hostname":"localhost"}}}}}}"#
        ),
        record = user.json(),
        changes = changes,
        action = action_text,
        lsn = lsn,
        idx = idx,
        key = key,
        id = user.id,
    );
    Message {
        action,
        user,
        before,
        version,
        line,
    }
}

/// Standard Base64 with padding, as Sequin's idempotency keys.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Which messages wrote a key or member, for failure reports.
pub type History = BTreeMap<(String, Option<String>), Vec<usize>>;

impl Workload {
    /// The cache the messages must leave under `prefix`, by the versioning rules, whatever the
    /// order and number of their deliveries.
    pub fn expected(&self, prefix: &str) -> Cache {
        // Per key (and member): the newest versioned write, and what reads wrote.
        let mut newest: BTreeMap<(String, Option<String>), (Version, Option<String>)> =
            BTreeMap::new();
        let mut read: BTreeMap<(String, Option<String>), Option<String>> = BTreeMap::new();
        let mut reads_disagree = BTreeSet::new();
        for message in &self.messages {
            for op in message.ops(prefix) {
                let (target, value) = match op {
                    CacheOp::Set(key, value) => ((key, None), Some(value)),
                    CacheOp::Del(key) => ((key, None), None),
                    CacheOp::Add(key, member) => ((key, Some(member)), Some(String::new())),
                    CacheOp::Remove(key, member) => ((key, Some(member)), None),
                };
                match message.version {
                    Some(version) => {
                        let slot = newest.entry(target).or_insert((version, value.clone()));
                        assert!(
                            slot.0 != version || slot.1 == value,
                            "one version wrote twice"
                        );
                        if slot.0 < version {
                            *slot = (version, value);
                        }
                    }
                    None => {
                        if let Some(previous) = read.insert(target.clone(), value.clone())
                            && previous != value
                        {
                            reads_disagree.insert(target);
                        }
                    }
                }
            }
        }
        for (target, value) in read {
            // Reads fill only what no change wrote; reads of one key can only differ when a
            // change came between them, which then decides.
            assert!(
                newest.contains_key(&target) || !reads_disagree.contains(&target),
                "reads wrote {target:?} differently with no change between"
            );
            newest.entry(target).or_insert(((0, 0), value));
        }
        let mut cache = Cache::new();
        for ((key, member), (_, value)) in newest {
            match (member, value) {
                (None, Some(text)) => {
                    cache.insert(key, Entry::Text(text));
                }
                (Some(member), Some(_)) => {
                    let entry = cache
                        .entry(key)
                        .or_insert_with(|| Entry::Members(BTreeSet::new()));
                    if let Entry::Members(members) = entry {
                        members.insert(member);
                    }
                }
                (_, None) => {}
            }
        }
        cache
    }

    /// The cache the table's final state calls for: every row some message mentions, under its
    /// three keys.
    pub fn table_cache(&self, prefix: &str) -> Cache {
        let mut cache = Cache::new();
        for user in self.rows.values().filter(|u| self.seen.contains(&u.id)) {
            let (row, by_email, team) = keys(prefix, user);
            cache.insert(row, Entry::Text(user.json()));
            cache.insert(by_email, Entry::Text(user.json()));
            let entry = cache
                .entry(team)
                .or_insert_with(|| Entry::Members(BTreeSet::new()));
            if let Entry::Members(members) = entry {
                members.insert(user.id.to_string());
            }
        }
        cache
    }

    /// Asserts that the versioning rules and the table agree (the generator's own test).
    pub fn check(&self, prefix: &str) {
        assert_eq!(
            self.expected(prefix),
            self.table_cache(prefix),
            "the model's rules and the table disagree"
        );
    }

    /// Which messages touched each key (and member).
    pub fn history(&self, prefix: &str) -> History {
        let mut history = History::new();
        for (n, message) in self.messages.iter().enumerate() {
            for op in message.ops(prefix) {
                let target = match op {
                    CacheOp::Set(key, _) | CacheOp::Del(key) => (key, None),
                    CacheOp::Add(key, member) | CacheOp::Remove(key, member) => (key, Some(member)),
                };
                history.entry(target).or_default().push(n);
            }
        }
        history
    }
}

/// How a key (or member) differs from the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Present with another (older) value.
    Value,
    /// Present, but a newer change removed it.
    Resurrected,
    /// Absent, but a newer change wrote it (an older delete won).
    Lost,
}

/// A key (or set member) where a cache differs from the expected one.
#[derive(Debug)]
pub struct Divergence {
    pub key: String,
    pub member: Option<String>,
    pub kind: Stale,
    pub what: String,
}

/// Differences between a cache and the expected one, one per key or set member.
pub fn diff(expected: &Cache, actual: &Cache) -> Vec<Divergence> {
    let mut out = Vec::new();
    let empty = BTreeSet::new();
    let keys: BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    for key in keys {
        let (want, got) = (expected.get(key), actual.get(key));
        let members = match (want, got) {
            (Some(Entry::Members(w)), Some(Entry::Members(g))) => Some((w, g)),
            (Some(Entry::Members(w)), None) => Some((w, &empty)),
            (None, Some(Entry::Members(g))) => Some((&empty, g)),
            _ => None,
        };
        if let Some((w, g)) = members {
            for member in w.symmetric_difference(g) {
                let (kind, what) = if w.contains(member) {
                    (Stale::Lost, "member missing")
                } else {
                    (Stale::Resurrected, "member present, should not be")
                };
                out.push(Divergence {
                    key: key.clone(),
                    member: Some(member.clone()),
                    kind,
                    what: what.to_owned(),
                });
            }
        } else if want != got {
            let kind = match (want, got) {
                (None, _) => Stale::Resurrected,
                (_, None) => Stale::Lost,
                _ => Stale::Value,
            };
            out.push(Divergence {
                key: key.clone(),
                member: None,
                kind,
                what: format!("expected {want:?}, found {got:?}"),
            });
        }
    }
    out
}

/// Divergences by kind: `(older values, resurrected, lost)`.
pub fn by_kind<'a>(divergences: impl IntoIterator<Item = &'a Divergence>) -> (usize, usize, usize) {
    let mut counts = (0, 0, 0);
    for divergence in divergences {
        match divergence.kind {
            Stale::Value => counts.0 += 1,
            Stale::Resurrected => counts.1 += 1,
            Stale::Lost => counts.2 += 1,
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_sequin_idempotency_keys() {
        assert_eq!(base64(b"1243361160:0"), "MTI0MzM2MTE2MDow");
        assert_eq!(base64(b"1243362320:1"), "MTI0MzM2MjMyMDox");
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
