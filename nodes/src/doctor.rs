//! `flowbus doctor`: for every server the flows use, connect once, learn what the broker
//! allows (MQTT v5 CONNACK `Maximum QoS`, a probe subscription at QoS 2 on a private topic),
//! and report the TLS handshake and authentication results and how many messages the broker
//! says it has dropped (mosquitto's `$SYS/broker/publish/messages/dropped`); then, for every
//! MQTT node and topic, the QoS it asks for, the limit, the verdict and the fix; and, for
//! every subscriber, whether the broker keeps what a burst beyond the node's queue budget
//! leaves with it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flowbus_runtime::config::Config;
use flowbus_runtime::flow::ValidatedFlow;
use flowbus_runtime::services::Services;
use serde::Serialize;

use crate::mqtt::{resolve_endpoint, topics, Backoff, Conn, ConnSpec, Endpoint};
use crate::qos_policy::{Decision, Source};

/// What doctor learnt about one server.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerReport {
    /// The configured name, or the URL of an inline server.
    pub server: String,
    /// The URL.
    pub url: String,
    /// `3.1.1` or `5`.
    pub version: String,
    /// Whether a connection succeeded.
    pub reachable: bool,
    /// `-` (plain TCP), `ok` or the handshake error.
    pub tls: String,
    /// `anonymous`, `ok as <user>`, or the refusal.
    pub auth: String,
    /// The broker's limit, when learnt.
    pub max_qos: Option<u8>,
    /// How it was learnt (`CONNACK`, `probe`), or why not.
    pub max_qos_source: String,
    /// The connection error, if any.
    pub error: Option<String>,
    /// Messages the broker has dropped since it started (`$SYS/broker/publish/messages/dropped`,
    /// where it publishes it and lets us read it).
    pub dropped_messages: Option<u64>,
}

/// One row per MQTT node and topic.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeReport {
    /// Flow.
    pub flow: String,
    /// Node id.
    pub node: String,
    /// `MQTTSubscribe` or `MQTTPublish`.
    #[serde(rename = "type")]
    pub node_type: String,
    /// The server (name or URL).
    pub server: String,
    /// The topic (filter).
    pub topic: String,
    /// The QoS the node asks for (or its rule chooses).
    pub requested: u8,
    /// The tightest limit, if any.
    pub limit: Option<u8>,
    /// What sets the limit.
    pub limit_source: String,
    /// `ok`, `mismatch`, `downgrade to N`, or `unreachable`.
    pub verdict: String,
    /// What to do (empty when ok).
    pub fix: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// Servers.
    pub servers: Vec<ServerReport>,
    /// Nodes.
    pub nodes: Vec<NodeReport>,
    /// What others on this machine could do with the daemon's files or API (see
    /// [`security`]).
    pub security: Vec<Finding>,
    /// Whether brokers keep what subscribers leave with them when a burst outlasts their
    /// queue budget (see [`backlog`]).
    pub backlog: Vec<Finding>,
    /// No mismatch, every server reachable, no security problem.
    pub ok: bool,
}

/// One thing `doctor` found about the daemon's files or admin API.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Finding {
    /// `problem` (doctor fails), `warning` or `note`.
    pub level: &'static str,
    /// What is wrong and what to do.
    pub text: String,
}

