//! A `metrics::Recorder` for services that already record with the `metrics` facade: histograms
//! and counters whose name and labels match a configured route are also recorded into a hush
//! task; everything is passed on to the service's own recorder, so its local Prometheus (or
//! whatever it runs) keeps working unchanged.
//!
//! ```no_run
//! # fn demo(client: hush_client::HushClient) {
//! use hush_client::{HushRecorder, LatencyUnit};
//! let local = metrics::NoopRecorder; // the service's own recorder, e.g. a Prometheus exporter
//! let recorder = HushRecorder::new(&client, local)
//!     .histogram("http_request_duration_seconds", &[("route", "/pay")], LatencyUnit::Seconds,
//!                "checkout", "POST /pay")
//!     .counter("http_errors_total", &[("route", "/pay")], "errors");
//! metrics::set_global_recorder(recorder).unwrap();
//! # }
//! ```
//!
//! Matching happens when a metric is registered (once per key for a service that keeps its
//! handles; per call for the `metrics::histogram!` macro): an unmatched name costs a comparison
//! with each routed name, then the service's recorder alone (`benches/recorder_overhead.rs`).
//! A routed counter takes increments; an `absolute` set goes to the service's recorder only. A
//! metric that matches several routes goes to the first one added. The client's own
//! `hush_client_*` counters are never routed (they would report on themselves; a route for one
//! is ignored with a warning).

use std::sync::Arc;
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

use crate::runtime::{self, HushClient, Latency};

/// The unit a routed histogram's values are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatencyUnit {
    /// Seconds (Prometheus convention: `_seconds`).
    Seconds,
    /// Milliseconds.
    Milliseconds,
    /// Microseconds.
    Microseconds,
}

impl LatencyUnit {
    fn duration(self, v: f64) -> Option<Duration> {
        let secs = match self {
            LatencyUnit::Seconds => v,
            LatencyUnit::Milliseconds => v / 1e3,
            LatencyUnit::Microseconds => v / 1e6,
        };
        Duration::try_from_secs_f64(secs).ok()
    }
}

#[derive(Clone, Debug)]
enum Target {
    Latency(Latency, LatencyUnit),
    Counter(runtime::Counter),
}

#[derive(Clone, Debug)]
struct Route {
    labels: Vec<(String, String)>,
    target: Target,
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct HushRecorder<R> {
    client: HushClient,
    inner: R,
    // A few names, scanned in order: cheaper than hashing the name on every registration.
    histograms: Vec<(String, Vec<Route>)>,
    counters: Vec<(String, Vec<Route>)>,
}

impl<R: Recorder> HushRecorder<R> {
    /// A recorder that passes everything to `inner` until routes are added.
    pub fn new(client: &HushClient, inner: R) -> Self {
        Self {
            client: client.clone(),
            inner,
            histograms: Vec::new(),
            counters: Vec::new(),
        }
    }

    /// Histogram `name` with at least `labels` (values in `unit`) becomes latencies of
    /// `operation` of `service` (a latency task the client registered). Names starting
    /// `hush_client_` are refused (ignored): they are the client's own.
    pub fn histogram(
        mut self,
        name: &str,
        labels: &[(&str, &str)],
        unit: LatencyUnit,
        service: &str,
        operation: &str,
    ) -> Self {
        if name.starts_with("hush_client_") {
            tracing::warn!(name, "not routing the client's own metric into hush");
        } else {
            let target = Target::Latency(self.client.latency(service, operation), unit);
            add(&mut self.histograms, name, route(labels, target));
        }
        self
    }

    /// Counter `name` with at least `labels` adds to the client's counter `counter`.
    pub fn counter(mut self, name: &str, labels: &[(&str, &str)], counter: &str) -> Self {
        if name.starts_with("hush_client_") {
            tracing::warn!(name, "not routing the client's own metric into hush");
        } else {
            let target = Target::Counter(self.client.counter(counter));
            add(&mut self.counters, name, route(labels, target));
        }
        self
    }
}

fn add(routes: &mut Vec<(String, Vec<Route>)>, name: &str, r: Route) {
    match routes.iter_mut().find(|(n, _)| n == name) {
        Some((_, v)) => v.push(r),
        None => routes.push((name.to_owned(), vec![r])),
    }
}

fn routes_of<'a>(routes: &'a [(String, Vec<Route>)], name: &str) -> Option<&'a Vec<Route>> {
    routes.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

fn route(labels: &[(&str, &str)], target: Target) -> Route {
    Route {
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        target,
    }
}

/// The first route of `routes` whose labels `key` carries.
fn matching<'a>(routes: Option<&'a Vec<Route>>, key: &Key) -> Option<&'a Route> {
    routes?.iter().find(|r| {
        r.labels
            .iter()
            .all(|(k, v)| key.labels().any(|l| l.key() == k && l.value() == v))
    })
}

struct FanCounter {
    hush: runtime::Counter,
    inner: Counter,
}

impl CounterFn for FanCounter {
    fn increment(&self, value: u64) {
        self.hush.add(value);
        self.inner.increment(value);
    }

    fn absolute(&self, value: u64) {
        self.inner.absolute(value);
    }
}

struct FanHistogram {
    hush: Latency,
    unit: LatencyUnit,
    inner: Histogram,
}

impl HistogramFn for FanHistogram {
    fn record(&self, value: f64) {
        if let Some(d) = self.unit.duration(value) {
            self.hush.record(d);
        }
        self.inner.record(value);
    }
}

impl<R: Recorder> Recorder for HushRecorder<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        let inner = self.inner.register_counter(key, metadata);
        match matching(routes_of(&self.counters, key.name()), key).map(|r| &r.target) {
            Some(Target::Counter(c)) => Counter::from_arc(Arc::new(FanCounter {
                hush: c.clone(),
                inner,
            })),
            _ => inner,
        }
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        let inner = self.inner.register_histogram(key, metadata);
        match matching(routes_of(&self.histograms, key.name()), key).map(|r| &r.target) {
            Some(Target::Latency(l, unit)) => Histogram::from_arc(Arc::new(FanHistogram {
                hush: l.clone(),
                unit: *unit,
                inner,
            })),
            _ => inner,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_convert_and_nonsense_is_dropped() {
        assert_eq!(
            LatencyUnit::Seconds.duration(0.25),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            LatencyUnit::Milliseconds.duration(12.0),
            Some(Duration::from_millis(12))
        );
        assert_eq!(
            LatencyUnit::Microseconds.duration(1500.0),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(LatencyUnit::Seconds.duration(-1.0), None);
        assert_eq!(LatencyUnit::Seconds.duration(f64::NAN), None);
    }
}
