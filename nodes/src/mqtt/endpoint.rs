//! Endpoints: a node's broker (named `[servers.NAME]` or an inline URL), TLS options, and
//! paho errors in words an operator can act on.

use std::path::PathBuf;
use std::time::Duration;

use flowbus_runtime::config::{Config, ServerConfig};

use crate::qos_policy::Policy;
use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::node::{NodeDecl, Problem};
use paho_mqtt as paho;

/// `tcp://h:p` / `ssl://h:p`, accepting `mqtt://` and `mqtts://` as aliases.
pub fn normalise_url(url: &str) -> Result<String, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("'{url}' is not a broker URL; write tcp://host:port or ssl://host:port")
    })?;
    let scheme = match scheme {
        "tcp" | "mqtt" => "tcp",
        "ssl" | "mqtts" => "ssl",
        other => {
            return Err(format!(
                "scheme '{other}' in '{url}' is not supported; use tcp:// or ssl://"
            ))
        }
    };
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("'{url}' has no port; write e.g. {scheme}://{rest}:1883"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "'{url}' must be {scheme}://host:port with a port from 1 to 65535"
        ));
    }
    Ok(format!("{scheme}://{host}:{port}"))
}

/// A broker as a node uses it: URL, protocol version, credentials, policy.
#[derive(Clone)]
pub struct Endpoint {
    /// Normalised URL.
    pub url: String,
    /// The configured server name, when the node names one.
    pub server: Option<String>,
    /// 3 (MQTT 3.1.1) or 5.
    pub version: u8,
    /// User name.
    pub username: Option<String>,
    /// Password (from env or file; never logged, never shown).
    pub(crate) password: Option<String>,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// TLS settings (used with `ssl://`).
    pub tls: Tls,
    /// MQTT v5 session expiry of persistent sessions.
    pub session_expiry: Duration,
    /// Last will.
    pub will: Option<flowbus_runtime::config::WillConfig>,
    /// The QoS policy.
    pub policy: Policy,
    /// Unacknowledged QoS 1/2 publications allowed at once.
    pub max_inflight: u16,
    /// Paho file persistence for QoS 1/2 publishers (else in memory).
    pub file_persistence: bool,
}

/// TLS settings of a server.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// CA certificates (PEM) to trust; the system's default store when absent.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Verify the server certificate and host name.
    pub verify: bool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("server", &self.server)
            .field("version", &self.version)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Endpoint {
    /// The same protocol version at another URL, without credentials or TLS files (those
    /// belong to the configured server).
    pub fn elsewhere(&self, url: &str) -> Endpoint {
        Endpoint::inline(url, self.version)
    }

    /// A server given inline by URL: no credentials, default TLS verification, no policy
    /// beyond what the broker says.
    pub fn inline(url: &str, version: u8) -> Endpoint {
        Endpoint {
            url: url.to_string(),
            server: None,
            version,
            username: None,
            password: None,
            keep_alive: Duration::from_secs(60),
            tls: Tls {
                verify: true,
                ..Tls::default()
            },
            session_expiry: Duration::from_secs(86_400),
            will: None,
            policy: Policy::open(url),
            max_inflight: DEFAULT_MAX_INFLIGHT,
            file_persistence: true,
        }
    }

    /// The server's name, or its URL for an inline server (for messages).
    pub fn label(&self) -> String {
        match &self.server {
            Some(name) => format!("'{name}' ({})", self.url),
            None => self.url.clone(),
        }
    }
}

/// Resolves a node's server (named or inline) at build time. Reading a password is I/O, so
/// it happens here, not in validation.
pub fn resolve_endpoint(node: &NodeDecl, config: &Config) -> Result<Endpoint, Vec<Problem>> {
    let version_prop = node.int("version").map(|v| v as u8);
    if let Some(name) = node.str("server") {
        let Some(s) = config.servers.get(name) else {
            return Err(vec![Problem::at(
                "server",
                FlowErrorKind::UnknownServer {
                    name: name.to_string(),
                    known: config
                        .servers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                },
            )]);
        };
        return endpoint_from_server(name, s, version_prop);
    }
    let url = node.str("url").unwrap_or_default();
    let url = normalise_url(url).map_err(|m| {
        vec![Problem::at(
            "url",
            FlowErrorKind::BadValue {
                property: "url".into(),
                message: m,
            },
        )]
    })?;
    Ok(Endpoint::inline(&url, version_prop.unwrap_or(3)))
}

