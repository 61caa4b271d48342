//! Secure by default, tried as an attacker on the same machine (or a web page open in its
//! browser) would, against the real `flowbus` binary over HTTP: the admin token that exists
//! without any set-up, Host and Content-Type checks, what an unauthenticated caller learns,
//! idle connections under a low open-file limit, the private data directory and the lock on it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{http, Broker, Client, Daemon};
use serde_json::{json, Value};

/// A configuration with no `[admin]` section: what a new user has.
const PLAIN: &str =
    "data_dir = \"data\"\n[daemon]\nwatch_interval = \"100ms\"\nshutdown_timeout = \"3s\"\n";

fn tick_flow(name: &str) -> String {
    json!({
        "name": name,
        "nodes": [
            {"id": "t", "type": "Timer", "interval": "200ms"},
            {"id": "show", "type": "Trace", "pattern": "tick ${LocalEnvironment.Timer.Input.Count}"}
        ],
        "connections": [{"from": "t.Out", "to": "show"}]
    })
    .to_string()
}

/// in → out on one broker at QoS 1.
fn relay(url: &str) -> String {
    json!({
        "name": "relay",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "sec/in", "qos": 1},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "sec/out", "qos": 1}
        ],
        "connections": [{"from": "in.Out", "to": "out"}]
    })
    .to_string()
}

/// A raw HTTP/1.1 exchange: the request as written, the answer's status line, headers and
/// body (read until the server closes or `Content-Length` is read).
fn raw(admin: &str, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(admin).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            if len.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every directory and file under `dir`, with its mode.
fn modes_under(dir: &Path) -> Vec<(String, u32)> {
    let mut out = vec![(dir.display().to_string(), mode(dir))];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(modes_under(&p));
        } else {
            out.push((p.display().to_string(), mode(&p)));
        }
    }
    out
}

