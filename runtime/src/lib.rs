//! flowbus-runtime: the engine of flowbus.
//!
//! - [`message`]: the message assembly (`Root`, `LocalEnvironment`, `Environment`,
//!   `ExceptionList`).
//! - [`flow`]: flow files, from raw JSON to a validated petgraph graph to a built flow.
//! - [`node`]: the node-kind trait, specs, registry, and the two runtime node shapes.
//! - [`engine`]: depth-first propagation, error routing, input dispatch and back-pressure.
//! - [`activity`]: the activity log. [`stats`]: statistics. [`services`]: both, shared.
//! - [`paths`]: where a flow may read and write (its directory, and `[daemon] allowed_paths`).
//! - [`config`]: `flowbus.toml`. [`daemon`]: deploying, starting, stopping, watching and
//!   removing flows; one failure domain per flow; graceful shutdown. [`datadir`]: the data
//!   directory (private modes, one daemon at a time, the admin token).
//! - [`admin`]: the admin HTTP API. [`telemetry`]: the metrics registry and the
//!   Prometheus text format.
//! - [`harness`]: run flows in tests without a broker. [`input_task`]: where a flow input
//!   runs (a thread of its own) and the effects its nodes defer to the moments it yields.
//! - [`memory`]: the counting allocator behind the scripts' memory budget.

pub mod activity;
pub mod admin;
pub mod config;
pub mod daemon;
pub mod datadir;
pub mod engine;
pub mod flow;
pub mod harness;
pub mod input_task;
pub mod memory;
pub mod message;
pub mod node;
pub mod paths;
pub mod services;
pub mod stats;
pub mod telemetry;
pub mod time;
pub mod tree;

pub use engine::{
    CancellationToken, Dispatcher, Disposition, Flow, InputCtx, NodeHandle, Outputs, RunningFlow,
};
pub use message::{Body, Domain, Exception, ExceptionKind, Message};
pub use node::{BoxFut, BuiltNode, NodeFailure, Registry, Thrown};
