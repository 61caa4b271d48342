//! Turns the load generator's JSON lines (`results.jsonl`) into the markdown report: one
//! table per broker setting (medians over repetitions), a summary in the shape of issue 8's
//! target table, and throughput and latency ratios against the reference systems; then, for
//! the open-loop burst runs (`"mode":"burst"`), one table per broker configuration.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use flowbus_bench::args::Args;
use flowbus_bench::stats::median;
use serde_json::Value;

const USAGE: &str = "report --results results.jsonl [--machine machine.txt]";

/// Systems in display order; anything else follows alphabetically.
const ORDER: &[&str] = &[
    "broker",
    "bridge-wait",
    "bridge-pipelined",
    "nodered",
    "flowbus",
    "flowbus-inflight",
    "flowbus-memory",
    "flowbus-x4",
];
const REFERENCES: &[&str] = &["broker", "bridge-wait", "bridge-pipelined", "nodered"];

fn describe(system: &str) -> &str {
    match system {
        "broker" => "broker only (producer → mosquitto → consumer)",
        "bridge-wait" => "paho bridge, wait for each ack",
        "bridge-pipelined" => "paho bridge, pipelined",
        "nodered" => "Node-RED 4",
        "flowbus" => "flowbus, `instances: 1`",
        "flowbus-inflight" => "flowbus, `instances: 1`, `in_flight: 256`",
        "flowbus-x4" => "flowbus, `instances: 4`",
        "flowbus-memory" => "flowbus, `instances: 1`, persistence `memory`",
        other => other,
    }
}