async fn state_of(d: &Daemon, token: &str, flow: &str) -> String {
    let (_, body) = http(
        "GET",
        &format!("{}/api/v1/flows/{flow}", d.admin_url()),
        None,
        Some(token),
    );
    serde_json::from_str::<Value>(&body).unwrap_or(Value::Null)["state"]
        .as_str()
        .unwrap_or("absent")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_daemon_needs_the_token_it_generated_and_the_cli_finds_it() {
    let mut d = Daemon::spawn(PLAIN, &[("tick.json", &tick_flow("tick"))]);
    d.wait_api().await;
    let base = d.admin_url();
    let token_file = d.dir.join("data/admin.token");
    assert_eq!(mode(&token_file), 0o600);
    let token = d.token();
    assert!(
        token.len() >= 32 && token.chars().all(|c| c.is_ascii_hexdigit()),
        "at least 128 random bits: {token}"
    );

    // Nothing but /healthz answers without it, and what a refused caller reads names
    // nothing: no flow, no path.
    for (method, path) in [
        ("GET", "/api/v1/flows"),
        ("GET", "/api/v1/flows/tick"),
        ("GET", "/api/v1/flows/no-such-flow"),
        ("GET", "/api/v1/activity-log"),
        ("GET", "/api/v1/activity-log/stream"),
        ("GET", "/api/v1/statistics"),
        ("GET", "/metrics"),
        ("GET", "/no/such/endpoint"),
        ("PUT", "/api/v1/flows/evil"),
        ("POST", "/api/v1/flows/tick/stop"),
        ("DELETE", "/api/v1/flows/tick"),
    ] {
        for wrong in [
            None,
            Some("x"),
            Some(&token[1..]),
            Some(&*format!("{token}0")),
        ] {
            let (status, body) = http(method, &format!("{base}{path}"), Some("{}"), wrong);
            assert_eq!(status, 401, "{method} {path} with {wrong:?}: {body}");
            assert!(
                !body.contains("tick") && !body.contains(&d.dir.display().to_string()),
                "{body}"
            );
        }
    }
    let (status, body) = http("GET", &format!("{base}/healthz"), None, None);
    assert_eq!((status, body.as_str()), (200, "{\"status\":\"ok\"}"));
    assert_eq!(state_of(&d, &token, "tick").await, "running");

    // 401 before the body is read: a PUT that declares 50 MB and sends none of it is
    // answered at once.
    let started = Instant::now();
    let (status, _, body) = raw(
        &d.admin,
        "PUT /api/v1/flows/big HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n",
    );
    assert_eq!(status, 401, "{body}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // With the token, the same request is refused for its size.
    let (status, _, _) = raw(
        &d.admin,
        &format!("PUT /api/v1/flows/big HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"),
    );
    assert_eq!(status, 413);

    // The CLI needs no set-up: it reads the token from the data directory of the
    // configuration it finds in its working directory.
    let (code, out, err) = d.cli(&["flows", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tick") && out.contains("running"), "{out}");
    // A token from the environment is taken over the file's (and here it is wrong).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .args(["flows", "list", "--admin", &d.admin])
        .env("FLOWBUS_ADMIN_TOKEN", "wrong")
        .current_dir(&d.dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the bearer token is wrong") && err.contains("FLOWBUS_ADMIN_TOKEN"),
        "{err}"
    );

    // The same token after a restart; and it is in no log line or file but its own.
    assert!(d.terminate(Duration::from_secs(10)).success());
    d.start();
    d.wait_api().await;
    assert_eq!(d.token(), token);
    assert!(!d.stderr().contains(&token) && !d.stdout().contains(&token));
    for (file, _) in modes_under(&d.dir.join("data")) {
        if !file.ends_with("admin.token") && Path::new(&file).is_file() {
            let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
            assert!(!text.contains(&token), "{file} holds the token");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_loopback_host_names_and_json_bodies_change_anything() {
    let d = Daemon::spawn(
        &format!("{PLAIN}[admin]\nallowed_hosts = [\"gateway.plant.example\"]\n"),
        &[("tick.json", &tick_flow("tick"))],
    );
    d.wait_api().await;
    let token = d.token();
    let auth = format!("Authorization: Bearer {token}\r\n");
    let get = |host: &str| {
        raw(
            &d.admin,
            &format!(
                "GET /api/v1/flows HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
            ),
        )
    };
    // DNS rebinding: a page whose name now resolves to 127.0.0.1 sends its own name.
    for host in [
        "rebind.attacker.example",
        "rebind.attacker.example:4880",
        "localhost.attacker.example",
        "127.0.0.1.nip.io",
        "",
    ] {
        let (status, head, body) = get(host);
        assert_eq!(status, 421, "Host {host:?}: {head}\n{body}");
        assert!(!body.contains("tick"), "{body}");
    }
    for host in [
        "localhost",
        "LOCALHOST:4880",
        "127.0.0.1",
        "127.0.0.1:1",
        "[::1]:4880",
        "gateway.plant.example",
        "gateway.plant.example:8443",
    ] {
        let (status, head, _) = get(host);
        assert_eq!(status, 200, "Host {host:?}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("access-control-"),
            "no CORS headers: {head}"
        );
    }
    // A request without Host at all (HTTP/1.0) is refused too.
    let (status, _, _) = raw(
        &d.admin,
        &format!("GET /api/v1/flows HTTP/1.0\r\n{auth}\r\n"),
    );
    assert_eq!(status, 421);

    // The cross-origin "simple" requests a page can send without a preflight: a form post
    // or text/plain. They stop nothing, even with the token.
    for ctype in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let ct = ctype.map_or(String::new(), |c| format!("Content-Type: {c}\r\n"));
        let (status, _, body) = raw(
            &d.admin,
            &format!("POST /api/v1/flows/tick/stop HTTP/1.1\r\nHost: localhost\r\n{auth}{ct}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
        );
        assert_eq!(status, 415, "{ctype:?}: {body}");
    }
    // A rebinding page's stop, as the issue tried it.
    let (status, _, _) = raw(
        &d.admin,
        "POST /api/v1/flows/tick/stop HTTP/1.1\r\nHost: rebind.attacker.example\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 421);
    assert_eq!(state_of(&d, &token, "tick").await, "running");
    // A preflight gets no CORS answer (and no 2xx).
    let (status, head, _) = raw(
        &d.admin,
        "OPTIONS /api/v1/flows/tick/stop HTTP/1.1\r\nHost: localhost\r\nOrigin: http://attacker.example\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
    );
    assert!(status >= 400, "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("access-control-"),
        "{head}"
    );
    // The real thing works: JSON content type, loopback host, token.
    let (status, _, body) = raw(
        &d.admin,
        &format!("POST /api/v1/flows/tick/stop HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(state_of(&d, &token, "tick").await, "stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_authentication_must_be_asked_for_is_loopback_only_and_warns_at_every_start() {
    // Refused on a wildcard address, in the file and through --admin.
    let mut wide = Daemon::spawn(
        "data_dir = \"data\"\n[admin]\nlisten = \"0.0.0.0:4880\"\nauth = \"none\"\n",
        &[],
    );
    let status = wide.child.as_mut().unwrap().wait().unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(
        wide.stderr()
            .contains("admin.auth = \"none\" is only accepted on a loopback listen address"),
        "{}",
        wide.stderr()
    );
    let mut wide = Daemon::spawn("data_dir = \"data\"\n[admin]\nauth = \"none\"\n", &[]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .args(["run", "--admin", "0.0.0.0:1"])
        .current_dir(&wide.dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(1));
    assert!(
        err.contains("only accepted on a loopback listen address"),
        "{err}"
    );

    // On loopback it runs, open, and says so at every start.
    wide.wait_api().await;
    let (status, _) = http(
        "GET",
        &format!("{}/api/v1/flows", wide.admin_url()),
        None,
        None,
    );
    assert_eq!(status, 200);
    assert!(!wide.dir.join("data/admin.token").exists());
    assert!(wide.terminate(Duration::from_secs(10)).success());
    wide.start();
    wide.wait_api().await;
    assert_eq!(
        wide.stderr().matches("has no authentication").count(),
        2,
        "{}",
        wide.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_idle_connections_under_ulimit_256_stop_no_flow() {
    let broker = Broker::start("");
    let config = format!("{PLAIN}[admin]\nheader_timeout = \"2s\"\n[mqtt]\nack_timeout = \"5s\"\n");
    let flows = [
        ("relay.json", relay(&broker.url())),
        ("tick.json", tick_flow("tick")),
    ];
    let flows: Vec<(&str, &str)> = flows.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let d = Daemon::spawn_in_shell(&config, &flows, &[], Some("ulimit -n 256"));
    d.wait_api().await;
    let token = d.token();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("256")),
        "{limits}"
    );
    let sub = Client::connect(&broker.url(), false).await;
    sub.subscribe("sec/out", 1).await;
    let publisher = Client::connect(&broker.url(), false).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.stderr().contains("Subscribed to 'sec/in'") {
        assert!(Instant::now() < deadline, "{}", d.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relayed = |from: u64, n: u64| {
        let (sub, publisher) = (&sub, &publisher);
        async move {
            for i in from..from + n {
                publisher
                    .publish("sec/in", json!({"i": i}).to_string(), 1)
                    .await;
            }
            let got = sub.take_json(n as usize, Duration::from_secs(20)).await;
            let mut seen: Vec<u64> = got.iter().map(|(_, v)| v["i"].as_u64().unwrap()).collect();
            seen.sort_unstable();
            assert_eq!(seen, (from..from + n).collect::<Vec<_>>());
        }
    };
    relayed(0, 50).await;

    // A kept-alive connection that asks nothing more is closed after header_timeout too.
    let mut kept = TcpStream::connect(&d.admin).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let mut first = [0u8; 15];
    kept.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200 OK");
    let idle_since = Instant::now();
    let mut rest = Vec::new();
    let _ = kept.read_to_end(&mut rest);
    let held = idle_since.elapsed();
    assert!(
        held >= Duration::from_millis(1500) && held < Duration::from_secs(5),
        "an idle kept-alive connection was held {held:?} (header_timeout 2s)"
    );

    // 300 connections that never finish their request headers.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(&d.admin).expect("connect");
            let _ = s.write_all(b"GET /api/v1/flows HTTP/1.1\r\nHost: local");
            s
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count();
    assert!(fds < 200, "the daemon holds {fds} descriptors");
    // Messages keep flowing while they are open, and the watcher keeps every flow.
    relayed(50, 50).await;
    // Over the cap a connection is answered at once (503) rather than left waiting.
    let (status, _, body) = raw(&d.admin, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(status == 503 || status == 200, "{status} {body}");
    // The header timeout closes them: within 2 s + slack, every idle one reads end-of-file.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let closed = idle
        .into_iter()
        .filter(|s| {
            let mut s = s;
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut b = [0u8; 512];
            match s.read(&mut b) {
                // The 503 of a connection over the cap, or the end of one the header
                // timeout closed.
                Ok(n) => n == 0 || b.starts_with(b"HTTP/1.1 503"),
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        })
        .count();
    assert_eq!(
        closed, 300,
        "every idle connection was closed by the daemon"
    );
    relayed(100, 50).await;
    for flow in ["relay", "tick"] {
        assert_eq!(
            state_of(&d, &token, flow).await,
            "running",
            "{}",
            d.stderr()
        );
    }
    let (_, log) = http(
        "GET",
        &format!("{}/api/v1/activity-log?number=BIP1006", d.admin_url()),
        None,
        Some(&token),
    );
    let log: Value = serde_json::from_str(&log).unwrap();
    assert_eq!(log["entries"].as_array().unwrap().len(), 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private_whatever_the_umask_and_has_one_daemon() {
    let broker = Broker::start("");
    // A data directory left open by an earlier version.
    let flows_text = relay(&broker.url());
    let mut d = Daemon::spawn_in_shell(
        PLAIN,
        &[("relay.json", &flows_text)],
        &[],
        Some("umask 000; mkdir -p data/removed && chmod 755 data && echo old > data/removed/x.json && chmod 666 data/removed/x.json"),
    );
    d.wait_api().await;
    let token = d.token();
    // Put publications in flight (the broker frozen), so the in-flight log has records.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.stderr().contains("Subscribed to 'sec/in'") {
        assert!(Instant::now() < deadline, "{}", d.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let publisher = Client::connect(&broker.url(), false).await;
    publisher
        .publish("sec/in", "{\"card\":\"4111-1111-1111-1111\"}", 1)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        d.stderr().contains("was readable or writable by others"),
        "{}",
        d.stderr()
    );
    let all = modes_under(&d.dir.join("data"));
    assert!(
        all.iter().any(|(f, _)| f.ends_with("inflight.log")),
        "{all:?}"
    );
    assert!(
        all.iter().any(|(f, _)| f.ends_with("activity.jsonl")),
        "{all:?}"
    );
    for (f, m) in &all {
        let want = if Path::new(f).is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*m, want, "{f} is {m:o} with umask 000");
    }

    // A second daemon on the same data directory refuses, naming it and the first's pid.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .args(["run", "--admin", "127.0.0.1:0"])
        .current_dir(&d.dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("another flowbus daemon (pid {})", d.pid())) && err.contains("data"),
        "{err}"
    );
    // ... and touched nothing: the first still answers with the same token.
    assert_eq!(d.token(), token);
    assert_eq!(state_of(&d, &token, "relay").await, "running");
    // Once the first is gone, a daemon starts there again.
    assert!(d.terminate(Duration::from_secs(10)).success());
    d.start();
    d.wait_api().await;
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_and_slow_bodies_are_bounded() {
    let d = Daemon::spawn(
        &format!("{PLAIN}[admin]\nmax_event_streams = 2\nrequest_timeout = \"1s\"\n"),
        &[("tick.json", &tick_flow("tick"))],
    );
    d.wait_api().await;
    let token = d.token();
    let open_stream = || {
        let mut s = TcpStream::connect(&d.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /api/v1/activity-log/stream HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        (String::from_utf8_lossy(&head).into_owned(), s)
    };
    let (a, first) = open_stream();
    let (b, _second) = open_stream();
    assert!(a.ends_with("200") && b.ends_with("200"), "{a} {b}");
    let (c, _) = open_stream();
    assert!(
        c.ends_with("503"),
        "a third stream over max_event_streams: {c}"
    );
    drop(first);
    // The permit is given back when the daemon notices the stream is gone (its next write).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (again, _s) = open_stream();
        if again.ends_with("200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed stream's place is never freed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A body that never finishes arriving is answered 408 after request_timeout.
    let started = Instant::now();
    let (status, _, body) = raw(
        &d.admin,
        &format!("PUT /api/v1/flows/slow HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"na"),
    );
    assert_eq!(status, 408, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let (status, _) = http(
        "GET",
        &format!("{}/api/v1/flows/slow", d.admin_url()),
        None,
        Some(&token),
    );
    assert_eq!(status, 404, "nothing was deployed");
}
