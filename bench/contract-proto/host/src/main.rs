//! The cost of one plugin call per change, in process, under the contracts of README.md, each
//! call's answers made ready for the applier.
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod old {
    wasmtime::component::bindgen!({ world: "plugin", path: "../wit-old", ownership: Borrowing { duplicate_if_necessary: true } });
}
mod flat {
    wasmtime::component::bindgen!({ world: "plugin", path: "../wit-flat", ownership: Borrowing { duplicate_if_necessary: true } });
}
mod answers {
    wasmtime::component::bindgen!({ world: "plugin", path: "../wit-answers", ownership: Borrowing { duplicate_if_necessary: true } });
}
mod packed {
    wasmtime::component::bindgen!({ world: "plugin", path: "../wit-packed", ownership: Borrowing { duplicate_if_necessary: true } });
}

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
}
impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

#[derive(Clone, Copy)]
struct Sp(u32, u32);

/// A message as keepwarm holds it: its texts in one buffer, spans into it.
struct Msg {
    buf: Arc<str>,
    action: u8,
    schema: Sp,
    table: Sp,
    record: Sp,
    changes: Option<Sp>,
    ts: Sp,
    idem: Sp,
    metadata: Sp,
    pks: Vec<Sp>,
    lsn: Option<u64>,
}
impl Msg {
    fn t(&self, s: Sp) -> &str {
        &self.buf[s.0 as usize..(s.0 + s.1) as usize]
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn msg(i: u64) -> Msg {
    let r = splitmix(7 ^ splitmix(i));
    let id = r % 100_000 + 1;
    let pick = (r >> 32) % 100;
    let action = match pick {
        0..80 => 1,
        80..90 => 0,
        90..95 => 2,
        _ => 3,
    };
    let mut record = format!(
        r#"{{"id":{id},"customer_id":{},"status":"paid","currency":"EUR","total_amount":"12.34","shipping_weight_kg":3.25,"is_gift":false,"created_at":"2025-03-14T09:26:53.589793Z","updated_at":"2025-03-14T09:11:12.601022Z","shipping_address":{{"line1":"{id} Keizersgracht","city":"Amsterdam","postcode":"1015 CJ","country":"NL"}},"notes":""#,
        id % 9973 + 1
    );
    while record.len() < 596 {
        record.push(char::from(
            b'a' + ((record.len() + (i % 26) as usize) % 26) as u8,
        ));
    }
    record.push_str(r#""}"#);
    let metadata = format!(
        r#"{{"table_schema":"public","table_name":"orders","commit_timestamp":"2025-03-14T09:26:53.601022Z","commit_lsn":{},"commit_idx":0,"database_name":"shop-prod","transaction_annotations":null,"idempotency_key":"bench-{i}","record_pks":["{id}"],"enrichment":null,"consumer":{{"id":"0b7e1c52-3d4f-4a8e-9c21-6f5d8e7a9b10","name":"shop-cdc","annotations":{{}}}},"database":{{"id":"5a9c3e7d-2b1f-4c6a-8e0d-7f3b1a2c4d5e","name":"shop-prod","annotations":{{}},"database":"shop","hostname":"pg-primary.internal.example.com"}}}}"#,
        1_000_000_000 + i * 8
    );
    let changes = (action == 1).then(|| r#"{"status":"paid"}"#.to_owned());
    let idem = format!("bench-{i}");
    let pk = id.to_string();
    let mut buf = String::new();
    let mut push = |s: &str| {
        let st = buf.len() as u32;
        buf.push_str(s);
        Sp(st, s.len() as u32)
    };
    let schema = push("public");
    let table = push("orders");
    let record = push(&record);
    let changes = changes.as_deref().map(&mut push);
    let ts = push("2025-03-14T09:26:53.601022Z");
    let idem = push(&idem);
    let pks = vec![push(&pk)];
    let metadata = push(&metadata);
    Msg {
        buf: Arc::from(buf),
        action,
        schema,
        table,
        record,
        changes,
        ts,
        idem,
        metadata,
        pks,
        lsn: (action != 3).then_some(1_000_000_000 + i * 8),
    }
}

/// An operation as keepwarm's applier takes it today: an owned key and value.
#[derive(Debug, PartialEq)]
enum OwnedOp {
    Set(String, Vec<u8>),
    Del(String),
}

/// An operation over shared buffers: its key and value are ranges of a buffer held by
/// reference count (the answers' bytes, or the message's texts), as `bytes::Bytes` would hold
/// them.
#[allow(dead_code, reason = "built to be dropped: what it costs is the point")]
struct SharedOp {
    key: (Arc<[u8]>, Range<usize>),
    value: Option<(Arc<[u8]>, Range<usize>)>,
}

/// The owned operations of a batch's answers as the WIT types of `old`, `packed` and `flat` lift
/// them (all three share the `op` variant's shape).
macro_rules! owned {
    ($answers:expr, $types:path) => {{
        use $types as t;
        $answers
            .into_iter()
            .map(|answer| {
                answer.map(|ops| {
                    ops.into_iter()
                        .map(|op| match op {
                            t::Op::Set(set) => OwnedOp::Set(set.key, set.value),
                            t::Op::Del(key) => OwnedOp::Del(key),
                            _ => unreachable!("row-cache sets and deletes"),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect::<Vec<_>>()
    }};
}

/// The answers of `answers`: every operation's numbers, and the bytes of keys and values.
struct Answers {
    ops: Vec<u32>,
    bytes: Vec<u8>,
}

/// The answers of `answers` as owned operations, one allocation per key and value as today.
fn answers_owned(a: &Answers, chunk: &[Msg]) -> Vec<Vec<OwnedOp>> {
    let mut out: Vec<Vec<OwnedOp>> = (0..chunk.len()).map(|_| Vec::with_capacity(1)).collect();
    for op in a.ops.chunks_exact(6) {
        let r = |start: u32, len: u32| start as usize..(start + len) as usize;
        let key = String::from_utf8(a.bytes[r(op[2], op[3])].to_vec()).expect("UTF-8 key");
        let index = op[0] as usize;
        out[index].push(match op[1] {
            1 => OwnedOp::Del(key),
            0 => OwnedOp::Set(key, a.bytes[r(op[4], op[5])].to_vec()),
            _ => OwnedOp::Set(key, chunk[index].buf.as_bytes()[r(op[4], op[5])].to_vec()),
        });
    }
    out
}

/// The answers of `answers` as shared operations: no allocation per key or value.
fn answers_shared(a: Answers, chunk: &[Msg]) -> Vec<Vec<SharedOp>> {
    let bytes: Arc<[u8]> = Arc::from(a.bytes);
    let mut out: Vec<Vec<SharedOp>> = (0..chunk.len()).map(|_| Vec::with_capacity(1)).collect();
    for op in a.ops.chunks_exact(6) {
        let r = |start: u32, len: u32| start as usize..(start + len) as usize;
        let key = r(op[2], op[3]);
        std::str::from_utf8(&bytes[key.clone()]).expect("UTF-8 key");
        let index = op[0] as usize;
        let value = match op[1] {
            1 => None,
            0 => Some((bytes.clone(), r(op[4], op[5]))),
            _ => {
                let texts: Arc<str> = chunk[index].buf.clone();
                // A message's texts as bytes: `Arc<str>` to `Arc<[u8]>` without a copy.
                // SAFETY: `str` and `[u8]` have the same layout, and the pointer came from
                // `Arc::into_raw` of the same allocation.
                let texts: Arc<[u8]> =
                    unsafe { Arc::from_raw(Arc::into_raw(texts) as *const [u8]) };
                Some((texts, r(op[4], op[5])))
            }
        };
        out[index].push(SharedOp {
            key: (bytes.clone(), key),
            value,
        });
    }
    out
}

/// A call of an `answers` world with a batch, in the flat layout.
fn call_answers(
    plugin: &answers::Plugin,
    store: &mut Store<State>,
    chunk: &[Msg],
) -> anyhow::Result<Answers> {
    let (texts, layout, pks, versions) = flat_lists(chunk);
    let (ops, bytes) = plugin.proto_answers_transform().call_handle_batch(
        store,
        answers::proto::answers::types::Batch {
            texts: &texts,
            layout: &layout,
            pks: &pks,
            versions: &versions,
        },
    )?;
    Ok(Answers { ops, bytes })
}

/// The flat layout's lists for a batch.
/// One call of the flat world (contract 0.2.0's layout) on `chunk`, its answers made owned
/// operations: what the equivalence check compares and what the timing measures.
fn call_flat(
    plugin: &flat::Plugin,
    store: &mut Store<State>,
    chunk: &[Msg],
) -> anyhow::Result<Vec<Result<Vec<OwnedOp>, String>>> {
    let (texts, layout, pks, versions) = flat_lists(chunk);
    let answers = plugin.proto_flat_transform().call_handle_batch(
        store,
        flat::proto::flat::types::Batch {
            texts: &texts,
            layout: &layout,
            pks: &pks,
            versions: &versions,
        },
    )?;
    Ok(owned!(answers, flat::proto::flat::types))
}

fn flat_lists(chunk: &[Msg]) -> (Vec<&str>, Vec<u32>, Vec<u32>, Vec<u64>) {
    let mut texts: Vec<&str> = Vec::with_capacity(chunk.len());
    let mut layout: Vec<u32> = Vec::with_capacity(chunk.len() * 17);
    let mut pks: Vec<u32> = Vec::with_capacity(chunk.len() * 2);
    let mut versions: Vec<u64> = Vec::with_capacity(chunk.len() * 2);
    for m in chunk {
        texts.push(&m.buf);
        layout.push(u32::from(m.action));
        for s in [
            m.schema,
            m.table,
            m.record,
            m.changes.unwrap_or(Sp(0, u32::MAX)),
            m.ts,
            m.idem,
            m.metadata,
        ] {
            layout.push(s.0);
            layout.push(s.1);
        }
        layout.push((pks.len() / 2) as u32);
        layout.push(m.pks.len() as u32);
        for p in &m.pks {
            pks.push(p.0);
            pks.push(p.1);
        }
        versions.push(m.lsn.unwrap_or(u64::MAX));
        versions.push(m.lsn.map_or(u64::MAX, |_| 0));
    }
    (texts, layout, pks, versions)
}

fn engine() -> Engine {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(64);
    pool.total_core_instances(256);
    pool.total_memories(128);
    pool.total_tables(256);
    pool.max_memories_per_component(32);
    pool.max_memory_size(4 << 30);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).unwrap()
}

fn store(engine: &Engine) -> Store<State> {
    let mut s = Store::new(
        engine,
        State {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        },
    );
    s.set_epoch_deadline(u64::MAX / 2);
    s
}

fn old_action(a: u8) -> old::proto::old::types::Action {
    use old::proto::old::types::Action::*;
    [Insert, Update, Delete, Read][a as usize]
}
fn packed_action(a: u8) -> packed::proto::packed::types::Action {
    use packed::proto::packed::types::Action::*;
    [Insert, Update, Delete, Read][a as usize]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let args = &args[1..];
    let n: usize = args.get(1).map_or(50_000, |a| a.parse().unwrap());
    let batch: usize = args.get(2).map_or(148, |a| a.parse().unwrap());
    let rounds: usize = args.get(3).map_or(5, |a| a.parse().unwrap());
    let engine = engine();
    let mut linker: Linker<State> = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    let component = |name: &str| Component::from_file(&engine, dir.join(format!("{name}.wasm")));
    let mut old_s = store(&engine);
    let old_b = old::Plugin::instantiate(&mut old_s, &component("old")?, &linker)?;
    let mut packed_s = store(&engine);
    let packed_b = packed::Plugin::instantiate(&mut packed_s, &component("packed")?, &linker)?;
    let mut flat_s = store(&engine);
    let flat_b = flat::Plugin::instantiate(&mut flat_s, &component("flat")?, &linker)?;
    let mut answers_s = store(&engine);
    let answers_b = answers::Plugin::instantiate(&mut answers_s, &component("answers")?, &linker)?;
    let mut answersref_s = store(&engine);
    let answersref_b =
        answers::Plugin::instantiate(&mut answersref_s, &component("answersref")?, &linker)?;
    let msgs: Vec<Msg> = (0..n as u64).map(msg).collect();
    let mut sink = 0usize;
    // NOMETA=1: the packed layout without the metadata in its string (what metadata on demand
    // would save there).
    let nometa = std::env::var_os("NOMETA").is_some();
    let us = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / n as f64;
    // First, untimed: every world answers every batch alike.
    for chunk in msgs.chunks(batch) {
        let flat: Vec<Vec<OwnedOp>> = call_flat(&flat_b, &mut flat_s, chunk)?
            .into_iter()
            .map(|answer| answer.expect("row-cache rejects nothing"))
            .collect();
        for (plugin, store) in [
            (&answers_b, &mut answers_s),
            (&answersref_b, &mut answersref_s),
        ] {
            assert_eq!(
                answers_owned(&call_answers(plugin, store, chunk)?, chunk),
                flat
            );
        }
    }
    for round in 0..rounds {
        // old
        let t = Instant::now();
        for chunk in msgs.chunks(batch) {
            let pks: Vec<Vec<&str>> = chunk
                .iter()
                .map(|m| m.pks.iter().map(|&p| m.t(p)).collect())
                .collect();
            let params: Vec<old::proto::old::types::Change<'_>> = chunk
                .iter()
                .zip(&pks)
                .map(|(m, pks)| old::proto::old::types::Change {
                    action: old_action(m.action),
                    schema: m.t(m.schema),
                    table: m.t(m.table),
                    record: m.t(m.record),
                    changes: m.changes.map(|s| m.t(s)),
                    pks,
                    commit_lsn: m.lsn,
                    commit_idx: m.lsn.map(|_| 0),
                    commit_timestamp: m.t(m.ts),
                    idempotency_key: m.t(m.idem),
                    metadata: m.t(m.metadata),
                })
                .collect();
            let r = old_b
                .proto_old_transform()
                .call_handle_batch(&mut old_s, &params)?;
            sink += owned!(r, old::proto::old::types).len();
        }
        let old_us = us(t);
        // packed
        let t = Instant::now();
        for chunk in msgs.chunks(batch) {
            use packed::proto::packed::types::{Batch, Change, Span};
            let sp = |s: Sp| Span {
                start: s.0,
                len: s.1,
            };
            let mut pks: Vec<Span> = Vec::with_capacity(chunk.len());
            let changes: Vec<Change<'_>> = chunk
                .iter()
                .map(|m| {
                    let first = pks.len() as u32;
                    pks.extend(m.pks.iter().map(|&p| sp(p)));
                    Change {
                        action: packed_action(m.action),
                        texts: if nometa {
                            &m.buf[..m.metadata.0 as usize]
                        } else {
                            &m.buf
                        },
                        schema: sp(m.schema),
                        table: sp(m.table),
                        record: sp(m.record),
                        changes: m.changes.map_or(
                            Span {
                                start: 0,
                                len: u32::MAX,
                            },
                            sp,
                        ),
                        pks_first: first,
                        pks_count: m.pks.len() as u32,
                        commit_lsn: m.lsn,
                        commit_idx: m.lsn.map(|_| 0),
                        commit_timestamp: sp(m.ts),
                        idempotency_key: sp(m.idem),
                        metadata: if nometa {
                            Span { start: 0, len: 0 }
                        } else {
                            sp(m.metadata)
                        },
                    }
                })
                .collect();
            let r = packed_b.proto_packed_transform().call_handle_batch(
                &mut packed_s,
                Batch {
                    pks: &pks,
                    changes: &changes,
                },
            )?;
            sink += owned!(r, packed::proto::packed::types).len();
        }
        let packed_us = us(t);
        // flat: contract 0.2.0's layout
        let t = Instant::now();
        for chunk in msgs.chunks(batch) {
            sink += call_flat(&flat_b, &mut flat_s, chunk)?.len();
        }
        let flat_us = us(t);
        // flat answers, in turn: made owned operations; shared; values as spans of the input
        let mut answers_us = [0.0; 3];
        for (variant, took) in answers_us.iter_mut().enumerate() {
            let (plugin, store) = match variant {
                2 => (&answersref_b, &mut answersref_s),
                _ => (&answers_b, &mut answers_s),
            };
            let t = Instant::now();
            for chunk in msgs.chunks(batch) {
                let r = call_answers(plugin, store, chunk)?;
                sink += match variant {
                    0 => answers_owned(&r, chunk).len(),
                    _ => answers_shared(r, chunk).len(),
                };
            }
            *took = us(t);
        }
        let [owned_us, shared_us, ref_us] = answers_us;
        println!(
            "round {round} (µs/change): old {old_us:.3} packed {packed_us:.3} flat {flat_us:.3} | \
             answers: owned {owned_us:.3} shared {shared_us:.3} value-by-span {ref_us:.3}"
        );
    }
    // Answers counted, so that no call is optimised away.
    eprintln!("{sink} answers");
    Ok(())
}