#[derive(Default)]
struct Cell {
    runs: usize,
    failed: usize,
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    max: Vec<f64>,
    rss_mb: Vec<f64>,
    cpu: Vec<f64>,
    cpu_us_per_msg: Vec<f64>,
    ctx_per_msg: Vec<f64>,
    other: Vec<f64>,
    lost: u64,
    dups: u64,
    order: u64,
    stalled: usize,
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn fmt_rate(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(x) => {
            let n = x.round() as u64;
            let s = n.to_string();
            let mut out = String::new();
            for (i, c) in s.chars().enumerate() {
                if i > 0 && (s.len() - i).is_multiple_of(3) {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
    }
}

fn fmt_ms(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn fmt_num(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".into(), |x| format!("{x:.digits$}"))
}

fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

fn sort_systems(mut v: Vec<String>) -> Vec<String> {
    v.sort_by_key(|s| {
        (
            ORDER.iter().position(|o| o == s).unwrap_or(ORDER.len()),
            s.clone(),
        )
    });
    v
}

fn main() {
    let a = Args::parse(USAGE, &[]);
    let Some(path) = a.opt("results") else {
        eprintln!("{USAGE}");
        std::process::exit(2)
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        eprintln!("report: cannot read {path}: {e}");
        std::process::exit(1)
    });
    // label -> system -> qos -> cell
    let mut cells: BTreeMap<String, BTreeMap<String, BTreeMap<i64, Cell>>> = BTreeMap::new();
    let mut bursts = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(r) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if r["mode"].as_str() == Some("burst") {
            bursts.push(r);
            continue;
        }
        let label = r["label"].as_str().unwrap_or("").to_string();
        let system = r["system"].as_str().unwrap_or("?").to_string();
        let qos = r["qos"].as_i64().unwrap_or(-1);
        let c = cells
            .entry(label)
            .or_default()
            .entry(system)
            .or_default()
            .entry(qos)
            .or_default();
        c.runs += 1;
        if r["failed"].as_bool() == Some(true) {
            c.failed += 1;
            continue;
        }
        let t = &r["throughput"];
        let l = &r["latency"];
        if let Some(x) = f(&t["rate"]) {
            c.rate.push(x);
        }
        for (v, key) in [
            (&mut c.p50, "p50_ms"),
            (&mut c.p99, "p99_ms"),
            (&mut c.max, "max_ms"),
        ] {
            if let Some(x) = f(&l[key]) {
                v.push(x);
            }
        }
        if let Some(x) = f(&r["sut"]["peak_rss_kib"]) {
            c.rss_mb.push(x / 1024.0);
        }
        if let Some(x) = f(&r["sut"]["cpu_s"]) {
            c.cpu.push(x);
        }
        if let (Some(cpu), Some(n)) = (f(&r["sut"]["cpu_s_throughput"]), f(&t["received"])) {
            if n > 0.0 {
                c.cpu_us_per_msg.push(cpu / n * 1e6);
            }
        }
        if let Some(x) = f(&r["sut"]["ctx_switches_per_msg"]) {
            c.ctx_per_msg.push(x);
        }
        if let Some(x) = f(&r["other_cpu_share"]) {
            c.other.push(x);
        }
        c.lost += u(&t["lost"]) + u(&l["lost"]);
        c.dups += u(&t["dups"]) + u(&l["dups"]);
        c.order += u(&t["order_violations"]) + u(&l["order_violations"]);
        if r["throughput_stalled"].as_bool() == Some(true) {
            c.stalled += 1;
        }
    }

    let mut md = String::new();
    let _ = writeln!(md, "# flowbus bridge benchmark\n");
    if let Some(m) = a
        .opt("machine")
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        let _ = writeln!(md, "```\n{}```\n", m);
    }
    if !cells.is_empty() {
        let _ = writeln!(
        md,
        "Throughput: messages received / (last receive − first send), closed loop (at most `window` messages in flight end to end). \
Latency: at a fixed rate, receive − send. Lost/dup/order: summed over all runs of the cell (both phases). \
CPU: the system under test during both phases; µs/msg: its CPU in the throughput phase per message; \
ctx sw/msg: context switches of its threads per message in the throughput phase. \
Other load: CPU used by unrelated processes during the run, in cores (above ~0.1 the run was disturbed).\n"
    );
    }
    // The main table (nodelay) first, then the default-broker one, then anything else.
    let mut labels: Vec<&String> = cells.keys().collect();
    labels.sort_by_key(|l| match l.as_str() {
        "nodelay" => (0, l.to_string()),
        "default" => (1, l.to_string()),
        "nodelay-quickack" => (2, l.to_string()),
        "default-quickack" => (3, l.to_string()),
        other => (4, other.to_string()),
    });
    for label in labels {
        let systems = &cells[label];
        let title = match label.as_str() {
            "nodelay" => "Broker with `set_tcp_nodelay true`".to_string(),
            "default" => {
                "Broker with mosquitto's default (`set_tcp_nodelay false`: Nagle on)".to_string()
            }
            "nodelay-quickack" => {
                "Broker with `set_tcp_nodelay true`, client routes with `quickack 1`".to_string()
            }
            "default-quickack" => {
                "Broker with mosquitto's default (Nagle on), client routes with `quickack 1` (no delayed ACKs)".to_string()
            }
            other => format!("Label `{other}`"),
        };
        let reps = systems
            .values()
            .flat_map(|q| q.values().map(|c| c.runs))
            .max()
            .unwrap_or(0);
        let _ = writeln!(md, "## {title} — medians of {reps} run(s)\n");
        let _ = writeln!(
            md,
            "| system | QoS | msg/s | p50 ms | p99 ms | max ms | lost / dup / order | peak RSS MB | CPU s | CPU µs/msg | ctx sw/msg | other load |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        let names = sort_systems(systems.keys().cloned().collect());
        for s in &names {
            for (q, c) in &systems[s] {
                let mut flags = String::new();
                if c.failed > 0 {
                    let _ = write!(flags, " ({} of {} runs failed)", c.failed, c.runs);
                }
                if c.stalled > 0 {
                    let _ = write!(flags, " (stalled in {} runs)", c.stalled);
                }
                let _ = writeln!(
                    md,
                    "| {}{} | {q} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} |",
                    describe(s),
                    flags,
                    fmt_rate(median(&c.rate)),
                    fmt_ms(median(&c.p50)),
                    fmt_ms(median(&c.p99)),
                    fmt_ms(median(&c.max)),
                    c.lost,
                    c.dups,
                    c.order,
                    fmt_num(median(&c.rss_mb), 1),
                    fmt_num(median(&c.cpu), 2),
                    fmt_num(median(&c.cpu_us_per_msg), 1),
                    fmt_num(median(&c.ctx_per_msg), 1),
                    fmt_num(median(&c.other), 2),
                );
            }
        }
        let qs: Vec<i64> = {
            let mut v: Vec<i64> = systems.values().flat_map(|m| m.keys().copied()).collect();
            v.sort();
            v.dedup();
            v
        };
        let _ = writeln!(md, "\n### Summary\n");
        let mut head = "| system |".to_string();
        let mut rule = "|---|".to_string();
        for q in &qs {
            let _ = write!(head, " QoS {q} msg/s |");
            rule.push_str("---|");
        }
        let qn: Vec<String> = qs.iter().map(|q| q.to_string()).collect();
        let _ = write!(
            head,
            " p99 at 1k msg/s (QoS {}) | peak RSS MB |",
            qn.join("/")
        );
        rule.push_str("---|---|");
        let _ = writeln!(md, "{head}\n{rule}");
        for s in &names {
            let mut row = format!("| {} |", describe(s));
            let mut p99s = Vec::new();
            let mut rss = Vec::new();
            for q in &qs {
                let c = systems[s].get(q);
                let _ = write!(row, " {} |", fmt_rate(c.and_then(|c| median(&c.rate))));
                p99s.push(fmt_ms(c.and_then(|c| median(&c.p99))));
                if let Some(x) = c.and_then(|c| median(&c.rss_mb)) {
                    rss.push(x);
                }
            }
            let rss = match (
                rss.iter().copied().reduce(f64::min),
                rss.iter().copied().reduce(f64::max),
            ) {
                (Some(lo), Some(hi)) => format!("{lo:.0}–{hi:.0}"),
                _ => "–".into(),
            };
            let _ = writeln!(row, " {} ms | {rss} |", p99s.join(" / "));
            md.push_str(&row);
        }

        let refs: Vec<&str> = REFERENCES
            .iter()
            .copied()
            .filter(|r| systems.contains_key(*r))
            .collect();
        let _ = writeln!(
            md,
            "\n### Ratios (throughput: system / reference, higher is better; p99: system / reference, lower is better)\n"
        );
        let mut head = "| system | QoS |".to_string();
        let mut rule = "|---|---|".to_string();
        for r in &refs {
            let _ = write!(head, " msg/s vs {r} |");
            rule.push_str("---|");
        }
        for r in &refs {
            let _ = write!(head, " p99 vs {r} |");
            rule.push_str("---|");
        }
        let _ = writeln!(md, "{head}\n{rule}");
        for s in names.iter().filter(|s| s.as_str() != "broker") {
            for q in &qs {
                let Some(c) = systems[s].get(q) else { continue };
                let mut row = format!("| {} | {q} |", describe(s));
                for r in &refs {
                    let rc = systems[*r].get(q);
                    let _ = write!(
                        row,
                        " {} |",
                        if *r == s.as_str() {
                            "–".into()
                        } else {
                            fmt_ratio(median(&c.rate), rc.and_then(|rc| median(&rc.rate)))
                        }
                    );
                }
                for r in &refs {
                    let rc = systems[*r].get(q);
                    let _ = write!(
                        row,
                        " {} |",
                        if *r == s.as_str() {
                            "–".into()
                        } else {
                            fmt_ratio(median(&c.p99), rc.and_then(|rc| median(&rc.p99)))
                        }
                    );
                }
                let _ = writeln!(md, "{row}");
            }
        }
        md.push('\n');
    }
    md.push_str(&burst_report(&bursts));
    print!("{md}");
}

/// One system × QoS of a burst table: the values of each repetition.
#[derive(Default)]
struct BurstCell {
    runs: usize,
    failed: usize,
    capped: usize,
    sent: Vec<f64>,
    delivered: Vec<f64>,
    lost: Vec<f64>,
    dups: Vec<f64>,
    order: Vec<f64>,
    rate: Vec<f64>,
    publish_rate: Vec<f64>,
    rss_mb: Vec<f64>,
    cpu: Vec<f64>,
    other: Vec<f64>,
    publish_errors: u64,
}

/// The median, with the range when the repetitions differ: `1,234 (1,100–1,300)`.
fn fmt_spread(v: &[f64]) -> String {
    let Some(m) = median(v) else {
        return "–".into();
    };
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.len() > 1 && lo.round() != hi.round() {
        format!(
            "{} ({}–{})",
            fmt_rate(Some(m)),
            fmt_rate(Some(lo)),
            fmt_rate(Some(hi))
        )
    } else {
        fmt_rate(Some(m))
    }
}

/// The burst runs (`"mode":"burst"` lines) as one markdown table per broker configuration.
fn burst_report(lines: &[Value]) -> String {
    // label -> system -> qos -> cell
    let mut cells: BTreeMap<String, BTreeMap<String, BTreeMap<i64, BurstCell>>> = BTreeMap::new();
    let mut params = BTreeMap::new();
    for r in lines {
        let label = r["label"].as_str().unwrap_or("").to_string();
        let system = r["system"].as_str().unwrap_or("?").to_string();
        let qos = r["qos"].as_i64().unwrap_or(-1);
        let c = cells
            .entry(label)
            .or_default()
            .entry(system)
            .or_default()
            .entry(qos)
            .or_default();
        c.runs += 1;
        if r["failed"].as_bool() == Some(true) {
            c.failed += 1;
            continue;
        }
        let b = &r["burst"];
        for (v, x) in [
            (&mut c.sent, &b["sent"]),
            (&mut c.delivered, &b["received"]),
            (&mut c.lost, &b["lost"]),
            (&mut c.dups, &b["dups"]),
            (&mut c.order, &b["order_violations"]),
            (&mut c.rate, &b["rate"]),
            (&mut c.publish_rate, &b["publish_rate"]),
            (&mut c.cpu, &r["sut"]["cpu_s"]),
            (&mut c.other, &r["other_cpu_share"]),
        ] {
            if let Some(x) = f(x) {
                v.push(x);
            }
        }
        if let Some(x) = f(&r["sut"]["peak_rss_kib"]) {
            c.rss_mb.push(x / 1024.0);
        }
        if b["capped"].as_bool() == Some(true) {
            c.capped += 1;
        }
        c.publish_errors += u(&b["publish_errors"]) + u(&b["publish_refused"]);
        for key in ["quiet_secs", "cap_secs"] {
            if let Some(x) = f(&r[key]) {
                params.insert(key, x);
            }
        }
    }
    let mut md = String::new();
    if cells.is_empty() {
        return md;
    }
    let _ = writeln!(
        md,
        "## Burst (open loop)\n\n\
N messages published to `bench/in/0` as fast as one paho client takes them (at most 20 \
unacknowledged and 100 queued in paho; a publish it refuses is retried), then a wait until nothing \
has arrived for {} s (or {} s after the first send: \"capped\"). \
Delivered: distinct messages that came out; lost = sent − delivered; dup: extra copies; \
out of order: messages older than one already received (a redelivered old message counts). \
msg/s: delivered / (last new delivery − first send); publish msg/s: sent / (last publish \
acknowledged by the broker − first send). Medians of the repetitions, the range in brackets \
where they differ; ratios are medians against the pipelined paho bridge's in the same results. \
Peak RSS and CPU: the system under test; other load as above.\n",
        params
            .get("quiet_secs")
            .map_or("?".into(), |x| x.to_string()),
        params.get("cap_secs").map_or("?".into(), |x| x.to_string()),
    );
    let mut labels: Vec<&String> = cells.keys().collect();
    labels.sort_by_key(|l| {
        (
            if l.starts_with("burst-unlimited") {
                0
            } else if l.starts_with("burst-default") {
                1
            } else {
                2
            },
            l.to_string(),
        )
    });
    for label in labels {
        let systems = &cells[label];
        let mut title = match label.trim_end_matches("-quickack") {
            "burst-unlimited" => {
                "Broker without limits (`max_inflight_messages 0`, `max_queued_messages 0`)"
                    .to_string()
            }
            "burst-default" => {
                "Broker with mosquitto's default limits (20 in flight and 1,000 queued per client)"
                    .to_string()
            }
            other => format!("Label `{other}`"),
        };
        if label.ends_with("-quickack") {
            title.push_str(", client routes with `quickack 1`");
        }
        let reps = systems
            .values()
            .flat_map(|q| q.values().map(|c| c.runs))
            .max()
            .unwrap_or(0);
        let _ = writeln!(md, "### {title} — {reps} run(s)\n");
        let _ = writeln!(
            md,
            "| system | QoS | sent | delivered | lost | dup | out of order | msg/s | publish msg/s | delivered vs pipelined | msg/s vs pipelined | peak RSS MB | CPU s | other load |"
        );
        let _ = writeln!(
            md,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let reference = systems.get("bridge-pipelined");
        for s in &sort_systems(systems.keys().cloned().collect()) {
            for (q, c) in &systems[s] {
                let mut flags = String::new();
                if c.failed > 0 {
                    let _ = write!(flags, " ({} of {} runs failed)", c.failed, c.runs);
                }
                if c.capped > 0 {
                    let _ = write!(flags, " (capped in {} runs)", c.capped);
                }
                if c.publish_errors > 0 {
                    let _ = write!(flags, " ({} publishes failed)", c.publish_errors);
                }
                let rc = reference.and_then(|r| r.get(q));
                let ratio = |mine: &[f64], theirs: fn(&BurstCell) -> &Vec<f64>| {
                    if s == "bridge-pipelined" {
                        "–".to_string()
                    } else {
                        fmt_ratio(median(mine), rc.and_then(|rc| median(theirs(rc))))
                    }
                };
                let _ = writeln!(
                    md,
                    "| {}{flags} | {q} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    describe(s),
                    fmt_rate(median(&c.sent)),
                    fmt_spread(&c.delivered),
                    fmt_spread(&c.lost),
                    fmt_spread(&c.dups),
                    fmt_spread(&c.order),
                    fmt_rate(median(&c.rate)),
                    fmt_rate(median(&c.publish_rate)),
                    ratio(&c.delivered, |r| &r.delivered),
                    ratio(&c.rate, |r| &r.rate),
                    fmt_num(median(&c.rss_mb), 1),
                    fmt_num(median(&c.cpu), 2),
                    fmt_num(median(&c.other), 2),
                );
            }
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn burst(system: &str, label: &str, delivered: u64, rate: f64) -> Value {
        json!({
            "mode": "burst", "system": system, "label": label, "qos": 1,
            "quiet_secs": 3.0, "cap_secs": 120.0,
            "burst": { "sent": 50000, "received": delivered, "lost": 50000 - delivered,
                       "dups": 7, "order_violations": 0, "rate": rate, "publish_rate": 30000.0,
                       "capped": false, "publish_errors": 0, "publish_refused": 0 },
            "sut": { "cpu_s": 1.5, "peak_rss_kib": 20480 },
            "other_cpu_share": 0.01,
        })
    }

    #[test]
    fn burst_tables_per_broker_with_medians_ranges_and_ratios() {
        let lines = vec![
            burst("bridge-pipelined", "burst-unlimited", 50000, 10000.0),
            burst("flowbus", "burst-unlimited", 40000, 5000.0),
            burst("flowbus", "burst-unlimited", 45000, 6000.0),
            burst("flowbus", "burst-unlimited", 50000, 7000.0),
            burst("flowbus", "burst-default", 2000, 1000.0),
            json!({"rep": 2, "mode": "burst", "system": "flowbus", "label": "burst-default",
                   "qos": 1, "failed": true}),
        ];
        let md = burst_report(&lines);
        let unlimited = md.find("without limits").unwrap();
        let default = md.find("default limits").unwrap();
        assert!(unlimited < default, "{md}");
        // Medians, the range, and the ratios against the pipelined bridge.
        assert!(
            md.contains("| flowbus, `instances: 1` | 1 | 50,000 | 45,000 (40,000–50,000) | 5,000 (0–10,000) | 7 | 0 | 6,000 | 30,000 | 0.90 | 0.60 | 20.0 | 1.50 | 0.01 |"),
            "{md}"
        );
        assert!(md.contains("| paho bridge, pipelined | 1 | 50,000 | 50,000 | 0 | 7 | 0 | 10,000 | 30,000 | – | – |"), "{md}");
        // No reference in that table: no ratio; a failed run is flagged.
        assert!(md.contains("(1 of 2 runs failed) | 1 | 50,000 | 2,000 | 48,000 | 7 | 0 | 1,000 | 30,000 | – | – |"), "{md}");
        assert!(burst_report(&[]).is_empty());
    }
}
