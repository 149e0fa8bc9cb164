//! `hush sim --mode tune`: searches the per-instance bound, the bucket layout and the pooled
//! detector's window count with the model, and recommends task parameters for a target (a p95
//! shift to catch, with a power, within a number of windows, at a false-alarm rate and ε).
//!
//! A lower per-instance bound lowers every bucket's noise (the sensitivity is twice the bound)
//! but drops the requests an instance serves beyond it: the model counts only
//! `min(bound, requests_per_instance) / requests_per_instance` of the window's requests, so the
//! sampling loss is paid. Fewer or narrower buckets put less noise in the sums the detector
//! tests but make quantiles coarser; both show in the table.

use std::fmt::Write as _;

use indicatif::ProgressBar;

use super::scenario::{AnomalyKind, Buckets, Scenario};
use super::{Summary, summarize, sweep};

/// The target the tuner works toward.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// ε per window.
    pub(crate) epsilon: f64,
    /// The p95 shift to catch, ms.
    pub(crate) shift_ms: f64,
    /// The power to reach within `within` windows.
    pub(crate) power: f64,
    pub(crate) within: usize,
    pub(crate) false_alarm_rate: f64,
}

/// One configuration tried, and what the model predicts for it.
#[derive(Clone, Debug)]
pub(crate) struct Candidate {
    pub(crate) bound: u64,
    pub(crate) buckets: Buckets,
    pub(crate) pooled_windows: usize,
    /// At the target shift.
    pub(crate) at_target: Summary,
    /// Without an anomaly.
    pub(crate) null: Summary,
}

impl Candidate {
    /// The false-alarm rate is consistent with the target's (within 3 binomial standard errors).
    fn keeps_false_alarms(&self, t: &Target) -> bool {
        let n = self.null.null_tests.max(1) as f64;
        let a = t.false_alarm_rate;
        self.null.false_alarm_rate <= a + 3.0 * (a * (1.0 - a) / n).sqrt()
    }
}

/// The configurations tried: bounds up to the requests an instance serves, bucket layouts
/// from the scenario's range and a narrower one, with 10 to 30 buckets, and 1 to 3 pooled
/// windows.
fn candidates(s: &Scenario) -> Vec<(u64, Buckets, usize)> {
    let requests = s.requests_per_instance();
    let mut bounds: Vec<u64> = [5, 10, 20, 40]
        .into_iter()
        .filter(|&b| b <= requests)
        .collect();
    if !bounds.contains(&requests) {
        bounds.push(requests);
    }
    let b = &s.buckets;
    let mut layouts = Vec::new();
    for max_ms in [b.max_ms, (b.max_ms / 4.0).max(b.min_ms * 4.0)] {
        for count in [10, 16, 20, 30] {
            layouts.push(Buckets {
                min_ms: b.min_ms,
                max_ms,
                count,
            });
        }
    }
    let mut out = Vec::new();
    for &bound in &bounds {
        for l in &layouts {
            for pooled in 1..=3 {
                out.push((bound, l.clone(), pooled));
            }
        }
    }
    out
}

/// How many configurations [`search`] tries.
pub(crate) fn candidate_count(s: &Scenario) -> usize {
    candidates(s).len()
}

/// The scenario of one configuration: its latency anomaly at magnitudes 0 and the target, at
/// the target's ε and the scenario's first traffic level.
fn variant(
    s: &Scenario,
    t: &Target,
    anomaly: usize,
    (bound, buckets, pooled): &(u64, Buckets, usize),
) -> Scenario {
    let mut v = s.clone();
    v.requests_per_instance = Some(s.requests_per_instance());
    v.events_per_client = *bound;
    v.buckets = buckets.clone();
    v.detection.pooled_windows = *pooled;
    v.detection.false_alarm_rate = t.false_alarm_rate;
    v.detect_within = t.within;
    v.epsilons = vec![t.epsilon];
    v.events_per_window.truncate(1);
    let mut a = s.anomalies[anomaly].clone();
    a.magnitudes = vec![0.0, t.shift_ms];
    v.anomalies = vec![a];
    v
}

