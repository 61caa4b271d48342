//! The paho adapter: one paho-mqtt async client per node (per URL for publish overrides),
//! its options, connects, QoS probes, pause and resume requests, and shutdown.

use super::{
    endpoint::describe_error, endpoint::ssl_options, endpoint::Endpoint, log::bip, log::LogCtx,
    outbox::Outbox, restore::report_corrupt_log, session::Backoff, session::Want,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowbus_runtime::activity::Severity;
use flowbus_runtime::datadir::create_private_dir_all;

use crate::qos_policy::Source;
use flowbus_runtime::engine::CancellationToken;
use flowbus_runtime::services::Services;
use flowbus_runtime::stats::inc;
use paho_mqtt as paho;
use tokio::sync::{mpsc, watch};

/// Called after each successful connect with `session_present`.
pub type OnConnected = Box<dyn Fn(bool) -> flowbus_runtime::BoxFut<'static, ()> + Send + Sync>;

/// One client and its supervisor.
pub struct Conn {
    /// The paho client.
    pub client: std::mem::ManuallyDrop<paho::AsyncClient>,
    /// Log context.
    pub log: LogCtx,
    opts: paho::ConnectOptions,
    pub(crate) backoff: Backoff,
    pub(crate) connected: watch::Sender<bool>,
    pub(crate) want: watch::Sender<Want>,
    reconnect: mpsc::UnboundedSender<()>,
    pub(crate) reconnect_rx: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    pub(crate) lost_rx: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    pub(crate) stop: CancellationToken,
    /// The supervisor task, awaited on shutdown so the client is released before a new
    /// version of the flow creates one with the same id (and persistence directory).
    pub(crate) supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    counted_open: AtomicBool,
    /// Whether the connection uses MQTT v5.
    pub v5: bool,
    /// The broker's QoS limit and how we learnt it, once known.
    limit: Mutex<Option<(u8, Source)>>,
    pub(crate) connect_timeout: Duration,
    /// Connects started and not yet answered by Paho (see [`Conn::connect`]).
    pub(crate) connecting: Arc<AtomicUsize>,
    /// Sent publications in the in-flight log the broker has not acknowledged (file
    /// persistence only).
    pub(crate) unacknowledged: Option<Arc<AtomicUsize>>,
    /// Of those, the ones restored from the log at start-up (file persistence only): nobody
    /// waits for them, so the connection sends them again if Paho drops them.
    pub(crate) restored: Option<crate::mqtt_store::Restored>,
    /// Releases the in-flight log when the connection is dropped (Paho closes it only when the
    /// client is destroyed, minutes later: see `CLOSED_CLIENTS`).
    pub(crate) store: Option<crate::mqtt_store::Release>,
    /// Publications on their way to paho (see [`Conn::send`]).
    pub(crate) outbox: Arc<Outbox>,
    /// Permits for unacknowledged QoS 1/2 publications (the server's `max_inflight`): paho
    /// fails a publish over its limit instead of waiting, so the node waits here.
    pub inflight: Arc<tokio::sync::Semaphore>,
    /// Why the connection gave up for good (see [`Conn::fatal`]).
    pub(crate) fatal: watch::Sender<Option<String>>,
}

/// How to create a [`Conn`].
pub struct ConnSpec<'a> {
    /// The broker.
    pub endpoint: &'a Endpoint,
    /// The client id.
    pub client_id: String,
    /// Persistent session (clean session false).
    pub persistent_session: bool,
    /// Paho file persistence for in-flight publications under this directory.
    pub persist_dir: Option<PathBuf>,
    /// How long a connect attempt may take.
    pub connect_timeout: Duration,
    /// Reconnect schedule.
    pub backoff: Backoff,
    /// Flow, node, services.
    pub services: Arc<Services>,
    /// Flow name.
    pub flow: &'a str,
    /// Node id.
    pub node: &'a str,
}

