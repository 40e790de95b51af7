//! Test plugin for hot reload: tags every change with the version that applied it.
//!
//! For each change it sets `<prefix>row:<pks>` to `<tag>` and adds `<lsn>:<idx>` to the set
//! `<prefix>seen:<tag>`. Two versions with different tags are distinguishable in Redis, and the
//! sets show which version applied each change.

use keepwarm_guest::{Change, Config, Op, Plugin, ops};

/// The tagger.
pub struct Tagger {
    prefix: String,
    tag: String,
}

#[derive(serde::Deserialize)]
struct Settings {
    prefix: String,
    tag: String,
}

impl Plugin for Tagger {
    fn new(config: &Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        Ok(Tagger {
            prefix: settings.prefix,
            tag: settings.tag,
        })
    }

    fn handle(&self, change: &Change) -> Result<Vec<Op>, String> {
        let (lsn, idx) = change.version().unwrap_or_default();
        let row = change.pks().join(":");
        Ok(vec![
            ops::set(format!("{}row:{row}", self.prefix), self.tag.clone()),
            ops::set_add(
                format!("{}seen:{}", self.prefix, self.tag),
                [format!("{lsn}:{idx}")],
            ),
        ])
    }
}

keepwarm_guest::export_plugin!(Tagger);
