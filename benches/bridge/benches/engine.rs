//! Criterion microbenchmarks of flowbus's per-message engine path, without MQTT, for the
//! bridge the end-to-end benchmark runs (parse a 200-byte JSON payload, build the trees, run
//! the enrich script in a Compute node, serialise the body), each step alone and all together,
//! plus flow validation and loading of a 200-node flow.
//!
//! `cargo bench --bench engine` from benches/bridge (or `make bench-micro`). The numbers are
//! per message (per flow for validation).

use std::collections::BTreeSet;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use flowbus_runtime::config::Config;
use flowbus_runtime::flow::{load_flow, validate};
use flowbus_runtime::message::{Body, Domain};
use flowbus_runtime::node::ValidateCtx;
use flowbus_runtime::services::Services;
use serde_json::{json, Value};

mod fixture;
use fixture::{bridge_flow, enrich_script, payload, receive, scratch, with_trees};

/// A flow of 200 nodes: one MQTTSubscribe and 199 Compute nodes in a chain, each with its own
/// small inline script.
fn big_flow_text() -> String {
    let mut nodes = vec![json!({ "id": "n0", "type": "MQTTSubscribe",
        "url": "tcp://127.0.0.1:1883", "topic": "plant/+/telemetry", "qos": 1 })];
    let mut connections = Vec::new();
    for i in 1..200 {
        nodes.push(json!({ "id": format!("n{i}"), "type": "Compute",
            "code": format!("Root.Body.step{i} = {i}; if Root.Body.t > {i} {{ Root.Body.hot = true; }}") }));
        let from = if i == 1 {
            "n0.Out".to_string()
        } else {
            format!("n{}.Out", i - 1)
        };
        connections.push(json!({ "from": from, "to": format!("n{i}") }));
    }
    serde_json::to_string_pretty(
        &json!({ "name": "big", "nodes": nodes, "connections": connections }),
    )
    .expect("serialise")
}

fn engine_path(c: &mut Criterion) {
    let p = payload();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let flow = bridge_flow();
    let ctx = flow.input_ctx("in").expect("input node");
    let script = enrich_script();

    let mut g = c.benchmark_group("engine");
    g.bench_function("baseline: serde_json parse + insert + serialise", |b| {
        b.iter(|| {
            let mut v: Value = serde_json::from_slice(&p).expect("json");
            if let Some(o) = v.as_object_mut() {
                o.insert("bridged".into(), Value::Bool(true));
            }
            serde_json::to_vec(&v).expect("serialise")
        })
    });
    g.bench_function("1 payload parse (Body::parse JSON)", |b| {
        b.iter(|| Body::parse(Domain::Json, &p).expect("json"))
    });
    g.bench_function("2 tree construction (Message::new + MQTT.Input)", |b| {
        b.iter_batched(
            || Body::parse(Domain::Json, &p).expect("json"),
            with_trees,
            BatchSize::SmallInput,
        )
    });
    g.bench_function("3 Rhai enrich script (Script::run)", |b| {
        let msg = receive(&p);
        b.iter(|| script.run(&msg, &["Out"]).expect("script"))
    });
    g.bench_function("4 propagation in → Compute (InputCtx::dispatch)", |b| {
        b.iter_batched(
            || receive(&p),
            |msg| rt.block_on(ctx.dispatch(msg)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("5 serialisation (Body::to_bytes)", |b| {
        let out = script.run(&receive(&p), &["Out"]).expect("script").message;
        b.iter(|| out.root.body.to_bytes())
    });
    g.bench_function(
        "all: parse + trees + dispatch through Compute + serialise",
        |b| {
            let out = script.run(&receive(&p), &["Out"]).expect("script").message;
            b.iter(|| {
                let msg = receive(&p);
                rt.block_on(ctx.dispatch(msg));
                // The publish node serialises the Compute node's output.
                out.root.body.to_bytes()
            })
        },
    );
    g.bench_function(
        "Rhai engine creation (flowbus_nodes::script::engine)",
        |b| b.iter(|| flowbus_nodes::script::engine(&flowbus_nodes::script::Limits::default())),
    );
    g.finish();
}

fn validation(c: &mut Criterion) {
    let text = big_flow_text();
    let registry = flowbus_nodes::registry();
    let ctx = ValidateCtx {
        servers: BTreeSet::new(),
    };
    let dir = scratch("big");
    let path = dir.join("big.json");
    std::fs::write(&path, &text).expect("write flow");
    assert!(validate(&path, &text, &registry, &ctx).is_ok());
    let mut g = c.benchmark_group("flow");
    g.sample_size(20);
    g.bench_function("validate 200-node flow", |b| {
        b.iter(|| validate(&path, &text, &registry, &ctx).expect("valid"))
    });
    g.bench_function(
        "load 200-node flow (validate + build: 199 Rhai compiles)",
        |b| {
            b.iter(|| {
                load_flow(
                    &path,
                    &registry,
                    Arc::new(Config::default()),
                    Arc::new(Services::default()),
                )
                .expect("loads")
            })
        },
    );
    g.finish();
}

criterion_group!(benches, engine_path, validation);
criterion_main!(benches);
