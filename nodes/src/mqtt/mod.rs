//! The MQTT layer shared by MQTTSubscribe and MQTTPublish, one concern per module (a
//! picture of the parts: `docs/ARCHITECTURE.md`, "Connections").
//!
//! - [`conn`]: the paho adapter, [`Conn`]: one paho-mqtt client and what is asked of it.
//! - [`session`]: the life of a connection as a state machine without I/O (connect, reconnect
//!   on the IIB schedule, pause and resume, a broker that lost the session); [`supervisor`]
//!   carries out its actions.
//! - [`outbox`]: where a publication is handed to paho. [`restore`]: publications dropped with
//!   a lost session. [`reaper`]: closed clients destroyed off Paho's threads.
//! - [`message`], [`redelivery`]: what a received message carries, and which resends were
//!   already received.
//! - [`endpoint`], [`props`], [`ids`], [`policy_gate`], [`log`]: brokers and TLS, the nodes'
//!   shared properties and topic checks, client ids, the QoS policy per topic, activity-log
//!   numbers and context.

pub mod conn;
pub mod endpoint;
pub mod ids;
pub mod log;
pub mod message;
pub mod outbox;
pub mod policy_gate;
pub mod props;
pub mod reaper;
pub mod redelivery;
pub mod restore;
pub mod session;
pub mod supervisor;

pub use conn::*;
pub use endpoint::*;
pub use ids::*;
pub use log::*;
pub use message::*;
pub use outbox::*;
pub use policy_gate::*;
pub use props::*;
pub use reaper::*;
pub use redelivery::*;
pub use session::{Backoff, Want};
