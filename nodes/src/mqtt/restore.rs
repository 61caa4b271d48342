//! The lost-session path: publications paho dropped with a session the broker lost, said in
//! the activity log, and the ones restored from the in-flight log published again.

use super::{conn::Conn, log::bip, log::LogCtx};
use std::sync::Arc;

use flowbus_runtime::activity::Severity;

use paho_mqtt as paho;

/// Paho drops the publications it has in flight when the broker answers a connect with no
/// session for the client (`sessionPresent` 0: a broker restarted without persistence, or a
/// session that expired). Those may never have reached the broker; say so where an operator
/// looks, rather than lose them silently.
pub(crate) fn report_discarded(log: &LogCtx, n: usize, restored: usize) {
    log.record(
        log.entry(
            Severity::Warning,
            bip::INFLIGHT_DISCARDED,
            format!(
                "{n} publication(s) in flight were dropped by the MQTT client: the broker at {} \
                 had no session for '{}' when it connected (restarted without persistence, or \
                 the session expired), so they may not have reached it. {restored} from before \
                 flowbus started are published again now from the in-flight log; those of a \
                 running flow are published again at once by their MQTTPublish node (either \
                 may reach the broker twice). Run the broker \
                 with persistence to keep sessions across its restarts",
                log.url, log.client_id
            ),
        )
        .tag("count", n)
        .tag("restored", restored),
    );
}

/// An in-flight log that was not sound when the client opened it (see `mqtt_store`): it was
/// renamed aside and a new one started from its sound records. Publications in the records
/// that were lost are not sent; the error says how many, and where the old file is.
pub(crate) fn report_corrupt_log(log: &LogCtx, r: &crate::mqtt_store::Recovery) {
    log.record(
        log.entry(
            Severity::Error,
            bip::INFLIGHT_LOG_CORRUPT,
            format!(
                "{} (client '{}'); the publications in lost records are not sent",
                r.describe(),
                log.client_id
            ),
        )
        .tag("file", r.file.display().to_string())
        .tag("aside", r.aside.display().to_string())
        .tag("kept", r.kept)
        .tag("lost", r.invalid)
        .tag("unreadable_bytes", r.unreadable_bytes),
    );
}

/// A publication read back from the in-flight log, as a paho message.
fn restored_message(p: &crate::mqtt_store::Publication) -> paho::Message {
    use crate::mqtt_store::Property as P;
    let mut b = paho::MessageBuilder::new()
        .topic(p.topic.as_str())
        .payload(p.payload.as_slice())
        .qos(i32::from(p.qos))
        .retained(p.retained);
    if !p.properties.is_empty() {
        let mut props = paho::Properties::new();
        for prop in &p.properties {
            let _ = match prop {
                P::PayloadFormat(v) => {
                    props.push_int(paho::PropertyCode::PayloadFormatIndicator, i32::from(*v))
                }
                P::MessageExpiry(v) => props.push_int(
                    paho::PropertyCode::MessageExpiryInterval,
                    i32::try_from(*v).unwrap_or(i32::MAX),
                ),
                P::ContentType(v) => props.push_string(paho::PropertyCode::ContentType, v),
                P::ResponseTopic(v) => props.push_string(paho::PropertyCode::ResponseTopic, v),
                P::CorrelationData(v) => {
                    props.push_binary(paho::PropertyCode::CorrelationData, v.clone())
                }
                P::User(k, v) => props.push_string_pair(paho::PropertyCode::UserProperty, k, v),
            };
        }
        b = b.properties(props);
    }
    b.finalize()
}

impl Conn {
    /// Publishes again, in packet-id order and each under an in-flight permit, the publications
    /// from before a restart that Paho dropped with the broker's session (`records`: key and
    /// record from the in-flight log), and logs what became of every one: each ends
    /// acknowledged or as an error entry.
    pub(crate) async fn publish_restored(self: Arc<Self>, records: Vec<(String, Vec<u8>)>) {
        let log = &self.log;
        let mut publications = Vec::new();
        for (key, rec) in records {
            match crate::mqtt_store::parse_publish(&rec, key.starts_with("s5-")) {
                Ok(p) => publications.push(p),
                Err(e) => log.record(log.entry(
                    Severity::Error,
                    bip::NOT_ACKNOWLEDGED,
                    format!(
                        "A publication restored from the in-flight log ({key}) cannot be read, so it cannot be published again after the broker at {} lost the session: {e}; it is lost",
                        log.url
                    ),
                )),
            }
        }
        publications.sort_by_key(|p| p.msgid);
        let mut waits = Vec::new();
        for (i, p) in publications.iter().enumerate() {
            let permit = tokio::select! {
                _ = self.stop.cancelled() => {
                    // Paho has already removed these from the log: say so. (Those handed over
                    // are in the log again and go out after the next start.)
                    log.record(log.entry(
                        Severity::Error,
                        bip::NOT_ACKNOWLEDGED,
                        format!(
                            "{} publication(s) restored from the in-flight log were not published again to {} before the connection was stopped; they are lost",
                            publications.len() - i,
                            log.url
                        ),
                    ).tag("count", publications.len() - i));
                    return;
                }
                p = self.inflight.clone().acquire_owned() => p.ok(),
            };
            let token = self.client.publish(restored_message(p));
            let timeout = self.connect_timeout;
            waits.push(async move {
                let r = tokio::time::timeout(timeout, token).await;
                drop(permit);
                match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "no acknowledgement within {}",
                        flowbus_runtime::time::human(timeout)
                    )),
                }
            });
        }
        let results = tokio::select! {
            _ = self.stop.cancelled() => return,
            r = futures::future::join_all(waits) => r,
        };
        let mut acked = 0;
        for (p, r) in publications.iter().zip(results) {
            match r {
                Ok(()) => acked += 1,
                Err(why) => log.record(
                    log.entry(
                        Severity::Error,
                        bip::NOT_ACKNOWLEDGED,
                        format!(
                            "Publish to '{}' (QoS {}), restored from the in-flight log and published again after the broker lost the session, failed: {why}; it is lost",
                            p.topic, p.qos
                        ),
                    )
                    .tag("topic", p.topic.clone())
                    .tag("qos", p.qos),
                ),
            }
        }
        if acked > 0 {
            log.record(
                log.entry(
                    Severity::Info,
                    bip::PUBLISHED,
                    format!(
                        "Published again {acked} publication(s) from before flowbus started, which the broker at {} had lost with the session; acknowledged",
                        log.url
                    ),
                )
                .tag("count", acked),
            );
        }
    }
}
