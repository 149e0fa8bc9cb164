//! A `tracing` layer that records the duration of chosen spans as latencies, so a service that
//! already has spans around its handlers adopts hush with a few lines:
//!
//! ```no_run
//! # fn demo(client: hush_client::HushClient) {
//! use tracing_subscriber::prelude::*;
//!
//! let layer = hush_client::HushLayer::new(client).span("pay", "checkout", "POST /pay");
//! tracing_subscriber::registry().with(layer).init();
//! // Every closed `pay` span is now one latency of checkout's POST /pay.
//! let _span = tracing::info_span!("pay").entered();
//! # }
//! ```
//!
//! Spans that share a name (tower-http's `TraceLayer` names them all "request") are told apart
//! by a field: `.span_with_field("request", "http.route", "/pay", "checkout", "POST /pay")`.

use std::collections::HashMap;
use std::time::Instant;

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::runtime::{HushClient, Latency};

/// Which spans of one name become which latency: by a field's value, or any span of the name.
#[derive(Debug, Default)]
struct Rules {
    by_field: Vec<(String, String, Latency)>,
    any: Option<Latency>,
}

impl Rules {
    fn fields(&self) -> impl Iterator<Item = &str> {
        self.by_field.iter().map(|(f, _, _)| f.as_str())
    }
}

/// Records the duration of chosen spans (from creation to close) as latency measurements.
#[derive(Debug)]
pub struct HushLayer {
    client: HushClient,
    spans: HashMap<&'static str, Rules>,
}

/// A chosen span: when it started and, once known, which latency it is.
struct Timed {
    started: Instant,
    latency: Option<Latency>,
}

/// The values of the fields some rule looks at.
struct Values<'a> {
    wanted: Vec<&'a str>,
    found: Vec<(String, String)>,
}

impl Visit for Values<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.wanted.contains(&field.name()) {
            self.found.push((field.name().to_owned(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.wanted.contains(&field.name()) {
            // A string logged with `?` arrives quoted: compare what is inside.
            let text = format!("{value:?}");
            let text = text
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .map_or(text.clone(), str::to_owned);
            self.found.push((field.name().to_owned(), text));
        }
    }
}

impl HushLayer {
    /// A layer that records nothing until spans are chosen with [`HushLayer::span`].
    pub fn new(client: HushClient) -> Self {
        Self {
            client,
            spans: HashMap::new(),
        }
    }

    /// Spans named `name` become latencies of `operation` of `service` (unless a rule of
    /// [`HushLayer::span_with_field`] picks another for them).
    pub fn span(mut self, name: &'static str, service: &str, operation: &str) -> Self {
        let l = self.client.latency(service, operation);
        self.spans.entry(name).or_default().any = Some(l);
        self
    }

    /// Spans named `name` whose field `field` has the value `value` become latencies of
    /// `operation` of `service`: e.g. tower-http's spans, all named "request", told apart by
    /// `http.route`. The field may be set when the span is created or recorded later
    /// (`Span::record`); the span's duration still counts from its creation. The value is
    /// compared as text (`%route`, `?route` and a plain `&str` all match `"/pay"`); the first
    /// rule added that matches wins, and a later `record` of the field picks again.
    pub fn span_with_field(
        mut self,
        name: &'static str,
        field: &str,
        value: &str,
        service: &str,
        operation: &str,
    ) -> Self {
        let l = self.client.latency(service, operation);
        self.spans
            .entry(name)
            .or_default()
            .by_field
            .push((field.to_owned(), value.to_owned(), l));
        self
    }

    /// The latency the field values pick under `rules`, if any.
    fn pick(rules: &Rules, found: &[(String, String)]) -> Option<Latency> {
        rules
            .by_field
            .iter()
            .find(|(f, v, _)| found.iter().any(|(ff, vv)| ff == f && vv == v))
            .map(|(_, _, l)| l.clone())
    }

    fn values(rules: &Rules, visit: impl FnOnce(&mut Values<'_>)) -> Vec<(String, String)> {
        let mut v = Values {
            wanted: rules.fields().collect(),
            found: Vec::new(),
        };
        if !v.wanted.is_empty() {
            visit(&mut v);
        }
        v.found
    }
}

impl<S> Layer<S> for HushLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(rules) = self.spans.get(attrs.metadata().name()) else {
            return;
        };
        let found = Self::values(rules, |v| attrs.record(v));
        let latency = Self::pick(rules, &found);
        if let Some(span) = ctx.span(id) {
            // `replace`, not `insert`: a second HushLayer on the same span must not panic.
            span.extensions_mut().replace(Timed {
                started: Instant::now(),
                latency,
            });
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let Some(rules) = self.spans.get(span.metadata().name()) else {
            return;
        };
        let found = Self::values(rules, |v| values.record(v));
        if let Some(l) = Self::pick(rules, &found)
            && let Some(t) = span.extensions_mut().get_mut::<Timed>()
        {
            t.latency = Some(l);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(rules) = self.spans.get(span.metadata().name()) else {
            return;
        };
        if let Some(t) = span.extensions().get::<Timed>()
            && let Some(l) = t.latency.as_ref().or(rules.any.as_ref())
        {
            l.record(t.started.elapsed());
        }
    }
}
