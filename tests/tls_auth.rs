//! Connection policy against real mosquitto listeners: TLS with server verification (CA and
//! host name), mutual TLS, user name and password from an environment variable or a file,
//! last will — with certificates this test generates with openssl — and `flowbus doctor`
//! reporting the handshake and authentication results.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{fast_config, free_port, Broker, Client, Daemon, Running};
use serde_json::json;

const T: Duration = Duration::from_secs(15);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (scripts/setup.sh)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for `localhost` signed by it, a client certificate, and an
/// unrelated CA.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=flowbus test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other-ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=someone else",
        ],
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=flowbus-client",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "2",
        ],
    );
    for f in std::fs::read_dir(dir).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(f.unwrap().path(), std::fs::Permissions::from_mode(0o644));
    }
}

/// A broker with a plain listener (for the test's own client) and a TLS listener with an
/// optional password file and client-certificate requirement.
struct Secure {
    broker: Broker,
    tls_port: u16,
    certs: PathBuf,
}

fn secure(require_certificate: bool, password: Option<(&str, &str)>) -> Secure {
    let certs = common::scratch("certs");
    certificates(&certs);
    if let Some((user, pass)) = password {
        let out = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(certs.join("passwd"))
            .args([user, pass])
            .output()
            .expect("mosquitto_passwd");
        assert!(out.status.success());
        use std::os::unix::fs::PermissionsExt;
        let _ =
            std::fs::set_permissions(certs.join("passwd"), std::fs::Permissions::from_mode(0o644));
    }
    let tls_port = free_port();
    let c = certs.clone();
    let broker = Broker::start_with(move |port, dir| {
        let auth = if password.is_some() {
            format!(
                "allow_anonymous false\npassword_file {}\n",
                c.join("passwd").display()
            )
        } else {
            "allow_anonymous true\n".to_string()
        };
        format!(
            "per_listener_settings true\npersistence false\npersistence_location {}/\nlog_dest none\nset_tcp_nodelay true\n\
             listener {port} 127.0.0.1\nallow_anonymous true\n\
             listener {tls_port} 127.0.0.1\n{auth}cafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate {require_certificate}\n",
            dir.display(),
            ca = c.join("ca.pem").display(),
            cert = c.join("server.pem").display(),
            key = c.join("server.key").display(),
        )
    });
    Secure {
        broker,
        tls_port,
        certs,
    }
}

/// subscribe on the TLS server → publish on the same TLS server.
fn relay() -> String {
    json!({
        "name": "secure",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "server": "secure", "topic": "in", "qos": 1},
            {"id": "out", "type": "MQTTPublish", "server": "secure", "topic": "out", "qos": 1}
        ],
        "connections": [{"from": "in.Out", "to": "out"}]
    })
    .to_string()
}

fn server_config(s: &Secure, host: &str, extra: &str) -> String {
    fast_config(&format!(
        "[servers.secure]\nurl = \"ssl://{host}:{}\"\nca_file = \"{}\"\n{extra}\n",
        s.tls_port,
        s.certs.join("ca.pem").display()
    ))
}

