//! Integration tests against real Redis with real plugins. Run through `scripts/test.sh`.

#![allow(unreachable_pub, reason = "test modules share helpers with pub")]

mod cli;
mod cluster;
mod consistency;
mod dead_letters;
mod hostile;
mod hot_reload;
mod kafka;
mod languages;
mod memcached;
mod nats;
mod operations;
mod postgres;
mod rabbitmq;
mod redis_outage;
mod regressions;
mod scaffold;
mod scale_out;
mod shutdown;
mod sqs;
mod stream_source;
mod util;
mod versioned;
mod webhook;