/// Ends a client id's persistent session at its broker, for a flow that is removed: connects
/// once with a clean session (MQTT v5: clean start, session expiry 0) and disconnects, so the
/// broker discards the session — its subscriptions and the messages it queued for it. (A
/// session is ended by the client id, not by the connection that made it, so this works as
/// well for a flow that was stopped long ago.) The connect waits at most `spec`'s connect
/// timeout. Returns the reason when the broker could not be reached or refused.
pub async fn end_session(spec: ConnSpec<'_>) -> Result<(), String> {
    // No will: this connection is not the node's, and must not announce it gone.
    let mut endpoint = spec.endpoint.clone();
    endpoint.will = None;
    let timeout = spec.connect_timeout;
    let conn = Conn::new(ConnSpec {
        endpoint: &endpoint,
        persistent_session: false,
        persist_dir: None,
        ..spec
    })?;
    let result = match tokio::time::timeout(timeout, conn.connect()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(describe_error(&e, &conn.log.url)),
        Err(_) => Err(format!(
            "no answer within {}",
            flowbus_runtime::time::human(timeout)
        )),
    };
    if conn.client.is_connected() {
        let _ = tokio::time::timeout(timeout, conn.client.disconnect(None)).await;
    }
    // Dropped here: the client is destroyed by the reaper, as every closed client.
    result
}

impl Conn {
    /// Creates the client (connects nothing).
    pub fn new(spec: ConnSpec<'_>) -> Result<Arc<Conn>, String> {
        let ep = spec.endpoint;
        let v5 = ep.version == 5;
        // A generated id grows with the flow's name and the node's id: paho would write one
        // over 65,535 bytes with a wrapped length.
        crate::mqtt_limits::check_string("the client id", &spec.client_id)
            .map_err(|e| format!("cannot create the MQTT client for {}: {e}", ep.url))?;
        if let Some(dir) = &spec.persist_dir {
            create_private_dir_all(dir).map_err(|e| {
                format!(
                    "cannot create the persistence directory {}: {e}",
                    dir.display()
                )
            })?;
        }
        let log = LogCtx {
            stats: spec.services.stats.server(&ep.url),
            services: spec.services,
            flow: spec.flow.to_string(),
            node: spec.node.to_string(),
            url: ep.url.clone(),
            client_id: spec.client_id,
        };
        let mut create = paho::CreateOptionsBuilder::new()
            .server_uri(&ep.url)
            .client_id(&log.client_id);
        let mut unacknowledged = None;
        let mut restored = None;
        let mut store = None;
        let mut recovery = None;
        create = match &spec.persist_dir {
            // Publications in flight go to an append-only log (see `mqtt_store`) rather than
            // Paho's file-per-message store.
            Some(dir) => {
                let log_store = crate::mqtt_store::LogStore::new(dir.clone()).mqtt_v5(v5);
                unacknowledged = Some(log_store.unacknowledged());
                restored = Some(log_store.restored());
                store = Some(log_store.releaser());
                recovery = Some(log_store.recovery());
                create.user_persistence(log_store)
            }
            None => create.persistence(paho::PersistenceType::None),
        };
        let create = create
            // Paho refuses publishes beyond this many queued-and-not-yet-written messages, even
            // while connected (default 100); the node's own window bounds what it queues.
            .max_buffered_messages(10_000)
            .mqtt_version(if v5 {
                paho::MQTT_VERSION_5
            } else {
                paho::MQTT_VERSION_3_1_1
            })
            .finalize();
        let client = paho::AsyncClient::new(create);
        // Creating the client opened the in-flight log: whether or not that went well, say
        // what it had to do with a log that was not sound.
        let recovered = recovery.and_then(|r| r.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(r) = recovered {
            report_corrupt_log(&log, &r);
        }
        let client =
            client.map_err(|e| format!("cannot create the MQTT client for {}: {e}", ep.url))?;
        let persistent = spec.persistent_session;
        let mut b = if v5 {
            paho::ConnectOptionsBuilder::new_v5()
        } else {
            paho::ConnectOptionsBuilder::with_mqtt_version(paho::MQTT_VERSION_3_1_1)
        };
        b.keep_alive_interval(ep.keep_alive)
            .connect_timeout(spec.connect_timeout)
            .max_inflight(i32::from(ep.max_inflight));
        // Paho's own automatic reconnect stays off: the supervisor follows the IIB schedule
        // and logs every attempt.
        if v5 {
            b.clean_start(!persistent);
            if persistent {
                let mut props = paho::Properties::new();
                // Default a day: long enough to ride out a pause or a restart, short enough
                // not to leave sessions behind for ever.
                let secs = ep.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32;
                let _ = props.push_u32(paho::PropertyCode::SessionExpiryInterval, secs);
                b.properties(props);
            }
        } else {
            b.clean_session(!persistent);
        }
        if let Some(u) = &ep.username {
            b.user_name(u);
        }
        if let Some(p) = &ep.password {
            b.password(p.as_str());
        }
        if let Some(w) = &ep.will {
            let will = if w.retain {
                paho::Message::new_retained(
                    w.topic.as_str(),
                    w.payload.as_bytes(),
                    i32::from(w.qos),
                )
            } else {
                paho::Message::new(w.topic.as_str(), w.payload.as_bytes(), i32::from(w.qos))
            };
            b.will_message(will);
        }
        if ep.url.starts_with("ssl://") {
            b.ssl_options(ssl_options(&ep.tls)?);
        }
        let opts = b.finalize();
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        client.set_connection_lost_callback(move |_| {
            let _ = lost_tx.send(());
        });
        let (reconnect, reconnect_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Conn {
            client: std::mem::ManuallyDrop::new(client),
            log,
            opts,
            backoff: spec.backoff,
            connected: watch::channel(false).0,
            want: watch::channel(Want::Up).0,
            reconnect,
            reconnect_rx: Mutex::new(Some(reconnect_rx)),
            lost_rx: Mutex::new(Some(lost_rx)),
            stop: CancellationToken::new(),
            supervisor: Mutex::new(None),
            counted_open: AtomicBool::new(false),
            v5,
            limit: Mutex::new(None),
            connect_timeout: spec.connect_timeout,
            connecting: Arc::default(),
            unacknowledged,
            restored,
            store,
            outbox: Arc::default(),
            inflight: Arc::new(tokio::sync::Semaphore::new(usize::from(
                ep.max_inflight.max(1),
            ))),
            fatal: watch::channel(None).0,
        }))
    }