async fn relays(s: &Secure, flow: &Running) {
    flow.wait_subscribed(1).await;
    let c = Client::connect(&s.broker.url(), false).await;
    c.subscribe("out", 1).await;
    c.publish("in", json!({"secure": true}).to_string(), 1)
        .await;
    assert_eq!(c.take_json(1, T).await[0].1, json!({"secure": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_trusted_ca_and_matching_host_name_works() {
    let s = secure(false, None);
    let mut flow = Running::start(&relay(), &server_config(&s, "localhost", ""), &[]);
    relays(&s, &flow).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_an_untrusted_certificate_and_a_wrong_host_name() {
    let s = secure(false, None);
    // A CA that did not sign the server's certificate.
    let other = server_config(&s, "localhost", "").replace("ca.pem", "other-ca.pem");
    let mut flow = Running::start(&relay(), &other, &[]);
    let e = flow.wait_entry("BIP12096", "failed (attempt 1)", T).await;
    assert!(e.message.contains("ssl://localhost"), "{}", e.message);
    assert!(
        flow.server_stats(&format!("ssl://localhost:{}", s.tls_port))
            .failed_connections
            >= 1
    );
    assert!(
        flow.entries("BIP12063").is_empty(),
        "must not connect: {:?}",
        flow.entries("BIP12063")
    );
    flow.stop().await;
    // The right CA, but the certificate names localhost, not 127.0.0.1.
    let mut flow = Running::start(&relay(), &server_config(&s, "127.0.0.1", ""), &[]);
    flow.wait_entry("BIP12096", "failed (attempt 1)", T).await;
    assert!(flow.entries("BIP12063").is_empty());
    flow.stop().await;
    // Verification switched off on purpose: it connects.
    let mut flow = Running::start(
        &relay(),
        &server_config(&s, "127.0.0.1", "verify_server = false"),
        &[],
    );
    relays(&s, &flow).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let s = secure(true, None);
    let without = server_config(&s, "localhost", "");
    let mut flow = Running::start(&relay(), &without, &[]);
    flow.wait_entry("BIP12096", "failed (attempt 1)", T).await;
    assert!(flow.entries("BIP12063").is_empty());
    flow.stop().await;
    let with = server_config(
        &s,
        "localhost",
        &format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"",
            s.certs.join("client.pem").display(),
            s.certs.join("client.key").display()
        ),
    );
    let mut flow = Running::start(&relay(), &with, &[]);
    relays(&s, &flow).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_from_env_or_file_and_never_in_the_log() {
    const SECRET: &str = "s3cret-Pa55";
    let s = secure(false, Some(("gateway", SECRET)));
    // From an environment variable (a name unique to this test: the environment is shared).
    std::env::set_var("FLOWBUS_TEST_TLS_PASSWORD", SECRET);
    let cfg = server_config(
        &s,
        "localhost",
        "username = \"gateway\"\npassword_env = \"FLOWBUS_TEST_TLS_PASSWORD\"",
    );
    let mut flow = Running::start(&relay(), &cfg, &[]);
    relays(&s, &flow).await;
    flow.stop().await;
    let log = format!("{:?}", flow.log());
    assert!(
        !log.contains(SECRET),
        "the password leaked into the activity log"
    );
    // From a file, relative to flowbus.toml.
    let mut flow = Running::start(
        &relay(),
        &server_config(
            &s,
            "localhost",
            "username = \"gateway\"\npassword_file = \"password.txt\"",
        ),
        &[("password.txt", &format!("{SECRET}\n"))],
    );
    relays(&s, &flow).await;
    flow.stop().await;
    // A wrong password: refused, retried on the schedule, reported.
    std::env::set_var("FLOWBUS_TEST_TLS_WRONG", "nope");
    let mut flow = Running::start(
        &relay(),
        &server_config(
            &s,
            "localhost",
            "username = \"gateway\"\npassword_env = \"FLOWBUS_TEST_TLS_WRONG\"",
        ),
        &[],
    );
    let e = flow.wait_entry("BIP12096", "failed (attempt 1)", T).await;
    assert!(
        e.message.to_lowercase().contains("authori") || e.message.contains("password"),
        "{}",
        e.message
    );
    flow.stop().await;
    // A password variable that is not set: the flow does not build, and says which.
    let dir = common::scratch("nopass");
    std::fs::write(dir.join("flow.json"), relay()).unwrap();
    std::fs::write(
        dir.join("flowbus.toml"),
        server_config(
            &s,
            "localhost",
            "username = \"gateway\"\npassword_env = \"FLOWBUS_TEST_TLS_UNSET\"",
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .args(["validate", "--config"])
        .arg(dir.join("flowbus.toml"))
        .arg(dir.join("flow.json"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains(
            "password_env names the environment variable FLOWBUS_TEST_TLS_UNSET, which is not set"
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_is_published_when_the_daemon_dies() {
    let broker = Broker::start("");
    let cfg = fast_config(&format!(
        "[servers.plant]\nurl = \"{}\"\nkeep_alive = \"5s\"\n[servers.plant.will]\ntopic = \"gateway/status\"\npayload = \"offline\"\nqos = 1\n",
        broker.url()
    ));
    let flow = json!({
        "name": "watched",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "server": "plant", "topic": "x", "qos": 1},
            {"id": "show", "type": "Trace"}
        ],
        "connections": [{"from": "in.Out", "to": "show"}]
    })
    .to_string();
    let watcher = Client::connect(&broker.url(), false).await;
    watcher.subscribe("gateway/status", 1).await;
    let mut daemon = Daemon::spawn(&cfg, &[("watched.json", &flow)]);
    daemon.wait_log("BIP12095", 1, T).await;
    assert!(
        watcher.next(Duration::from_millis(300)).await.is_none(),
        "no will while alive"
    );
    // Killed without a chance to disconnect: the broker publishes the will.
    if let Some(mut c) = daemon.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let m = watcher.next(T).await.expect("the will");
    assert_eq!(m.payload_str(), "offline");
}

fn doctor(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .arg("doctor")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_tls_and_authentication() {
    const SECRET: &str = "doctor-Pa55";
    let s = secure(false, Some(("gateway", SECRET)));
    let dir = common::scratch("doctor-tls");
    std::fs::write(dir.join("flow.json"), relay()).unwrap();
    std::fs::write(dir.join("password.txt"), SECRET).unwrap();
    let good = server_config(
        &s,
        "localhost",
        "username = \"gateway\"\npassword_file = \"password.txt\"",
    );
    std::fs::write(dir.join("flowbus.toml"), &good).unwrap();
    let cfg = dir.join("flowbus.toml").display().to_string();
    let flows = dir.join("flow.json").display().to_string();
    let (code, out) = doctor(&["--config", &cfg, "--flows", &flows, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        report["servers"][0]["tls"],
        "ok (certificate and host name verified)"
    );
    assert_eq!(report["servers"][0]["auth"], "ok as 'gateway'");
    assert_eq!(report["servers"][0]["max_qos"], 2);
    assert!(!out.contains(SECRET));
    // Wrong password: exit 1, the refusal shown.
    std::fs::write(dir.join("password.txt"), "wrong").unwrap();
    let (code, out) = doctor(&["--config", &cfg, "--flows", &flows, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, 1);
    assert!(
        report["servers"][0]["auth"]
            .as_str()
            .unwrap()
            .starts_with("refused"),
        "{out}"
    );
    assert_eq!(report["nodes"][0]["verdict"], "unreachable");
    // Untrusted CA: the TLS column says so.
    std::fs::write(dir.join("password.txt"), SECRET).unwrap();
    std::fs::write(
        dir.join("flowbus.toml"),
        good.replace("ca.pem", "other-ca.pem"),
    )
    .unwrap();
    let (code, out) = doctor(&["--config", &cfg, "--flows", &flows, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, 1);
    assert!(
        report["servers"][0]["tls"]
            .as_str()
            .unwrap()
            .starts_with("failed"),
        "{out}"
    );
}
