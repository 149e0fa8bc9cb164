//! Windows: recording into the current window within the contribution bound, closing windows
//! as the clock passes their end, and queueing one measurement per report the task calls for.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hush_protocol::{Measurement, MeasurementKind, TaskConfig};

use super::{Inner, Metric, Queued, WindowState, lock};

/// Counters and window histograms send one report per window whatever happened; event
/// histograms one per event.
pub(super) fn reports_every_window(task: &TaskConfig) -> bool {
    task.kind() != MeasurementKind::EventHistogram
}

impl Inner {
    /// Adds `amount` to bucket `bucket` of the metric's current window, within the bound.
    pub(super) fn record(&self, metric: &Arc<Metric>, bucket: usize, amount: u64) {
        self.counters.recorded.fetch_add(amount, Ordering::Relaxed);
        let window = metric.task.window_of(self.clock.now());
        let mut s = lock(&metric.state);
        if s.window != window {
            let fresh = WindowState {
                window,
                counts: vec![0; s.counts.len()],
                total: 0,
                touched: false,
            };
            let old = std::mem::replace(&mut *s, fresh);
            if old.touched || reports_every_window(&metric.task) {
                lock(&self.closed).push((metric.clone(), old));
            }
        }
        let room = metric.task.contribution_bound().saturating_sub(s.total);
        let take = amount.min(room);
        if take < amount {
            self.counters
                .dropped_over_bound
                .fetch_add(amount - take, Ordering::Relaxed);
        }
        if let Some(c) = s.counts.get_mut(bucket) {
            *c += take;
            s.total += take;
            s.touched = true;
        }
    }

    /// Moves every window that ended (or all, if `all`) to the closed list: those something
    /// was recorded in, and every window of the kinds that report each window.
    pub(super) fn close_windows(&self, all: bool) {
        let now = self.clock.now();
        for m in self.metrics.values() {
            let window = m.task.window_of(now);
            let mut s = lock(&m.state);
            let report = s.touched || reports_every_window(&m.task);
            if report && (all || s.window < window) {
                let fresh = WindowState {
                    window,
                    counts: vec![0; s.counts.len()],
                    total: 0,
                    touched: false,
                };
                let old = std::mem::replace(&mut *s, fresh);
                lock(&self.closed).push((m.clone(), old));
            }
        }
    }

    /// Turns closed windows into queued measurements.
    pub(super) fn queue_closed(&self) {
        // The queue stays locked from taking the closed windows until their reports are queued,
        // so `flush` never sees a moment where they are in neither place.
        let mut q = lock(&self.queue);
        let closed = std::mem::take(&mut *lock(&self.closed));
        if closed.is_empty() {
            return;
        }
        let mut items = Vec::new();
        for (m, w) in closed {
            let task = m.task.id();
            match m.task.kind() {
                MeasurementKind::EventHistogram => {
                    for (b, c) in w.counts.iter().enumerate() {
                        for _ in 0..*c {
                            items.push(Queued {
                                task,
                                measurement: Measurement::Bucket(b),
                                time: w.window,
                            });
                        }
                    }
                }
                MeasurementKind::WindowHistogram => {
                    items.push(Queued {
                        task,
                        measurement: Measurement::Counts(w.counts),
                        time: w.window,
                    });
                }
                MeasurementKind::Counter => {
                    items.push(Queued {
                        task,
                        measurement: Measurement::Count(w.total),
                        time: w.window,
                    });
                }
            }
        }
        for item in items {
            if q.len() >= self.config.queue_capacity {
                q.pop_front();
                self.counters
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            q.push_back(item);
        }
        drop(q);
        self.wake.notify_one();
    }
}
