//! Test plugin for the consistency harness (`tests/all/consistency/`): caches the model table
//! `public.users (id, email unique, team, name, rev)`, whose tables have `REPLICA IDENTITY FULL`.
//!
//! | key | value |
//! |---|---|
//! | `<prefix>row:<id>` | the record JSON |
//! | `<prefix>user:<email>` | the record JSON: a key that depends on a column, not on the id |
//! | `<prefix>team:<team>` | set of the ids of the team's users |
//!
//! | change | operations |
//! |---|---|
//! | insert, read | `SET row`, `SET user:<email>`, `SADD team:<team> id` |
//! | update | `DEL user:<old email>` and `SREM team:<old team> id` when `changes` holds a different old value, then as insert |
//! | delete | `DEL row`, `DEL user:<email>`, `SREM team:<team> id` (the record is the full old row) |
//!
//! `[config] prefix` is the key prefix; `teams = false` leaves out the team sets (for a cache
//! without sets, such as Memcached).

use keepwarm_guest::{Action, Change, Config, Op, Plugin, ops};
use serde::Deserialize;

/// The plugin.
pub struct ModelCache {
    prefix: String,
    teams: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    prefix: String,
    #[serde(default = "yes")]
    teams: bool,
}

fn yes() -> bool {
    true
}

/// The columns that make keys.
#[derive(Deserialize)]
struct User {
    id: i64,
    email: String,
    team: String,
}

impl Plugin for ModelCache {
    fn new(config: &Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        Ok(ModelCache {
            prefix: settings.prefix,
            teams: settings.teams,
        })
    }

    fn handle(&self, change: &Change) -> Result<Vec<Op>, String> {
        let user: User = change.record()?;
        let p = &self.prefix;
        let id = user.id.to_string();
        let row = format!("{p}row:{id}");
        let by_email = format!("{p}user:{}", user.email);
        let team = format!("{p}team:{}", user.team);
        let record = change.record_json();
        let mut ops = Vec::new();
        match change.action() {
            Action::Delete => {
                let mut ops = vec![ops::del(row), ops::del(by_email)];
                if self.teams {
                    ops.push(ops::set_remove(team, [id]));
                }
                return Ok(ops);
            }
            Action::Update => {
                // The old values of the changed columns (REPLICA IDENTITY FULL).
                let old = change.old_values()?;
                let was = |column: &str| {
                    old.as_ref()
                        .and_then(|old| old.get(column))
                        .and_then(|value| value.as_str())
                        .map(str::to_owned)
                };
                if let Some(email) = was("email").filter(|e| *e != user.email) {
                    ops.push(ops::del(format!("{p}user:{email}")));
                }
                if let Some(old_team) = was("team").filter(|t| self.teams && *t != user.team) {
                    ops.push(ops::set_remove(format!("{p}team:{old_team}"), [id.clone()]));
                }
            }
            Action::Insert | Action::Read => {}
        }
        ops.push(ops::set(row, record));
        ops.push(ops::set(by_email, record));
        if self.teams {
            ops.push(ops::set_add(team, [id]));
        }
        Ok(ops)
    }
}

keepwarm_guest::export_plugin!(ModelCache);

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(action: &str, record: &str, changes: &str) -> Vec<Op> {
        let line = format!(
            r#"{{"record":{record},"changes":{changes},"action":"{action}","metadata":{{"table_schema":"public","table_name":"users","commit_timestamp":"2025-03-14T09:26:53.601022Z","commit_lsn":7,"commit_idx":1,"idempotency_key":"Nzox","record_pks":["5"]}}}}"#
        );
        let plugin = ModelCache::new(&Config::from_json(r#"{"prefix":"m:"}"#).unwrap()).unwrap();
        plugin
            .handle(&Change::from_message_json(&line).unwrap())
            .unwrap()
    }

    const RECORD: &str = r#"{"email":"b@x","id":5,"name":"n","rev":2,"team":"t2"}"#;

    #[test]
    fn an_update_that_moves_the_keys_deletes_the_old_ones() {
        assert_eq!(
            handle("update", RECORD, r#"{"email":"a@x","rev":1,"team":"t1"}"#),
            [
                ops::del("m:user:a@x"),
                ops::set_remove("m:team:t1", ["5"]),
                ops::set("m:row:5", RECORD),
                ops::set("m:user:b@x", RECORD),
                ops::set_add("m:team:t2", ["5"]),
            ]
        );
        assert_eq!(handle("update", RECORD, r#"{"rev":1}"#).len(), 3);
    }

    #[test]
    fn a_delete_removes_every_key_of_the_row() {
        assert_eq!(
            handle("delete", RECORD, "null"),
            [
                ops::del("m:row:5"),
                ops::del("m:user:b@x"),
                ops::set_remove("m:team:t2", ["5"]),
            ]
        );
        assert_eq!(
            handle("read", RECORD, "null"),
            handle("insert", RECORD, "null")
        );
    }

    #[test]
    fn without_teams_only_strings_are_written() {
        let line = format!(
            r#"{{"record":{RECORD},"changes":{{"email":"a@x","team":"t1"}},"action":"update","metadata":{{"table_schema":"public","table_name":"users","commit_timestamp":"2025-03-14T09:26:53.601022Z","commit_lsn":7,"commit_idx":1,"idempotency_key":"Nzox","record_pks":["5"]}}}}"#
        );
        let config = Config::from_json(r#"{"prefix":"m:","teams":false}"#).unwrap();
        let ops = ModelCache::new(&config)
            .unwrap()
            .handle(&Change::from_message_json(&line).unwrap())
            .unwrap();
        assert_eq!(
            ops,
            [
                ops::del("m:user:a@x"),
                ops::set("m:row:5", RECORD),
                ops::set("m:user:b@x", RECORD),
            ]
        );
    }
}
