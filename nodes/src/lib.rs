//! flowbus-nodes: the node kinds, one module each.
//!
//! - [`compute`], [`filter`]: Rhai scripts, sharing [`script`] (sandboxed engine, tree
//!   conversion, errors with script line:column).
//! - [`mqtt_subscribe`], [`mqtt_publish`]: the MQTT nodes, sharing [`mqtt`] (one paho
//!   client per node, the reconnect supervisor, activity-log events and statistics) and
//!   [`mqtt_limits`] (what MQTT can carry, checked before paho sees a value).
//! - [`input_journal`]: an append-only journal on disk of the messages a subscriber received
//!   and has not finished with, so that a SIGKILL loses none of them.
//!   It and the in-flight store ([`mqtt_store`]) check their records with one checksum
//!   (`checksum`), part of their file format.
//! - [`doctor`]: `flowbus doctor`, which probes every server the flows use.
//! - [`qos_policy`]: QoS policy alignment (server `max_qos`, per-topic rules, broker limits).
//! - [`trace`], [`trycatch`], [`throw`], [`timer`]: flow plumbing and a broker-less input.
//!
//! [`registry`] maps every type name to its kind.

mod checksum;
pub mod compute;
pub mod doctor;
pub mod filter;
pub mod input_journal;
pub mod mqtt;
pub mod mqtt_limits;
pub mod mqtt_publish;
pub mod mqtt_store;
pub mod mqtt_subscribe;
pub mod qos_policy;
pub mod script;
mod script_hints;
mod script_paths;
pub mod throw;
pub mod timer;
pub mod trace;
pub mod trycatch;

use flowbus_runtime::node::Registry;

/// The unit tests count memory as the daemon does, so the scripts' memory budget is tested.
#[cfg(test)]
#[global_allocator]
static ALLOC: flowbus_runtime::memory::Counting = flowbus_runtime::memory::Counting;

/// A registry with every built-in node kind.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(compute::ComputeKind)
        .register(filter::FilterKind)
        .register(trace::TraceKind)
        .register(trycatch::TryCatchKind)
        .register(throw::ThrowKind)
        .register(timer::TimerKind)
        .register(mqtt_subscribe::SubscribeKind)
        .register(mqtt_publish::PublishKind);
    r
}
