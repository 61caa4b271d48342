//! Where a publication is handed to paho: the outbox that batches a flow input's
//! publications per wake-up of paho's send thread.

use super::{conn::Conn, log::bip, log::LogCtx};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use flowbus_runtime::activity::Severity;

use flowbus_runtime::stats::{add, inc};
use paho_mqtt as paho;

/// Publications that nodes have handed over, in order, waiting to be handed to paho.
///
/// Each paho publish wakes paho's send thread, which writes the packet and sleeps again: one
/// hand-off (a futex wake and two context switches) per message when publishes come one at a
/// time, tens of microseconds apart, as they do behind a script. So a node's publish goes into
/// this queue, and everything queued is handed to paho in one go when the flow input's task
/// that queued it yields (`flowbus_runtime::input_task`), i.e. once the messages that had
/// already arrived have been processed, on the same thread. Paho's send thread then finds a
/// batch per wake-up. A publication queued from anywhere else (several instances, restored
/// publications) is handed over by a task per connection instead, woken for it. Order is kept
/// (one queue, handed over under one lock); at a low rate a batch is one message and costs no
/// task switch.
#[derive(Default)]
pub struct Outbox {
    queue: Mutex<Vec<Outgoing>>,
    /// Held while a batch is handed to paho: a flush before a disconnect waits for a hand-over
    /// in progress on another thread, so nothing taken from the queue reaches paho after the
    /// disconnect (paho refuses it then; seen as QoS 0 messages missing after a SIGTERM).
    handing: Mutex<()>,
    pub(crate) wake: tokio::sync::Notify,
    started: AtomicBool,
    pub(crate) closed: AtomicBool,
}

/// A publication and, if its sender wants it, where its token goes.
type Outgoing = (
    paho::Message,
    Option<tokio::sync::oneshot::Sender<paho::DeliveryToken>>,
);

impl Outbox {
    /// Hands everything queued to paho, in order. A hand-over in progress elsewhere finishes
    /// first, so whatever was queued when this is called is with paho when it returns.
    pub(crate) fn hand_over(&self, client: &paho::AsyncClient, log: &LogCtx) {
        let _turn = self.handing.lock().unwrap_or_else(|p| p.into_inner());
        let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for (m, tx) in batch {
            match tx {
                Some(tx) => {
                    let _ = tx.send(client.publish(m));
                }
                // QoS 0: nobody waits for the token, so a publication paho refuses (the
                // connection went away since the node checked) is reported here, and what it
                // takes is counted here (the node counts QoS 1/2 once acknowledged).
                None => {
                    let len = m.payload().len() as u64;
                    match client.try_publish(m) {
                        Ok(_) => {
                            inc(&log.stats.messages_sent);
                            add(&log.stats.bytes_sent, len);
                        }
                        Err(e) => refused_qos0(log, &e),
                    }
                }
            }
        }
    }
}

/// A QoS 0 publication paho refused at the hand-over: the node has already passed the message
/// on, so the activity log is where it ends.
fn refused_qos0(log: &LogCtx, e: &paho::Error) {
    let (topic, why) = match e {
        paho::Error::Publish(rc, m) => (m.topic().to_string(), paho::Error::from(*rc).to_string()),
        other => (String::new(), other.to_string()),
    };
    log.record(
        log.entry(
            Severity::Error,
            bip::PUBLISH_ERROR,
            format!(
                "Publish to '{topic}' (QoS 0) was refused by the client: {why}; the message is lost (QoS 0 is not retried)"
            ),
        )
        .tag("topic", topic),
    );
}

/// A publication sent from a flow input's task is handed to paho when that task yields (see
/// [`Outbox`]).
impl flowbus_runtime::input_task::OnYield for Conn {
    fn on_yield(&self) {
        self.outbox.hand_over(&self.client, &self.log);
    }
}

