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

use std::collections::HashMap;
use std::time::Instant;

use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::runtime::{HushClient, Latency};

/// Records the duration of chosen spans (from creation to close) as latency measurements.
#[derive(Debug)]
pub struct HushLayer {
    client: HushClient,
    spans: HashMap<&'static str, Latency>,
}

struct Started(Instant);

impl HushLayer {
    /// A layer that records nothing until spans are chosen with [`HushLayer::span`].
    pub fn new(client: HushClient) -> Self {
        Self {
            client,
            spans: HashMap::new(),
        }
    }

    /// Spans named `name` become latencies of `operation` of `service`.
    pub fn span(mut self, name: &'static str, service: &str, operation: &str) -> Self {
        let l = self.client.latency(service, operation);
        self.spans.insert(name, l);
        self
    }
}

impl<S> Layer<S> for HushLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if self.spans.contains_key(attrs.metadata().name())
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(Started(Instant::now()));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(latency) = self.spans.get(span.metadata().name()) else {
            return;
        };
        if let Some(Started(t)) = span.extensions().get::<Started>() {
            latency.record(t.elapsed());
        }
    }
}