/// Runs every configuration with the model (`s.repetitions` runs each); candidates in the
/// order tried.
pub(crate) fn search(
    s: &Scenario,
    t: &Target,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Candidate>> {
    let anomaly = s
        .anomalies
        .iter()
        .position(|a| a.kind == AnomalyKind::LatencyShift)
        .ok_or_else(|| anyhow::anyhow!("the scenario has no latency_shift anomaly to tune for"))?;
    let mut out = Vec::new();
    for c in candidates(s) {
        let v = variant(s, t, anomaly, &c);
        let runs = sweep(&v, &ProgressBar::hidden())?;
        progress.inc(1);
        let sums: Vec<Summary> = runs
            .iter()
            .map(|(cell, r)| summarize(&v, *cell, r))
            .collect();
        let pick = |m: f64| {
            sums.iter()
                .find(|x| x.cell.magnitude == m)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no runs at magnitude {m}"))
        };
        out.push(Candidate {
            bound: c.0,
            buckets: c.1,
            pooled_windows: c.2,
            at_target: pick(t.shift_ms)?,
            null: pick(0.0)?,
        });
    }
    Ok(out)
}

/// The recommended configuration: among those that keep the false-alarm rate, the highest
/// power at the target; among those within 0.01 of it, the lowest p95 error, then (within
/// 0.1 ms of that) the fewest false alarms.
pub(crate) fn best<'a>(cands: &'a [Candidate], t: &Target) -> Option<&'a Candidate> {
    let ok: Vec<&Candidate> = cands.iter().filter(|c| c.keeps_false_alarms(t)).collect();
    let top = ok
        .iter()
        .map(|c| c.at_target.power_within)
        .fold(f64::NEG_INFINITY, f64::max);
    let strong: Vec<&Candidate> = ok
        .into_iter()
        .filter(|c| c.at_target.power_within >= top - 0.01)
        .collect();
    let rmse = strong
        .iter()
        .map(|c| c.null.p95_rmse_ms)
        .fold(f64::INFINITY, f64::min);
    strong
        .into_iter()
        .filter(|c| c.null.p95_rmse_ms <= rmse + 0.1)
        .min_by(|a, b| a.null.false_alarm_rate.total_cmp(&b.null.false_alarm_rate))
}

/// The report: the best configurations, the recommendation and its task and detection TOML.
pub(crate) fn report(s: &Scenario, cands: &[Candidate], t: &Target) -> String {
    let mut md = String::from("# hush sim tune\n\n");
    let _ = writeln!(
        md,
        "Target: a {} ms p95 shift caught with ≥ {:.0}% power within {} windows at ≤ {}% false \
         alarms, ε = {} per window; {} requests per window, {} per instance; {} runs per \
         configuration (model mode, seed {}).\n",
        t.shift_ms,
        100.0 * t.power,
        t.within,
        100.0 * t.false_alarm_rate,
        t.epsilon,
        s.events_per_window[0],
        s.requests_per_instance(),
        s.repetitions,
        s.seed
    );
    let mut sorted: Vec<&Candidate> = cands.iter().collect();
    sorted.sort_by(|a, b| {
        b.at_target
            .power_within
            .total_cmp(&a.at_target.power_within)
            .then(a.null.p95_rmse_ms.total_cmp(&b.null.p95_rmse_ms))
    });
    let _ = writeln!(
        md,
        "| bound | buckets | pooled windows | power | mean delay | false alarms | p95 RMSE (ms) | p99 RMSE (ms) |\n| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for c in sorted.iter().take(12) {
        let _ = writeln!(
            md,
            "| {} | {} from {} to {} ms | {} | {:.1}% | {:.2} | {:.2}%{} | {:.1} | {:.1} |",
            c.bound,
            c.buckets.count,
            c.buckets.min_ms,
            c.buckets.max_ms,
            c.pooled_windows,
            100.0 * c.at_target.power_within,
            c.at_target.mean_delay,
            100.0 * c.null.false_alarm_rate,
            if c.keeps_false_alarms(t) {
                ""
            } else {
                " (too many)"
            },
            c.null.p95_rmse_ms,
            c.null.p99_rmse_ms,
        );
    }
    let _ = writeln!(md, "\n{} configurations tried.\n", cands.len());
    match best(cands, t) {
        None => {
            let _ = writeln!(md, "No configuration kept the false-alarm rate.");
        }
        Some(c) => {
            let reached = c.at_target.power_within >= t.power;
            let _ = writeln!(
                md,
                "## Recommendation\n\n{}: per-instance bound {}, {} buckets from {} to {} ms, \
                 pooled_windows = {}: predicted power {:.1}% within {} windows (mean delay {:.2} \
                 windows), false alarms {:.2}%, p95 RMSE {:.1} ms, p99 RMSE {:.1} ms.\n",
                if reached {
                    "The target is reached"
                } else {
                    "The target is NOT reached; the closest"
                },
                c.bound,
                c.buckets.count,
                c.buckets.min_ms,
                c.buckets.max_ms,
                c.pooled_windows,
                100.0 * c.at_target.power_within,
                t.within,
                c.at_target.mean_delay,
                100.0 * c.null.false_alarm_rate,
                c.null.p95_rmse_ms,
                c.null.p99_rmse_ms,
            );
            let _ = writeln!(
                md,
                "Task (fill in task_id, tenant, name and the collector's public config from `hush keygen`):\n\n```toml\n{}```\n",
                task_toml(c, t)
            );
            let _ = writeln!(
                md,
                "The results service's `[detection]`:\n\n```toml\n[detection]\nfalse_alarm_rate = {}\npooled_windows = {}\n```\n\n\
                 Confirm it through the real system: `hush sim --mode pipeline --scenario tuned.toml` \
                 (written beside this report; keep `events_per_window` small there).",
                t.false_alarm_rate, c.pooled_windows
            );
        }
    }
    md
}

