//! Integration tests against real Redis with real plugins. Run through `scripts/test.sh`.

#![allow(unreachable_pub, reason = "test modules share helpers with pub")]

mod cli;
mod consistency;
mod dead_letters;
mod hot_reload;
mod redis_outage;
mod stream_source;
mod util;
mod versioned;
