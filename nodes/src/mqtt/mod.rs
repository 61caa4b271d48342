//! The MQTT layer shared by MQTTSubscribe and MQTTPublish, one concern per module.
//!
//! - [`session`]: the life of a connection as a state machine without I/O (connect, reconnect
//!   on the IIB schedule, pause and resume, a broker that lost the session).

pub mod session;