/// The recommended task as TOML; the caller fills in what only it knows.
pub(crate) fn task_toml(c: &Candidate, t: &Target) -> String {
    let bounds = hush_protocol::task::log_spaced_bounds(
        (c.buckets.min_ms * 1_000.0) as u64,
        (c.buckets.max_ms * 1_000.0) as u64,
        c.buckets.count,
    );
    let list: Vec<String> = bounds.iter().map(u64::to_string).collect();
    format!(
        "kind = \"window_histogram\"\n\
         # {} buckets, log-spaced from {} to {} ms (upper bounds, microseconds).\n\
         bucket_bounds_us = [{}]\n\
         contribution_bound = {}\nclip_contributions = true\n\
         epsilon_per_collection = {}\nepsilon_budget = {}\n",
        c.buckets.count,
        c.buckets.min_ms,
        c.buckets.max_ms,
        list.join(", "),
        c.bound,
        t.epsilon,
        t.epsilon * 10.0
    )
}

/// The scenario of the recommended configuration with the original's full sweep, for
/// `--mode pipeline` or another model run.
pub(crate) fn tuned_scenario(s: &Scenario, c: &Candidate, t: &Target) -> Scenario {
    let mut v = s.clone();
    v.requests_per_instance = Some(s.requests_per_instance());
    v.events_per_client = c.bound;
    v.buckets = c.buckets.clone();
    v.detection.pooled_windows = c.pooled_windows;
    v.detection.false_alarm_rate = t.false_alarm_rate;
    v.detect_within = t.within;
    v.epsilons = vec![t.epsilon];
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tuners_pick_reproduces_its_predicted_power_with_another_seed() {
        let mut s =
            Scenario::from_toml(include_str!("../../scenarios/default.toml")).expect("default");
        s.repetitions = 100;
        s.windows = 10;
        s.events_per_window = vec![20_000];
        let t = Target {
            epsilon: 1.0,
            shift_ms: 10.0,
            power: 0.95,
            within: 2,
            false_alarm_rate: 0.01,
        };
        let cands = search(&s, &t, &ProgressBar::hidden()).unwrap();
        assert_eq!(cands.len(), candidates(&s).len());
        let pick = best(&cands, &t).expect("a configuration keeps the false-alarm rate");
        let predicted = pick.at_target.power_within;
        // The same configuration, another seed.
        let mut again = s.clone();
        again.seed += 1_000;
        let v = variant(
            &again,
            &t,
            0,
            &(pick.bound, pick.buckets.clone(), pick.pooled_windows),
        );
        let runs = sweep(&v, &ProgressBar::hidden()).unwrap();
        let sum = runs
            .iter()
            .map(|(cell, r)| summarize(&v, *cell, r))
            .find(|x| x.cell.magnitude == t.shift_ms)
            .unwrap();
        // Two proportions over 100 runs each: their difference has a standard error of at most
        // 0.071; accept 4.5 of them.
        let p = 0.5 * (predicted + sum.power_within);
        let se = (2.0 * p * (1.0 - p) / 100.0).sqrt().max(0.01);
        assert!(
            (predicted - sum.power_within).abs() <= 4.5 * se,
            "predicted {predicted:.3}, again {:.3}",
            sum.power_within
        );
        let text = report(&s, &cands, &t);
        assert!(text.contains("## Recommendation"), "{text}");
        // The printed task is one hush accepts once the caller's fields are added.
        let toml_text = format!(
            "tenant = \"acme\"\n{}collector_hpke_config = \"AQAgAAEAAQAgG0Y4guK5OB4qq_LDqdWvM5emRAtaHuQMFu0JprkiI2s\"\n",
            task_toml(pick, &t)
        );
        let params: hush_protocol::TaskParams = toml::from_str(&toml_text).unwrap();
        hush_protocol::TaskConfig::new(params).unwrap();
    }
}
