//! The properties both MQTT nodes share, their checks at validation, and topic checks.

use super::endpoint::normalise_url;
use std::collections::BTreeSet;

use flowbus_runtime::config::Config;

use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::node::{NodeDecl, Problem, PropKind, PropSpec, ValidateCtx};

/// Properties both MQTT nodes have.
pub const COMMON_PROPS: [PropSpec; 6] = [
    PropSpec::opt("server", PropKind::Str),
    PropSpec::opt("url", PropKind::Str),
    PropSpec::opt("qos", PropKind::Int { min: 0, max: 2 }),
    PropSpec::opt("client_id", PropKind::Str),
    PropSpec::opt("clean_session", PropKind::Bool),
    PropSpec::opt("version", PropKind::Int { min: 3, max: 5 }),
];

/// `max_payload`, which both nodes have: the largest payload the node receives or publishes.
pub const MAX_PAYLOAD_PROP: PropSpec = PropSpec::opt(
    "max_payload",
    PropKind::Size {
        max: flowbus_runtime::config::MQTT_MAX_PAYLOAD,
    },
);

/// A node's `max_payload`: its own property, else its server's, else `[mqtt] max_payload`.
pub fn max_payload(node: &NodeDecl, config: &Config) -> usize {
    let server = || {
        node.str("server")
            .and_then(|s| config.servers.get(s))
            .and_then(|s| s.max_payload)
            .map(|s| s.0)
    };
    let bytes = node
        .size("max_payload")
        .or_else(server)
        .unwrap_or(config.mqtt.max_payload.0);
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// Checks shared by both nodes: exactly one of `server` and `url`, a usable URL, version 3
/// or 5.
pub fn check_common(node: &NodeDecl, _ctx: &ValidateCtx) -> Vec<Problem> {
    let mut p = Vec::new();
    match (node.str("server"), node.str("url")) {
        (Some(_), Some(_)) => p.push(Problem::at(
            "url",
            FlowErrorKind::BadValue {
                property: "url".into(),
                message: "give either \"server\" (defined in flowbus.toml) or \"url\", not both"
                    .into(),
            },
        )),
        (None, None) => p.push(Problem::node(FlowErrorKind::MissingOneOf(
            "\"server\" (a server defined in flowbus.toml) or \"url\"".into(),
        ))),
        (None, Some(url)) => {
            if let Err(m) = normalise_url(url) {
                p.push(Problem::at(
                    "url",
                    FlowErrorKind::BadValue {
                        property: "url".into(),
                        message: m,
                    },
                ));
            }
        }
        _ => {}
    }
    if let Some(v) = node.int("version") {
        if v != 3 && v != 5 {
            p.push(Problem::at(
                "version",
                FlowErrorKind::BadValue {
                    property: "version".into(),
                    message: format!(
                        "{v} is not an MQTT version flowbus speaks; use 3 (3.1.1) or 5"
                    ),
                },
            ));
        }
    }
    if let Some(id) = node.str("client_id") {
        // The id names the client's directory under `<data_dir>/mqtt/`: `..` would make that
        // the data directory itself.
        if id.len() > crate::mqtt_limits::MAX_STRING
            || id.contains(['+', '#', '/', '\0'])
            || id == "."
            || id == ".."
        {
            p.push(Problem::at(
                "client_id",
                FlowErrorKind::BadValue {
                    property: "client_id".into(),
                    message: "must be at most 65535 bytes (UTF-8) without '+', '#', '/' or NUL, and not '.' or '..'".into(),
                },
            ));
        }
    }
    p
}

/// Topic filters as given (string or list), deduplicated, in order.
pub fn topics(node: &NodeDecl) -> Vec<String> {
    let mut seen = BTreeSet::new();
    node.str_list("topic")
        .into_iter()
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

/// Checks an MQTT topic filter (subscribe) or name (publish): not empty, an MQTT string (at
/// most 65,535 bytes of UTF-8, no NUL: see [`mqtt_limits`](crate::mqtt_limits)), wildcards
/// only where a filter allows them.
pub fn check_topic(t: &str, filter: bool) -> Result<(), String> {
    if t.is_empty() {
        return Err("a topic must not be empty".into());
    }
    crate::mqtt_limits::check_string("topic", t).map_err(|e| e.to_string())?;
    let shown = || crate::mqtt_limits::preview(t);
    if !filter {
        // A name has no wildcard anywhere: found without splitting it into levels, since a
        // publish checks every TopicName override.
        if t.contains(['+', '#']) {
            return Err(format!(
                "topic {} contains a wildcard; a publish needs a topic name",
                shown()
            ));
        }
        return Ok(());
    }
    let body = match t.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, f))
                if !group.is_empty() && !group.contains(['+', '#']) && !f.is_empty() =>
            {
                f
            }
            _ => return Err(format!("{} must be $share/<group>/<filter>", shown())),
        },
        None => t,
    };
    let levels = body.split('/').count();
    for (i, l) in body.split('/').enumerate() {
        let wild = l.contains('+') || l.contains('#');
        if wild && !(l == "+" || (l == "#" && i == levels - 1)) {
            return Err(format!(
                "topic filter {} misuses a wildcard: '+' must fill a whole level and '#' must be the whole last level",
                shown()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_checks() {
        assert!(check_topic("plant/+/telemetry", true).is_ok());
        assert!(check_topic("a/#", true).is_ok());
        assert!(check_topic("$share/g/a/+", true).is_ok());
        assert!(check_topic("a/b#", true).is_err());
        assert!(check_topic("a/#/b", true).is_err());
        assert!(check_topic("a/+", false).is_err());
        assert!(check_topic("$share//a", true).is_err());
        // Longer than MQTT can say, for either: refused, and quoted only in part.
        let long = format!("a/{}", "b".repeat(70_000));
        for filter in [false, true] {
            let e = check_topic(&long, filter).unwrap_err();
            assert!(e.contains("70002 bytes long") && e.len() < 200, "{e}");
        }
        assert!(check_topic(&"c".repeat(65_535), false).is_ok());
        assert!(check_topic("a\0b", false).unwrap_err().contains("NUL"));
    }
}
