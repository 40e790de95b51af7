//! The cost of one plugin call per change, in process, under three contracts (README.md).
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
    buf: Box<str>,
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
        buf: buf.into_boxed_str(),
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
    let old_c = Component::from_file(&engine, dir.join("old.wasm"))?;
    let packed_c = Component::from_file(&engine, dir.join("packed.wasm"))?;
    let mut old_s = store(&engine);
    let old_b = old::Plugin::instantiate(&mut old_s, &old_c, &linker)?;
    let mut packed_s = store(&engine);
    let packed_b = packed::Plugin::instantiate(&mut packed_s, &packed_c, &linker)?;
    let flat_c = Component::from_file(&engine, dir.join("flat.wasm"))?;
    let mut flat_s = store(&engine);
    let flat_b = flat::Plugin::instantiate(&mut flat_s, &flat_c, &linker)?;
    let msgs: Vec<Msg> = (0..n as u64).map(msg).collect();
    let mut sink = 0usize;
    // NOMETA=1: the packed layout without the metadata in its string (what metadata on demand
    // would save there).
    let nometa = std::env::var_os("NOMETA").is_some();
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
            sink += r.len();
        }
        let old_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
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
            sink += r.len();
        }
        let packed_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        let t = Instant::now();
        for chunk in msgs.chunks(batch) {
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
            let r = flat_b.proto_flat_transform().call_handle_batch(
                &mut flat_s,
                flat::proto::flat::types::Batch {
                    texts: &texts,
                    layout: &layout,
                    pks: &pks,
                    versions: &versions,
                },
            )?;
            sink += r.len();
        }
        let flat_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!(
            "round {round}: old {old_us:.3} packed {packed_us:.3} flat {flat_us:.3} µs/change; packed/old {:.3} flat/old {:.3}",
            packed_us / old_us,
            flat_us / old_us
        );
    }
    // Answers counted, so that no call is optimised away.
    eprintln!("{sink} answers");
    Ok(())
}
