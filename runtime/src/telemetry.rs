//! The metrics registry: the runtime's counters and histograms, registered as the atomics the
//! engine updates (the hot path costs one relaxed atomic add), rendered as Prometheus text.
//!
//! One registry per daemon (or test harness): the series are rendered as Prometheus text by
//! [`Telemetry::render_prometheus`], and the same atomics feed the JSON statistics. A flow's
//! series are replaced when it is started again and removed when it is removed, so a
//! redeployed flow starts from zero and a removed one leaves no stale series behind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Upper bounds (seconds) of the processing-time histogram buckets.
pub const BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
];

/// A fixed-bucket histogram of durations in seconds, lock-free.
#[derive(Debug, Default)]
pub struct Hist {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Hist {
    /// Records one observation, in seconds.
    pub fn observe(&self, secs: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add((secs.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    /// Records a [`std::time::Duration`].
    pub fn observe_duration(&self, d: std::time::Duration) {
        self.observe(d.as_secs_f64());
    }

    /// A snapshot: cumulative counts per upper bound, the total count and sum.
    pub fn snapshot(&self) -> HistSnapshot {
        let mut cumulative = 0;
        let buckets = BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(le, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (format_float(*le), cumulative)
            })
            .collect();
        HistSnapshot {
            buckets,
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A histogram as JSON: cumulative counts by upper bound (seconds, as text), count and sum.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HistSnapshot {
    /// `le` → observations at or below it (cumulative, as in Prometheus).
    pub buckets: BTreeMap<String, u64>,
    /// All observations.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum_seconds: f64,
}

/// A series: a metric name and its labels, sorted by label name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    name: String,
    labels: Vec<(String, String)>,
}

impl SeriesKey {
    fn new(name: &str, labels: &[(&str, &str)]) -> SeriesKey {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        SeriesKey {
            name: name.to_string(),
            labels,
        }
    }

    fn has_label(&self, name: &str, value: &str) -> bool {
        self.labels.iter().any(|(k, v)| k == name && v == value)
    }
}

#[derive(Default)]
struct Series {
    counters: BTreeMap<SeriesKey, Arc<AtomicU64>>,
    histograms: BTreeMap<SeriesKey, Arc<Hist>>,
}

/// The daemon's metrics registry.
#[derive(Default)]
pub struct Telemetry {
    series: Mutex<Series>,
}

/// A family collected at render time (values read from elsewhere, e.g. the MQTT server
/// statistics).
#[derive(Debug, Clone)]
pub struct Collected {
    /// Metric name.
    pub name: &'static str,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Label sets and values.
    pub samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Telemetry {
    /// An empty registry.
    pub fn new() -> Telemetry {
        Telemetry::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Series> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a counter owned elsewhere under a series, replacing what was there.
    pub fn attach_counter(&self, name: &str, labels: &[(&str, &str)], c: Arc<AtomicU64>) {
        self.lock().counters.insert(SeriesKey::new(name, labels), c);
    }

    /// Puts a histogram owned elsewhere under a series, replacing what was there.
    pub fn attach_histogram(&self, name: &str, labels: &[(&str, &str)], h: Arc<Hist>) {
        self.lock()
            .histograms
            .insert(SeriesKey::new(name, labels), h);
    }

    /// Removes every series that has label `name` = `value` (e.g. all of a flow's).
    pub fn remove_labelled(&self, name: &str, value: &str) {
        let mut s = self.lock();
        s.counters.retain(|k, _| !k.has_label(name, value));
        s.histograms.retain(|k, _| !k.has_label(name, value));
    }

    /// Renders every series, plus `collected` families, in the Prometheus text format
    /// (version 0.0.4).
    // Hand-written (~60 lines): prometheus-client writes OpenMetrics (other TYPE lines, `# EOF`),
    // metrics-exporter-prometheus keeps series we cannot share with the JSON view or drop per
    // flow, and the prometheus crate's encoder takes as much code to fill its model.
    pub fn render_prometheus(&self, collected: &[Collected]) -> String {
        let s = self.lock();
        let mut out = String::new();
        for c in collected {
            if c.samples.is_empty() {
                continue;
            }
            header(&mut out, c.name, c.kind, c.help);
            for (labels, v) in &c.samples {
                let labels: Vec<(String, String)> = labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                line(&mut out, c.name, &labels, None, &format_float(*v));
            }
        }
        let mut last = "";
        for (k, v) in &s.counters {
            if k.name != last {
                header(&mut out, &k.name, "counter", "");
                last = &k.name;
            }
            line(
                &mut out,
                &k.name,
                &k.labels,
                None,
                &v.load(Ordering::Relaxed).to_string(),
            );
        }
        last = "";
        for (k, h) in &s.histograms {
            if k.name != last {
                header(&mut out, &k.name, "histogram", "");
                last = &k.name;
            }
            let snap = h.snapshot();
            let bucket = format!("{}_bucket", k.name);
            for le in BUCKETS {
                let le = format_float(le);
                let n = snap.buckets.get(&le).copied().unwrap_or(0);
                line(&mut out, &bucket, &k.labels, Some(&le), &n.to_string());
            }
            line(
                &mut out,
                &bucket,
                &k.labels,
                Some("+Inf"),
                &snap.count.to_string(),
            );
            line(
                &mut out,
                &format!("{}_sum", k.name),
                &k.labels,
                None,
                &format_float(snap.sum_seconds),
            );
            line(
                &mut out,
                &format!("{}_count", k.name),
                &k.labels,
                None,
                &snap.count.to_string(),
            );
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    if !help.is_empty() {
        let _ = writeln!(
            out,
            "# HELP {name} {}",
            help.replace('\\', "\\\\").replace('\n', "\\n")
        );
    }
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn line(out: &mut String, name: &str, labels: &[(String, String)], le: Option<&str>, value: &str) {
    out.push_str(name);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        let le = le.map(|v| ("le".to_string(), v.to_string()));
        for (k, v) in labels.iter().chain(le.as_ref()) {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A float as Prometheus writes it (`1`, `0.25`, `+Inf`).
fn format_float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v.is_nan() {
        "NaN".to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(t: &Telemetry, name: &str, labels: &[(&str, &str)], n: u64) {
        t.attach_counter(name, labels, Arc::new(AtomicU64::new(n)));
    }

    #[test]
    fn renders_counters_histograms_and_collected_families() {
        let t = Telemetry::new();
        counter(
            &t,
            "flowbus_node_messages_total",
            &[("terminal", "Out"), ("flow", "f"), ("node", "n")],
            3,
        );
        let h = Arc::new(Hist::default());
        t.attach_histogram(
            "flowbus_node_processing_seconds",
            &[("flow", "f"), ("node", "n")],
            h.clone(),
        );
        h.observe(0.0002);
        h.observe(2.0);
        h.observe(60.0);
        let text = t.render_prometheus(&[Collected {
            name: "flowbus_mqtt_failed_connections_total",
            kind: "counter",
            help: "Failed connection attempts.",
            samples: vec![(vec![("server", "tcp://h:1".to_string())], 2.0)],
        }]);
        assert!(text.starts_with("# HELP flowbus_mqtt_failed_connections_total Failed connection attempts.\n# TYPE flowbus_mqtt_failed_connections_total counter\nflowbus_mqtt_failed_connections_total{server=\"tcp://h:1\"} 2\n"), "{text}");
        assert!(text.contains("# TYPE flowbus_node_messages_total counter\nflowbus_node_messages_total{flow=\"f\",node=\"n\",terminal=\"Out\"} 3\n"), "{text}");
        assert!(text.contains(
            "# TYPE flowbus_node_processing_seconds histogram\nflowbus_node_processing_seconds_bucket{flow=\"f\",node=\"n\",le=\"0.00005\"} 0\n"
        ));
        assert!(text.contains(
            "flowbus_node_processing_seconds_bucket{flow=\"f\",node=\"n\",le=\"0.00025\"} 1\n"
        ));
        assert!(text.contains(
            "flowbus_node_processing_seconds_bucket{flow=\"f\",node=\"n\",le=\"5\"} 2\n"
        ));
        assert!(text.contains(
            "flowbus_node_processing_seconds_bucket{flow=\"f\",node=\"n\",le=\"+Inf\"} 3\n"
        ));
        assert!(text.contains("flowbus_node_processing_seconds_count{flow=\"f\",node=\"n\"} 3\n"));
        assert!(text.contains("flowbus_node_processing_seconds_sum{flow=\"f\",node=\"n\"} 62.0002"));
    }

    #[test]
    fn a_flows_series_can_be_removed() {
        let t = Telemetry::new();
        counter(&t, "x_total", &[("flow", "a")], 2);
        counter(&t, "x_total", &[("flow", "b")], 1);
        t.attach_histogram("h_seconds", &[("flow", "a")], Arc::default());
        t.remove_labelled("flow", "a");
        let text = t.render_prometheus(&[]);
        assert!(!text.contains("flow=\"a\""), "{text}");
        assert!(text.contains("x_total{flow=\"b\"} 1\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let t = Telemetry::new();
        counter(&t, "c", &[("node", "a\"b\\c\nd")], 1);
        assert!(t
            .render_prometheus(&[])
            .contains("c{node=\"a\\\"b\\\\c\\nd\"} 1\n"));
    }
}