impl Conn {
    /// Queues a publication for paho (see [`Outbox`]); the token comes through the returned
    /// receiver when `want_token` (an error from it means the connection was dropped first).
    pub fn send(
        self: &Arc<Self>,
        m: paho::Message,
        want_token: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<paho::DeliveryToken>> {
        let (tx, rx) = if want_token {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.outbox
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((m, tx));
        // In a flow input's task: handed over when that task yields, on its own thread.
        if flowbus_runtime::input_task::defer(self) {
            return rx;
        }
        if !self.outbox.started.swap(true, Ordering::SeqCst) {
            let outbox = self.outbox.clone();
            let conn = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    outbox.wake.notified().await;
                    if outbox.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    let Some(conn) = conn.upgrade() else { return };
                    outbox.hand_over(&conn.client, &conn.log);
                }
            });
        }
        self.outbox.wake.notify_one();
        rx
    }

    /// Hands whatever is still queued to paho now (before a disconnect).
    pub fn flush(&self) {
        self.outbox.hand_over(&self.client, &self.log);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{conn::Conn, conn::ConnSpec, endpoint::Endpoint, session::Backoff};
    use flowbus_runtime::services::Services;
    use std::time::Duration;

    /// A connection that is never connected (paho refuses its publications).
    fn unconnected(services: &Arc<Services>, client_id: &str) -> Arc<Conn> {
        Conn::new(ConnSpec {
            endpoint: &Endpoint::inline("tcp://127.0.0.1:9", 4),
            client_id: client_id.into(),
            persistent_session: false,
            persist_dir: None,
            connect_timeout: Duration::from_secs(1),
            backoff: Backoff {
                initial: Duration::from_secs(5),
                step: Duration::from_secs(5),
                max: Duration::from_secs(5),
            },
            services: services.clone(),
            flow: "f",
            node: "out",
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The error entries of the activity log.
    fn errors(services: &Services) -> Vec<Arc<flowbus_runtime::activity::Entry>> {
        services.activity.query(&flowbus_runtime::activity::Filter {
            severity: Some(Severity::Error),
            ..Default::default()
        })
    }

    /// From a flow input's task, publications are queued and handed to paho together when
    /// the task yields, on the same task: no outbox task is started or woken for them.
    #[tokio::test]
    async fn publications_from_a_flow_input_are_handed_over_when_its_task_yields() {
        let services = Arc::new(Services::default());
        let conn = unconnected(&services, "on-yield");
        let task = {
            let (conn, services) = (conn.clone(), services.clone());
            tokio::spawn(flowbus_runtime::input_task::RunOnYield::new(async move {
                for _ in 0..3 {
                    assert!(conn
                        .send(paho::Message::new("plant/out", "{}", 0), false)
                        .is_none());
                }
                let queued = conn.outbox.queue.lock().unwrap().len();
                let refused = errors(&services).len();
                tokio::task::yield_now().await;
                (queued, refused)
            }))
        };
        // Queued, not yet handed over (paho would have refused them: not connected).
        assert_eq!(task.await.unwrap(), (3, 0));
        // Handed over at the yield: all three refused, each logged.
        assert!(conn.outbox.queue.lock().unwrap().is_empty());
        assert_eq!(errors(&services).len(), 3);
        assert!(
            !conn.outbox.started.load(Ordering::SeqCst),
            "no outbox task"
        );
        // Elsewhere, the connection's outbox task hands them over.
        conn.send(paho::Message::new("plant/out", "{}", 0), false);
        assert!(conn.outbox.started.load(Ordering::SeqCst));
    }

    /// A QoS 0 publication is not waited for, so one paho refuses at the hand-over (here: the
    /// client never connected) must end in the activity log, not vanish.
    #[tokio::test]
    async fn a_refused_qos_0_publication_is_logged() {
        let services = Arc::new(Services::default());
        let conn = unconnected(&services, "refused-qos0");
        assert!(conn
            .send(paho::Message::new("plant/out", "{}", 0), false)
            .is_none());
        conn.flush();
        let errors = errors(&services);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            conn.log.stats.messages_sent.load(Ordering::SeqCst),
            0,
            "not counted as sent"
        );
        assert_eq!(errors[0].number, "BIP4311");
        assert_eq!(errors[0].node, "out");
        assert!(
            errors[0]
                .message
                .starts_with("Publish to 'plant/out' (QoS 0) was refused by the client: ")
                && errors[0]
                    .message
                    .ends_with("the message is lost (QoS 0 is not retried)"),
            "{}",
            errors[0].message
        );
    }
}
