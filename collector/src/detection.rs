//! Anomaly detection on every released window (`crate::detect`). It reads only released,
//! noisy results, so it spends no privacy budget; the alerts and the fact that a window was
//! tested are stored, so a restart neither repeats nor skips a window.

use std::collections::{HashMap, HashSet};

use crate::detect::{self, CountWindow, HistogramWindow, Test};
use hush_protocol::proto::v1 as pb;
use hush_protocol::{MeasurementKind, TaskConfig, TaskId, Time};

use crate::Shared;
use crate::config::ErrorRate;
use crate::error::{Error, Result};

fn start_of(w: &pb::WindowResult) -> u64 {
    w.interval.unwrap_or_default().start
}

fn histogram(w: &pb::WindowResult) -> HistogramWindow {
    HistogramWindow {
        start: start_of(w),
        counts: w.noisy_counts.clone(),
        bounds_us: w.bucket_bounds_us.clone(),
        noise_sd: w.noise_stddev,
    }
}

/// The noisy total of a window and the standard deviation of its noise.
fn total(w: &pb::WindowResult) -> (f64, f64) {
    let sum: i64 = w.noisy_counts.iter().sum();
    (
        sum as f64,
        w.noise_stddev * (w.noisy_counts.len() as f64).sqrt(),
    )
}

fn alert(task: &TaskId, t: &Test) -> pb::Alert {
    pb::Alert {
        task_id: task.as_bytes().to_vec().into(),
        window_start: t.window,
        detector: t.kind.as_str().into(),
        statistic: t.statistic,
        threshold: t.threshold,
        baseline: t.baseline,
        observed: t.observed,
        explanation: t.explanation.clone(),
    }
}

/// Checks that every task an error rate names is a task of this service.
pub(super) fn check(rates: &[ErrorRate], tasks: &HashMap<&str, &TaskConfig>) -> Result<()> {
    for r in rates {
        let names = std::iter::once(&r.errors).chain(&r.requests);
        for n in names {
            if !tasks.contains_key(n.as_str()) {
                return Err(Error::config(format!(
                    "[detection] error_rates names task {n:?}, which is not among task_files"
                )));
            }
        }
        if r.requests.is_empty() {
            return Err(Error::config(format!(
                "[detection] error rate of {:?} lists no request tasks",
                r.errors
            )));
        }
    }
    Ok(())
}

/// What the request tasks say about a window: their noisy event total, not known yet, or that
/// one of them has no result for it.
enum Requests {
    Known(f64, f64),
    Pending,
    Missing,
}

impl Shared {
    fn requests(&self, names: &[String], start: u64) -> Result<Requests> {
        let (mut sum, mut var) = (0.0, 0.0);
        for n in names {
            let Some(t) = self.tasks.values().find(|t| t.name() == n) else {
                return Ok(Requests::Missing);
            };
            match self.store.window(&t.id(), Time::from_secs(start))? {
                Some(w) => {
                    let (v, sd) = total(&w);
                    sum += v;
                    var += sd * sd;
                }
                None if self
                    .store
                    .skipped(&t.id(), Time::from_secs(start))?
                    .is_some() =>
                {
                    return Ok(Requests::Missing);
                }
                None => return Ok(Requests::Pending),
            }
        }
        Ok(Requests::Known(sum, var.sqrt()))
    }

    /// Tests every released window that was not tested yet.
    pub(super) async fn detect(&self) -> Result<()> {
        let cfg = &self.config.detection;
        for task in self.tasks.values() {
            let id = task.id();
            // Windows are tested in order, so the newest one tested means all were: the usual
            // tick reads one key per task, not the task's whole history.
            match self.store.newest_window_start(&id)? {
                Some(newest) if !self.store.tested(&id, newest)? => {}
                _ => continue,
            }
            let windows = self.store.windows(&id)?;
            // Flagged windows stay out of later baselines.
            let mut flagged: HashSet<u64> = self
                .store
                .alerts(Some(&id))?
                .iter()
                .map(|a| a.window_start)
                .collect();
            let rate = cfg.error_rates.iter().find(|r| r.errors == task.name());
            let mut counts: Vec<CountWindow> = Vec::new();
            for (i, w) in windows.iter().enumerate() {
                let start = start_of(w);
                let test = if task.kind() == MeasurementKind::Counter {
                    let (value, noise_sd) = total(w);
                    let requests = match rate {
                        None => None,
                        Some(r) => match self.requests(&r.requests, start)? {
                            Requests::Known(n, sd) => Some((n, sd)),
                            // Wait for the request tasks' results of this window.
                            Requests::Pending => break,
                            Requests::Missing => None,
                        },
                    };
                    let c = CountWindow {
                        start,
                        value,
                        noise_sd,
                        requests,
                    };
                    let tested = self.store.tested(&id, start)?;
                    let t = if tested || (rate.is_some() && requests.is_none()) {
                        None
                    } else {
                        let history: Vec<CountWindow> = counts
                            .iter()
                            .filter(|h| !flagged.contains(&h.start))
                            .filter(|h| h.requests.is_some() == requests.is_some())
                            .cloned()
                            .collect();
                        detect::error_spike(&cfg.detector, &history, &c)
                    };
                    counts.push(c);
                    if tested {
                        continue;
                    }
                    t
                } else {
                    if self.store.tested(&id, start)? {
                        continue;
                    }
                    let history: Vec<HistogramWindow> = windows[..i]
                        .iter()
                        .filter(|h| !flagged.contains(&start_of(h)))
                        .map(histogram)
                        .collect();
                    detect::latency_regression(&cfg.detector, &history, &histogram(w))
                };
                let alerts: Vec<pb::Alert> = test
                    .iter()
                    .filter(|t| t.flagged)
                    .map(|t| alert(&id, t))
                    .collect();
                for a in &alerts {
                    flagged.insert(start);
                    tracing::warn!(task = %id, name = task.name(), window = start, detector = %a.detector, explanation = %a.explanation, "anomaly");
                }
                self.store.put_tested(&id, start, &alerts).await?;
            }
        }
        Ok(())
    }
}