    /// Resolves with the reason when the connection has given up for good: its client's
    /// persistence failed on connect, which no retry mends. The node then fails its flow
    /// (shown `failed` with the reason) rather than stay `running` and publish nothing. Never
    /// resolves once the connection is dropped.
    pub fn fatal(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut rx = self.fatal.subscribe();
        async move {
            let reason = rx
                .wait_for(Option::is_some)
                .await
                .map(|r| r.clone().unwrap_or_default());
            match reason {
                Ok(reason) => reason,
                Err(_) => futures::future::pending().await,
            }
        }
    }

    /// Whether the client is connected now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until connected, at most `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        // The common case, without a receiver and a timer per message.
        if *self.connected.borrow() {
            return true;
        }
        let mut rx = self.connected.subscribe();
        let ok = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|c| *c)).await,
            Ok(Ok(_))
        );
        ok
    }

    /// The broker's QoS limit, if known.
    pub fn broker_limit(&self) -> Option<(u8, Source)> {
        self.limit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a limit the broker showed (the lowest seen wins).
    pub fn learn_limit(&self, q: u8, source: Source) {
        let mut l = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        if l.as_ref().is_none_or(|(old, _)| q < *old) {
            *l = Some((q, source));
        }
    }

    /// Starts a connect, counted until Paho answers it: Paho's token for a connect holds the
    /// client, so until then the client must not be destroyed (see `CLOSED_CLIENTS`). A task
    /// waits for the answer, so the count comes down even when the caller gives up first.
    pub(crate) fn connect(
        &self,
    ) -> impl std::future::Future<Output = paho::Result<paho::ServerResponse>> {
        let connecting = self.connecting.clone();
        connecting.fetch_add(1, Ordering::SeqCst);
        let token = self.client.connect(self.opts.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let answer = token.await;
            connecting.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(answer);
        });
        async move {
            rx.await
                .unwrap_or(Err(paho::Error::General("the connect was abandoned")))
        }
    }

    /// Connects once, without the supervisor (for `flowbus doctor`); returns the broker's
    /// CONNACK Maximum QoS (MQTT v5) if it sent one.
    pub async fn connect_once(&self, timeout: Duration) -> Result<Option<u8>, String> {
        match tokio::time::timeout(timeout, self.connect()).await {
            Ok(Ok(resp)) => {
                let max = resp
                    .properties()
                    .get_int(paho::PropertyCode::MaximumQos)
                    .map(|q| q.clamp(0, 2) as u8);
                if let Some(q) = max {
                    self.learn_limit(q, Source::Connack);
                }
                Ok(max)
            }
            Ok(Err(e)) => Err(describe_error(&e, &self.log.url)),
            Err(_) => Err(format!(
                "no answer within {}",
                flowbus_runtime::time::human(timeout)
            )),
        }
    }

    /// Learns the broker's QoS limit for an MQTT 3.1.1 connection, which has no CONNACK
    /// property for it: subscribes to a private topic at QoS 2 and reads the granted QoS from
    /// the SUBACK, then unsubscribes. Returns the granted QoS (None when refused or
    /// unanswered; a broker's ACL may forbid the topic).
    pub async fn probe_qos(&self) -> Option<u8> {
        let topic = format!("flowbus/probe/{}", self.log.client_id);
        let granted = match tokio::time::timeout(
            self.connect_timeout,
            self.client.subscribe(topic.as_str(), 2),
        )
        .await
        {
            Ok(Ok(resp)) => resp.subscribe_response(),
            _ => None,
        };
        let _ = tokio::time::timeout(
            self.connect_timeout,
            self.client.unsubscribe(topic.as_str()),
        )
        .await;
        match granted {
            Some(g @ 0..=2) => {
                if g < 2 {
                    self.learn_limit(g as u8, Source::Suback);
                    self.log.record(
                        self.log
                            .entry(
                                Severity::Info,
                                bip::BROKER_LIMIT,
                                format!("The broker allows at most QoS {g} (a probe subscription at QoS 2 was granted {g})"),
                            )
                            .tag("max_qos", g),
                    );
                }
                Some(g as u8)
            }
            _ => None,
        }
    }

    /// Asks the supervisor to pause (disconnect, keeping the session) or resume.
    pub fn set_want(&self, w: Want) {
        self.want.send_replace(w);
    }

    /// A handle that does what [`set_want`](Self::set_want) does without holding the
    /// connection: for the message callback, which the client holds (an `Arc<Conn>` there
    /// would keep the connection alive through its own client). Sending never blocks.
    pub fn want_handle(&self) -> watch::Sender<Want> {
        self.want.clone()
    }

    /// Asks the supervisor to drop the connection and connect again (after a missing ack).
    pub fn request_reconnect(&self) {
        // Marked down at once, so a retry waits for the new connection instead of using the
        // one being dropped.
        self.connected.send_replace(false);
        let _ = self.reconnect.send(());
    }

    pub(crate) fn mark_open(&self) {
        if !self.counted_open.swap(true, Ordering::SeqCst) {
            self.log
                .stats
                .open_connections
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn mark_closed(&self) {
        if self.counted_open.swap(false, Ordering::SeqCst) {
            self.log
                .stats
                .open_connections
                .fetch_sub(1, Ordering::Relaxed);
            inc(&self.log.stats.closed_connections);
        }
        self.connected.send_replace(false);
    }

    /// Stops the supervisor and starts disconnecting without waiting: for a node whose task is
    /// dropped before it could shut down (aborted at a stop deadline), so its connection —
    /// and a subscription — does not outlive it.
    pub fn abandon(&self) {
        if !self.stop.is_cancelled() {
            self.stop.cancel();
            // Paho starts disconnecting when asked; nobody is left to wait for the token.
            drop(self.client.disconnect(None::<paho::DisconnectOptions>));
        }
    }

    /// Stops the supervisor and disconnects (bounded by `timeout`).
    pub async fn shutdown(&self, timeout: Duration) {
        // Nothing handed over by a node stays behind in the outbox.
        self.flush();
        self.stop.cancel();
        let supervisor = self
            .supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = supervisor {
            let _ = tokio::time::timeout(timeout, h).await;
        }
        if !self.client.is_connected() {
            self.mark_closed();
            return;
        }
        let log = &self.log;
        match self.client.disconnect_after(timeout).await {
            Ok(_) => log.record(log.entry(
                Severity::Info,
                bip::DISCONNECTED,
                format!("Disconnected from {}", log.url),
            )),
            Err(e) => log.record(log.entry(
                Severity::Warning,
                bip::DISCONNECT_FAILED,
                format!("Failed to disconnect from {}: {e}", log.url),
            )),
        }
        self.mark_closed();
    }
}