fn endpoint_from_server(
    name: &str,
    s: &ServerConfig,
    version: Option<u8>,
) -> Result<Endpoint, Vec<Problem>> {
    let bad = |m: String| {
        vec![Problem::at(
            "server",
            FlowErrorKind::BadValue {
                property: "server".into(),
                message: m,
            },
        )]
    };
    let url = normalise_url(&s.url).map_err(|m| bad(format!("[servers.{name}] url: {m}")))?;
    let password = match (&s.password_env, &s.password_file) {
        (Some(var), _) => Some(std::env::var(var).map_err(|_| {
            bad(format!(
                "[servers.{name}] password_env names the environment variable {var}, which is not set"
            ))
        })?),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map(|p| p.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| bad(format!("[servers.{name}] password_file {}: {e}", file.display())))?,
        ),
        (None, None) => None,
    };
    Ok(Endpoint {
        url,
        server: Some(name.to_string()),
        version: version.or(s.version).unwrap_or(3),
        username: s.username.clone(),
        password,
        keep_alive: s.keep_alive.map_or(Duration::from_secs(60), |d| d.0),
        tls: Tls {
            ca_file: s.ca_file.clone(),
            cert_file: s.cert_file.clone(),
            key_file: s.key_file.clone(),
            verify: s.verify_server.unwrap_or(true),
        },
        session_expiry: s
            .session_expiry
            .map_or(Duration::from_secs(86_400), |d| d.0),
        will: s.will.clone(),
        policy: Policy::from_server(name, s),
        max_inflight: s.max_inflight.unwrap_or(DEFAULT_MAX_INFLIGHT),
        file_persistence: s.persistence.as_deref() != Some("memory"),
    })
}

/// mosquitto's default `max_inflight_messages`.
pub const DEFAULT_MAX_INFLIGHT: u16 = 20;

/// Paho TLS options from a server's settings; a file that cannot be read is an error that
/// names it.
pub fn ssl_options(tls: &Tls) -> Result<paho::SslOptions, String> {
    let mut ssl = paho::SslOptionsBuilder::new();
    for f in [&tls.ca_file, &tls.cert_file, &tls.key_file]
        .into_iter()
        .flatten()
    {
        std::fs::metadata(f).map_err(|e| format!("TLS file {}: {e}", f.display()))?;
    }
    if let Some(ca) = &tls.ca_file {
        ssl.trust_store(ca)
            .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
    }
    if let Some(cert) = &tls.cert_file {
        ssl.key_store(cert)
            .map_err(|e| format!("certificate file {}: {e}", cert.display()))?;
    }
    if let Some(key) = &tls.key_file {
        ssl.private_key(key)
            .map_err(|e| format!("key file {}: {e}", key.display()))?;
    }
    ssl.enable_server_cert_auth(tls.verify).verify(tls.verify);
    Ok(ssl.finalize())
}

/// A paho error in words an operator can act on (paho-mqtt 0.14 prints a refused CONNACK
/// as "(0)", and TLS failures only as a connect failure).
pub fn describe_error(e: &paho::Error, url: &str) -> String {
    use paho::ConnectReturnCode as C;
    match e {
        paho::Error::ConnectReturn(code) => {
            let what = match code {
                C::UnacceptableProtocolVersion => "it does not support this MQTT version (set version = 3 or 5 for the server)",
                C::IdentifierRejected => "it rejected the client id (set client_id on the node)",
                C::ServerUnavailable => "the MQTT service is unavailable",
                C::BadUserNameOrPassword => "bad user name or password (check username and password_env/password_file)",
                C::NotAuthorized => "not authorized (check username, password and the broker's ACL)",
                C::Accepted => "accepted",
            };
            format!("the broker refused the connection: {what} (CONNACK return code {})", *code as i32)
        }
        paho::Error::ReasonCode(rc, _) => format!("the broker refused the connection: {rc}"),
        paho::Error::TcpTlsConnectFailure if url.starts_with("ssl://") => {
            "TCP/TLS connect failure (TLS handshake failed: check ca_file, the server certificate's host name, and cert_file/key_file if the broker requires a client certificate)".to_string()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised_or_refused() {
        assert_eq!(normalise_url("mqtt://h:1883").unwrap(), "tcp://h:1883");
        assert_eq!(normalise_url("mqtts://h:8883").unwrap(), "ssl://h:8883");
        assert!(normalise_url("http://h:1")
            .unwrap_err()
            .contains("not supported"));
        assert!(normalise_url("tcp://h").unwrap_err().contains("no port"));
        assert!(normalise_url("tcp://h:99999").is_err());
    }
}
