//! The supervisor: carries out what the session state machine ([`super::session`]) decides —
//! the one place that connects, disconnects and sleeps — and writes what it says to the
//! activity log.

use super::{
    conn::Conn, conn::OnConnected, endpoint::describe_error, log::bip, restore::report_discarded,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use flowbus_runtime::activity::Severity;

use crate::qos_policy::Source;
use flowbus_runtime::stats::inc;
use flowbus_runtime::BoxFut;
use paho_mqtt as paho;

/// Whether a failed connect is one no retry mends: the client's persistence failed (the
/// in-flight log could not be read or written), so the supervisor stops and the flow fails.
fn gives_up(e: &paho::Error) -> bool {
    matches!(e, paho::Error::PersistenceError)
}

impl Conn {
    /// Starts the supervisor task.
    pub fn spawn(self: &Arc<Self>, on_connected: OnConnected) {
        let me = self.clone();
        let h = tokio::spawn(async move { me.supervise(on_connected).await });
        *self.supervisor.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    /// Carries out what the session state machine ([`crate::mqtt::session`]) decides, and
    /// feeds it what happened: the only place that connects, disconnects and sleeps.
    async fn supervise(self: Arc<Self>, on_connected: OnConnected) {
        use crate::mqtt::session::{Action, Event, Session};
        let (Some(mut lost), Some(mut reconnect)) = (
            self.lost_rx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
            self.reconnect_rx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        ) else {
            return;
        };
        let mut want = self.want.subscribe();
        let mut session = Session::new(self.backoff);
        let mut todo: std::collections::VecDeque<Action> =
            session.start(*want.borrow_and_update()).into();
        // What an action started and has not answered yet.
        let mut connecting: Option<BoxFut<'static, paho::Result<paho::ServerResponse>>> = None;
        let mut disconnecting: Option<BoxFut<'static, Result<(), String>>> = None;
        let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        // In flight when the connect started, and of those the restored ones (Paho removes
        // them from the store while it answers the connect, so they are read before).
        let mut unacknowledged = 0;
        let mut restored: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            while let Some(action) = todo.pop_front() {
                match action {
                    Action::Connect => {
                        unacknowledged = self
                            .unacknowledged
                            .as_ref()
                            .map_or(0, |n| n.load(Ordering::Relaxed));
                        restored = match &self.restored {
                            Some(r) if unacknowledged > 0 => r
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                            _ => Vec::new(),
                        };
                        connecting = Some(Box::pin(self.connect()));
                    }
                    Action::MarkOpen => self.mark_open(),
                    Action::MarkClosed => self.mark_closed(),
                    Action::Ready { session_present } => {
                        let _ = tokio::time::timeout(
                            self.connect_timeout,
                            on_connected(session_present),
                        )
                        .await;
                        self.connected.send_replace(true);
                    }
                    Action::Republish => {
                        tokio::spawn(self.clone().publish_restored(std::mem::take(&mut restored)));
                    }
                    Action::LearnLimit(q) => self.learn_limit(q, Source::Connack),
                    Action::Disconnect { grace, .. } => {
                        let token = self.client.disconnect_after(grace);
                        disconnecting = Some(Box::pin(async move {
                            token.await.map(drop).map_err(|e| e.to_string())
                        }));
                    }
                    Action::Wait(d) => timer = Some(Box::pin(tokio::time::sleep(d))),
                    Action::CountFailure => inc(&self.log.stats.failed_connections),
                    Action::GiveUp(reason) => {
                        self.fatal.send_replace(Some(reason));
                        return;
                    }
                    Action::Note(note) => self.note(note),
                }
            }
            let event = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                    connecting = None;
                    match r {
                        Ok(resp) => {
                            // Connection-lost notifications from before this connection are
                            // stale.
                            while lost.try_recv().is_ok() {}
                            while reconnect.try_recv().is_ok() {}
                            Event::Connected {
                                session_present: resp
                                    .connect_response()
                                    .is_some_and(|c| c.session_present),
                                unacknowledged,
                                restored: restored.len(),
                                max_qos: resp
                                    .properties()
                                    .get_int(paho::PropertyCode::MaximumQos)
                                    .map(|q| q.clamp(0, 2) as u8),
                            }
                        }
                        Err(e) if gives_up(&e) => Event::ConnectFailed {
                            error: format!(
                                "connecting to {} failed: the MQTT client's persistence (the in-flight log under the data directory) failed: {e}; not retried",
                                self.log.url
                            ),
                            fatal: true,
                        },
                        Err(e) => Event::ConnectFailed {
                            error: describe_error(&e, &self.log.url),
                            fatal: false,
                        },
                    }
                }
                r = async { disconnecting.as_mut().expect("guarded").await }, if disconnecting.is_some() => {
                    disconnecting = None;
                    Event::Disconnected(r)
                }
                _ = async { timer.as_mut().expect("guarded").await }, if timer.is_some() => {
                    timer = None;
                    Event::TimerFired
                }
                Some(()) = lost.recv() => Event::Lost,
                Some(()) = reconnect.recv() => Event::ReconnectAsked,
                Ok(()) = want.changed() => Event::Want(*want.borrow_and_update()),
            };
            todo.extend(session.on(event));
        }
    }

    /// Writes what the session state machine says to the activity log.
    fn note(&self, note: crate::mqtt::session::Note) {
        use crate::mqtt::session::Note;
        let log = &self.log;
        let url = &log.url;
        let entry = match note {
            Note::Connected { session_present } => log
                .entry(
                    Severity::Info,
                    bip::CONNECTED,
                    format!(
                        "Connected to {url} as '{}'{}",
                        log.client_id,
                        if session_present {
                            " (session resumed)"
                        } else {
                            ""
                        }
                    ),
                )
                .tag("session_present", session_present),
            Note::Discarded {
                unacknowledged,
                restored,
            } => return report_discarded(log, unacknowledged, restored),
            Note::BrokerLimit(q) => log
                .entry(
                    Severity::Info,
                    bip::BROKER_LIMIT,
                    format!("The broker allows at most QoS {q} (MQTT v5 CONNACK Maximum QoS)"),
                )
                .tag("max_qos", q),
            Note::Lost { retry_in } => log.entry(
                Severity::Warning,
                bip::CONNECTION_LOST,
                format!(
                    "Lost the connection to {url}; reconnecting in {}",
                    flowbus_runtime::time::human(retry_in)
                ),
            ),
            Note::DisconnectedToReconnect => log.entry(
                Severity::Warning,
                bip::DISCONNECTED,
                format!("Disconnected from {url} to reconnect after a failed publish attempt"),
            ),
            Note::Paused => log.entry(
                Severity::Info,
                bip::DISCONNECTED,
                format!(
                    "Disconnected from {url} (paused; the broker keeps the session's messages)"
                ),
            ),
            Note::PauseFailed(e) => log.entry(
                Severity::Warning,
                bip::DISCONNECT_FAILED,
                format!("Failed to disconnect from {url} while pausing: {e}"),
            ),
            Note::FirstFailure(e) => log.entry(
                Severity::Error,
                bip::FIRST_FAILED_CONNECT,
                format!("Failed to connect to {url}: {e}"),
            ),
            Note::Failure {
                attempt,
                error,
                retry_in,
            } => log
                .entry(
                    Severity::Error,
                    bip::CONNECTION_FAILURE,
                    format!(
                        "Connection to {url} failed (attempt {attempt}): {error}; retrying in {}",
                        flowbus_runtime::time::human(retry_in)
                    ),
                )
                .tag("attempt", attempt)
                .tag("retry_in_ms", retry_in.as_millis() as u64),
            Note::Fatal(reason) => log.entry(Severity::Error, bip::CONNECTION_FAILURE, reason),
        };
        log.record(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_persistence_failure_ends_the_reconnects() {
        assert!(gives_up(&paho::Error::PersistenceError));
        assert!(!gives_up(&paho::Error::TcpTlsConnectFailure));
        assert!(!gives_up(&paho::Error::ConnectReturn(
            paho::ConnectReturnCode::ServerUnavailable
        )));
    }
}