/// Modes others could use: a data directory (payloads in flight, the activity log, the
/// admin token) they can read, flow files or directories they can write (a flow runs code as
/// the daemon's user), an API without authentication or open beyond loopback.
pub fn security(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let problem = |text: String| Finding {
        level: "problem",
        text,
    };
    let listed = |l: &[(std::path::PathBuf, u32)]| {
        l.iter()
            .take(3)
            .map(|(p, m)| format!("{} ({m:o})", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
            + if l.len() > 3 { ", ..." } else { "" }
    };
    let loose = flowbus_runtime::datadir::loose_modes(&config.data_dir);
    if !loose.is_empty() {
        out.push(problem(format!(
            "the data directory {} has {} entr{} others can read or write: {}; flowbus run makes them private at its next start, or run chmod -R go-rwx {}",
            config.data_dir.display(),
            loose.len(),
            if loose.len() == 1 { "y" } else { "ies" },
            listed(&loose),
            config.data_dir.display()
        )));
    }
    // A flow (or a script it names) is code the daemon runs: nobody else may write them.
    // (A sticky directory such as /tmp still lets others add files.)
    let mut writable: Vec<_> = config
        .flows
        .iter()
        .chain(&config.daemon.allowed_paths)
        .flat_map(|p| flowbus_runtime::datadir::with_mode_bits(p, 0o022))
        .collect();
    writable.sort();
    if !writable.is_empty() {
        out.push(problem(format!(
            "flow files, scripts or directories others can write: {}; whoever writes there runs code as the daemon's user: run chmod go-w on them",
            listed(&writable)
        )));
    }
    if config.admin.auth == flowbus_runtime::config::AdminAuth::None {
        out.push(Finding {
            level: "note",
            text: "admin.auth = \"none\": every program and user on this machine can deploy, stop and remove flows".into(),
        });
    }
    if !config.admin.listens_on_loopback() {
        out.push(Finding {
            level: "note",
            text: format!(
                "the admin API listens on {}, beyond this machine: put a TLS proxy in front of it, and list the names it is reached by in admin.allowed_hosts",
                config.admin.listen
            ),
        });
    }
    out
}

fn classify(e: &str) -> (String, String) {
    let lower = e.to_lowercase();
    let tls = if lower.contains("ssl") || lower.contains("tls") || lower.contains("certificate") {
        format!("failed: {e}")
    } else {
        "not reached".into()
    };
    let auth = if lower.contains("authori")
        || lower.contains("user name or password")
        || lower.contains("bad user")
    {
        format!("refused: {e}")
    } else {
        "not reached".into()
    };
    (tls, auth)
}

async fn probe_server(ep: &Endpoint, config: &Config, timeout: Duration) -> ServerReport {
    let services = Arc::new(Services::default());
    let label = ep.server.clone().unwrap_or_else(|| ep.url.clone());
    let client_id = format!(
        "flowbus-doctor-{}-{}",
        std::process::id(),
        label.replace(['/', ':', '+', '#'], "_")
    );
    let mut report = ServerReport {
        server: label,
        url: ep.url.clone(),
        version: if ep.version == 5 {
            "5".into()
        } else {
            "3.1.1".into()
        },
        reachable: false,
        tls: if ep.url.starts_with("ssl://") {
            "not reached".into()
        } else {
            "-".into()
        },
        auth: "not reached".into(),
        max_qos: None,
        max_qos_source: "unknown".into(),
        error: None,
        dropped_messages: None,
    };
    let conn = match Conn::new(ConnSpec {
        endpoint: ep,
        client_id,
        persistent_session: false,
        persist_dir: None,
        connect_timeout: timeout,
        backoff: Backoff::from_config(config),
        services,
        flow: "doctor",
        node: "doctor",
    }) {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    let connect = conn.connect_once(timeout).await;
    match connect {
        Err(e) => {
            let (tls, auth) = classify(&e);
            if ep.url.starts_with("ssl://") {
                report.tls = tls;
            }
            report.auth = auth;
            report.error = Some(e);
        }
        Ok(connack_max) => {
            report.reachable = true;
            if ep.url.starts_with("ssl://") {
                report.tls = if ep.tls.verify {
                    "ok (certificate and host name verified)".into()
                } else {
                    "ok (not verified: verify_server = false)".into()
                };
            }
            report.auth = match &ep.username {
                Some(u) => format!("ok as '{u}'"),
                None => "anonymous".into(),
            };
            if let Some(q) = connack_max {
                report.max_qos = Some(q);
                report.max_qos_source = "CONNACK".into();
            }
            match conn.probe_qos().await {
                Some(g) if report.max_qos.is_none_or(|m| g < m) => {
                    report.max_qos = Some(g);
                    report.max_qos_source = "probe subscription".into();
                }
                Some(_) => {}
                None if report.max_qos.is_none() => {
                    report.max_qos_source = "unknown (the probe subscription was refused)".into();
                }
                None => {}
            }
            report.dropped_messages = sys_dropped(&conn, timeout.min(Duration::from_secs(2))).await;
            let _ = tokio::time::timeout(timeout, conn.client.disconnect(None)).await;
        }
    }
    report
}

/// Reads mosquitto's count of dropped messages (retained, republished every `sys_interval`):
/// `None` when the broker does not publish it or does not let this client read it.
async fn sys_dropped(conn: &Conn, wait: Duration) -> Option<u64> {
    const TOPIC: &str = "$SYS/broker/publish/messages/dropped";
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    conn.client.set_message_callback(move |_, m| {
        if let Some(n) = m.and_then(|m| m.payload_str().trim().parse().ok()) {
            let _ = tx.send(n);
        }
    });
    let subscribed = tokio::time::timeout(wait, conn.client.subscribe(TOPIC, 0)).await;
    let n = match subscribed {
        Ok(Ok(_)) => tokio::time::timeout(wait, rx.recv()).await.ok().flatten(),
        _ => None,
    };
    conn.client.remove_message_callback();
    n
}

/// What a subscriber's burst beyond its queue budget leaves at the broker: the node pauses
/// (disconnects) and the broker must keep what arrives meanwhile. A subscriber at QoS 0 or
/// with a clean session loses it; a persistent one loses what exceeds the broker's queue
/// limit, when that is below what the node itself takes before pausing.
pub fn backlog(
    config: &Config,
    subscribers: &[(String, flowbus_runtime::node::NodeDecl, Endpoint)],
    servers: &[ServerReport],
) -> Vec<Finding> {
    use crate::mqtt_subscribe::{DEFAULT_HIGH, MESSAGE_OVERHEAD};
    let mut out = Vec::new();
    for s in servers
        .iter()
        .filter(|s| s.dropped_messages.unwrap_or(0) > 0)
    {
        out.push(Finding {
            level: "warning",
            text: format!(
                "the broker at {} has dropped {} message(s) since it started ($SYS/broker/publish/messages/dropped): its queues or in-flight limits were full; see docs/operations.md, \"What the broker must keep\"",
                s.url,
                s.dropped_messages.unwrap_or(0)
            ),
        });
    }
    for (flow, decl, ep) in subscribers {
        let any_qos = topics(decl).iter().any(|t| {
            decl.int("qos")
                .map(|q| q as u8)
                .or(ep.policy.rule_for(t).map(|r| r.qos))
                .unwrap_or(0)
                > 0
        });
        let clean = decl.bool("clean_session").unwrap_or(!any_qos);
        let who = format!("{flow}/{}", decl.id);
        if !any_qos || clean {
            out.push(Finding {
                level: "note",
                text: format!(
                    "{who} subscribes {}: if a burst outlasts its queue budget it pauses, and what is published meanwhile is not kept by the broker; subscribe at QoS 1 with a persistent session (the default at QoS 1/2) to have it kept",
                    if any_qos { "with a clean session" } else { "at QoS 0" }
                ),
            });
            continue;
        }
        let bytes = decl
            .size("queue_high_bytes")
            .unwrap_or(crate::mqtt_limits::DEFAULT_QUEUE_HIGH_BYTES);
        let budget = decl
            .int("queue_high")
            .map_or(DEFAULT_HIGH as u64, |n| n as u64)
            .min(bytes / MESSAGE_OVERHEAD as u64);
        let limit = ep
            .server
            .as_ref()
            .and_then(|n| config.servers.get(n))
            .and_then(|s| s.broker_queue_limit)
            .or(config.mqtt.broker_queue_limit);
        match limit {
            Some(0) => {}
            Some(n) if n < budget => out.push(Finding {
                level: "warning",
                text: format!(
                    "{who}: the broker at {} keeps at most {n} messages for a disconnected client (broker_queue_limit), fewer than the node's queue budget ({budget} messages: queue_high, queue_high_bytes); if a burst outlasts the budget the node pauses and the broker drops what exceeds {n}. Raise the broker's limit (mosquitto max_queued_messages, EMQX mqueue.max_mqueue_len, HiveMQ max-queue-size; docs/operations.md) to at least {budget}, and broker_queue_limit with it",
                    ep.url
                ),
            }),
            Some(_) => {}
            None => out.push(Finding {
                level: "note",
                text: format!(
                    "{who}: how many messages the broker at {} keeps for a disconnected client is not configured (broker_queue_limit); mosquitto keeps 1000 by default and drops the rest, which a burst beyond the node's queue budget ({budget} messages) would exceed",
                    ep.url
                ),
            }),
        }
    }
    out
}

/// Runs the checks for the MQTT nodes of `flows`.
pub async fn run(
    config: &Config,
    flows: &[ValidatedFlow],
    timeout: Duration,
) -> Result<Report, String> {
    // Every MQTT node with its endpoint.
    let mut nodes = Vec::new();
    for f in flows {
        for ix in f.graph.node_indices() {
            let decl = &f.graph[ix];
            if decl.type_name != "MQTTSubscribe" && decl.type_name != "MQTTPublish" {
                continue;
            }
            let ep = resolve_endpoint(decl, config).map_err(|p| {
                format!(
                    "{}: node '{}': {}",
                    f.file.display(),
                    decl.id,
                    p.iter()
                        .map(|p| p.kind.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })?;
            nodes.push((f.name.clone(), decl.clone(), ep));
        }
    }
    let mut servers: BTreeMap<(String, u8), ServerReport> = BTreeMap::new();
    for (_, _, ep) in &nodes {
        let key = (ep.url.clone(), ep.version);
        if let std::collections::btree_map::Entry::Vacant(slot) = servers.entry(key) {
            slot.insert(probe_server(ep, config, timeout).await);
        }
    }
    let mut rows = Vec::new();
    for (flow, decl, ep) in &nodes {
        let server = &servers[&(ep.url.clone(), ep.version)];
        let requested = decl.int("qos").map(|q| q as u8);
        let topics = match decl.type_name.as_str() {
            "MQTTSubscribe" => topics(decl),
            _ => vec![decl
                .str("topic")
                .unwrap_or("(set by LocalEnvironment)")
                .to_string()],
        };
        for topic in topics {
            let broker = server.max_qos.map(|q| {
                (
                    q,
                    if server.max_qos_source == "CONNACK" {
                        Source::Connack
                    } else {
                        Source::Suback
                    },
                )
            });
            let label = ep.server.clone().unwrap_or_else(|| ep.url.clone());
            let (req, limit, source, verdict, fix) = match ep.policy.decide(&topic, requested, broker.clone()) {
_ if !server.reachable => (
                    requested.or(ep.policy.rule_for(&topic).map(|r| r.qos)).unwrap_or(0),
                    None,
                    "-".to_string(),
                    "unreachable".to_string(),
                    format!("make {} reachable: {}", ep.url, server.error.clone().unwrap_or_default()),
                ),
Decision::Use { qos, rule } => {
                    let (limit, source) = tightest(ep, &topic, broker);
                    let source = match rule {
                        Some(r) if requested.is_none() => format!("QoS chosen by the rule for '{r}'"),
                        _ => format!("limited by {source}"),
                    };
                    (qos, limit, source, "ok".to_string(), String::new())
                }
                Decision::Fail { requested, allowed, source } => (
                    requested,
                    Some(allowed),
                    format!("limited by {}", source.describe()),
                    "mismatch".to_string(),
                    source.fix(requested, allowed),
                ),
                Decision::Downgrade { requested, allowed, source } => (
                    requested,
                    Some(allowed),
                    format!("limited by {}", source.describe()),
                    format!("downgrade to {allowed}"),
format!("runs at QoS {allowed} (on_qos_mismatch = \"downgrade\"); for QoS {requested}, {}", source.raise(requested)),
                ),
            };
            rows.push(NodeReport {
                flow: flow.clone(),
                node: decl.id.clone(),
                node_type: decl.type_name.clone(),
                server: label,
                topic,
                requested: req,
                limit,
                limit_source: source,
                verdict,
                fix,
            });
        }
    }
    let servers: Vec<ServerReport> = servers.into_values().collect();
    let security = security(config);
    let subscribers: Vec<_> = nodes
        .iter()
        .filter(|(_, d, _)| d.type_name == "MQTTSubscribe")
        .cloned()
        .collect();
    let backlog = backlog(config, &subscribers, &servers);
    let ok = servers.iter().all(|s| s.reachable)
        && rows.iter().all(|r| r.verdict == "ok")
        && security.iter().all(|f| f.level != "problem");
    Ok(Report {
        servers,
        nodes: rows,
        security,
        backlog,
        ok,
    })
}

fn tightest(ep: &Endpoint, topic: &str, broker: Option<(u8, Source)>) -> (Option<u8>, String) {
    let mut best: Option<(u8, String)> = None;
    let mut consider = |q: u8, what: String| {
        if best.as_ref().is_none_or(|(b, _)| q < *b) {
            best = Some((q, what));
        }
    };
    if let Some(q) = ep.policy.max_qos {
        consider(q, Source::ServerPolicy(ep.policy.server.clone()).describe());
    }
    if let Some(r) = ep.policy.rule_for(topic) {
        consider(r.qos, Source::Rule(r.topic.clone()).describe());
    }
    if let Some((q, s)) = broker {
        consider(q, s.describe());
    }
    match best {
        Some((q, s)) => (Some(q), s),
        None => (None, "none known".into()),
    }
}

/// The report as aligned text tables.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let servers: Vec<Vec<String>> = r
        .servers
        .iter()
        .map(|s| {
            vec![
                s.server.clone(),
                s.url.clone(),
                s.version.clone(),
                if s.reachable {
                    "reachable".into()
                } else {
                    format!("UNREACHABLE: {}", s.error.clone().unwrap_or_default())
                },
                s.tls.clone(),
                s.auth.clone(),
                s.max_qos.map_or_else(
                    || "?".to_string(),
                    |q| format!("{q} ({})", s.max_qos_source),
                ),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "SERVER",
            "URL",
            "MQTT",
            "STATUS",
            "TLS",
            "AUTH",
            "BROKER MAX QOS",
        ],
        &servers,
    ));
    out.push('\n');
    let nodes: Vec<Vec<String>> = r
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.flow.clone(),
                n.node.clone(),
                n.topic.clone(),
                n.requested.to_string(),
                n.limit.map_or_else(|| "-".to_string(), |l| l.to_string()),
                n.verdict.clone(),
                match (n.fix.is_empty(), n.limit_source.as_str()) {
                    (true, _) => n.limit_source.clone(),
                    (false, "-") => format!("fix: {}", n.fix),
                    (false, why) => format!("{why} — fix: {}", n.fix),
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "FLOW",
            "NODE",
            "TOPIC",
            "REQUESTED",
            "LIMIT",
            "VERDICT",
            "WHY / FIX",
        ],
        &nodes,
    ));
    out.push('\n');
    for f in &r.security {
        out.push_str(&format!("security {}: {}\n", f.level, f.text));
    }
    for f in &r.backlog {
        out.push_str(&format!("backlog {}: {}\n", f.level, f.text));
    }
    if !r.security.is_empty() || !r.backlog.is_empty() {
        out.push('\n');
    }
    out.push_str(if r.ok {
        "All MQTT nodes can run at the QoS they ask for.\n"
    } else {
        "Problems found (see VERDICT and FIX above).\n"
    });
    out
}

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(head.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod security_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn loose_data_and_writable_flows_are_problems_and_fixed_modes_are_not() {
        let dir = std::env::temp_dir().join(format!("flowbus-doctor-sec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::create_dir_all(dir.join("flows")).unwrap();
        std::fs::write(dir.join("data/admin.token"), "t").unwrap();
        std::fs::write(dir.join("flows/a.json"), "{}").unwrap();
        let chmod = |p: &str, m: u32| {
            std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(m)).unwrap()
        };
        chmod("data", 0o700);
        chmod("data/admin.token", 0o644);
        chmod("flows", 0o777);
        chmod("flows/a.json", 0o644);
        let mut config = Config {
            data_dir: dir.join("data"),
            flows: vec![dir.join("flows")],
            ..Config::default()
        };
        let found = security(&config);
        let problems: Vec<&str> = found
            .iter()
            .filter(|f| f.level == "problem")
            .map(|f| f.text.as_str())
            .collect();
        assert_eq!(problems.len(), 2, "{found:?}");
        assert!(problems[0].contains("admin.token (644)"), "{}", problems[0]);
        assert!(problems[1].contains("flows (777)"), "{}", problems[1]);
        chmod("data/admin.token", 0o600);
        chmod("flows", 0o755);
        assert!(security(&config).is_empty());
        config.admin.auth = flowbus_runtime::config::AdminAuth::None;
        config.admin.listen = "0.0.0.0:4880".into();
        let notes = security(&config);
        assert_eq!(notes.len(), 2);
        assert!(notes.iter().all(|f| f.level == "note"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod backlog_tests {
    use super::*;
    use flowbus_runtime::node::NodeDecl;
    use serde_json::json;

    fn subscriber(props: serde_json::Value) -> (String, NodeDecl, Endpoint) {
        let decl = NodeDecl {
            id: "in".into(),
            type_name: "MQTTSubscribe".into(),
            props: props.as_object().cloned().unwrap_or_default(),
            pointer: "/nodes/0".into(),
        };
        let ep = Endpoint::inline("tcp://127.0.0.1:1883", 3);
        ("f".into(), decl, ep)
    }

    fn levels(found: &[Finding]) -> Vec<&str> {
        found.iter().map(|f| f.level).collect()
    }

    #[test]
    fn a_broker_queue_below_the_nodes_budget_is_a_warning() {
        let mut config = Config::default();
        let qos1 = subscriber(json!({"topic": "a", "qos": 1}));
        // Unknown: a note that says what mosquitto does by default.
        let found = backlog(&config, std::slice::from_ref(&qos1), &[]);
        assert_eq!(levels(&found), ["note"]);
        assert!(
            found[0].text.contains("mosquitto keeps 1000 by default"),
            "{}",
            found[0].text
        );
        // mosquitto's default, against the default budget (64 MiB / 256 bytes = 262,144).
        config.mqtt.broker_queue_limit = Some(1000);
        let found = backlog(&config, std::slice::from_ref(&qos1), &[]);
        assert_eq!(levels(&found), ["warning"]);
        assert!(
            found[0].text.contains("at most 1000 messages")
                && found[0].text.contains("(262144 messages"),
            "{}",
            found[0].text
        );
        // A node whose budget the broker can hold, and a broker without a limit: nothing.
        let small = subscriber(json!({"topic": "a", "qos": 1, "queue_high": 500}));
        assert!(backlog(&config, &[small], &[]).is_empty());
        config.mqtt.broker_queue_limit = Some(0);
        assert!(backlog(&config, std::slice::from_ref(&qos1), &[]).is_empty());
        // QoS 0 or a clean session: the broker keeps nothing whatever its limit.
        let qos0 = subscriber(json!({"topic": "a"}));
        let clean = subscriber(json!({"topic": "a", "qos": 1, "clean_session": true}));
        let found = backlog(&config, &[qos0, clean], &[]);
        assert_eq!(levels(&found), ["note", "note"]);
        assert!(found[0].text.contains("at QoS 0"));
        assert!(found[1].text.contains("clean session"));
    }

    #[test]
    fn a_broker_that_dropped_messages_is_a_warning() {
        let server = ServerReport {
            server: "s".into(),
            url: "tcp://b:1883".into(),
            version: "3.1.1".into(),
            reachable: true,
            tls: "-".into(),
            auth: "anonymous".into(),
            max_qos: None,
            max_qos_source: "unknown".into(),
            error: None,
            dropped_messages: Some(41),
        };
        let found = backlog(&Config::default(), &[], &[server]);
        assert_eq!(levels(&found), ["warning"]);
        assert!(found[0].text.contains("dropped 41 message(s)"));
    }
}
