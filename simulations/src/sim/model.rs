//! The model mode: exact aggregates of simulated traffic with the aggregators' noise mechanism
//! applied, then the detectors the results service runs. Fast enough for 10^7 events per window.

use hush_collector::detect::{self, CountWindow, DetectorConfig, HistogramWindow};
use hush_collector::estimate::quantile_point_ms;
use hush_protocol::Epsilon;
use hush_protocol::dp::{AggregateNoise, NoiseRng, aggregate_noise_stddev};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Binomial, Distribution};

use super::scenario::{AnomalyKind, Scenario, Service};

/// One released window as the collector sees it: noisy latency histogram and noisy error count.
#[derive(Clone, Debug)]
pub(crate) struct Released {
    pub(crate) counts: Vec<i64>,
    pub(crate) noise_sd: f64,
    pub(crate) errors: f64,
    pub(crate) errors_sd: f64,
}

/// One parameter combination of the sweep.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cell {
    pub(crate) anomaly: usize,
    pub(crate) magnitude: f64,
    pub(crate) epsilon: f64,
    pub(crate) events: u64,
}

/// What one run (all windows of one repetition of a cell) gave.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RunResult {
    /// Windows from the anomaly's start to its first detection (`None`: never, or no anomaly).
    pub(crate) delay: Option<usize>,
    /// Tests of windows without an anomaly, and how many were flagged.
    pub(crate) null_tests: u32,
    pub(crate) null_flags: u32,
    /// Root mean square error of the p95 estimate over the windows, ms.
    pub(crate) p95_rmse_ms: f64,
    /// The same for the p99.
    pub(crate) p99_rmse_ms: f64,
}

/// A stream of independent seeds: SplitMix64 over the scenario seed and the run's coordinates.
pub(crate) fn run_seed(seed: u64, cell: usize, rep: usize) -> u64 {
    let mut z = seed
        ^ (cell as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (rep as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The service's latency distribution in window `w` of a run of `cell`.
fn shift_and_rate(s: &Scenario, cell: &Cell, w: usize) -> (f64, f64) {
    let a = &s.anomalies[cell.anomaly];
    let on = w >= a.start_window;
    let base = s.service(&a.service).map(|x| x.error_rate).unwrap_or(0.0);
    match a.kind {
        AnomalyKind::LatencyShift if on => (cell.magnitude, base),
        AnomalyKind::ErrorSpike if on => (0.0, base + cell.magnitude),
        _ => (0.0, base),
    }
}

/// The true quantile `q` of the service's (shifted) latency, ms.
pub(crate) fn true_quantile_ms(svc: &Service, shift_ms: f64, q: f64) -> f64 {
    svc.quantile_ms(q) + shift_ms
}

/// Bucket probabilities of the service's (shifted) latency.
pub(crate) fn bucket_probs(svc: &Service, shift_ms: f64, bounds_us: &[u64]) -> Vec<f64> {
    let cdf = |ms: f64| svc.cdf(ms - shift_ms);
    let mut p = Vec::with_capacity(bounds_us.len() + 1);
    let mut prev = 0.0;
    for b in bounds_us {
        let c = cdf(*b as f64 / 1_000.0);
        p.push((c - prev).max(0.0));
        prev = c;
    }
    p.push((1.0 - prev).max(0.0));
    p
}

/// Exact multinomial counts by sequential binomial draws.
pub(crate) fn multinomial(rng: &mut ChaCha8Rng, n: u64, probs: &[f64]) -> Vec<i64> {
    let mut left = n;
    let mut mass = 1.0;
    let mut out = Vec::with_capacity(probs.len());
    for (i, p) in probs.iter().enumerate() {
        if i + 1 == probs.len() {
            out.push(left as i64);
            break;
        }
        let k = if left == 0 || mass <= 0.0 {
            0
        } else {
            let q = (p / mass).clamp(0.0, 1.0);
            Binomial::new(left, q).map(|b| b.sample(rng)).unwrap_or(0)
        };
        out.push(k as i64);
        left -= k;
        mass -= p;
    }
    out
}

/// The released windows of one run in model mode.
pub(crate) fn simulate(s: &Scenario, cell: &Cell, seed: u64) -> anyhow::Result<Vec<Released>> {
    let a = &s.anomalies[cell.anomaly];
    let svc = s
        .service(&a.service)
        .ok_or_else(|| anyhow::anyhow!("no service {:?}", a.service))?;
    let bounds = s.bounds_us();
    // The histogram's noise gets the task's aggregate part of ε (the rest pays the count).
    let eps = hush_protocol::task::split_epsilon(
        Epsilon::from_f64(cell.epsilon)?,
        s.count_epsilon_percent,
    )
    .0;
    let sens = s.sensitivity();
    let sd = aggregate_noise_stddev(sens, eps);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut noise = NoiseRng::seed_from_u64(rng.random());
    let mechanism = AggregateNoise::new(sens, eps)?;
    (0..s.windows)
        .map(|w| {
            let (shift, rate) = shift_and_rate(s, cell, w);
            let mut counts = multinomial(
                &mut rng,
                s.counted_events(cell.events),
                &bucket_probs(svc, shift, &bounds),
            );
            for c in &mut counts {
                *c += mechanism.sample(&mut noise)?;
            }
            let errors = Binomial::new(cell.events, rate)?.sample(&mut rng) as i64
                + mechanism.sample(&mut noise)?;
            Ok(Released {
                counts,
                noise_sd: sd,
                errors: errors as f64,
                errors_sd: sd,
            })
        })
        .collect()
}

/// Runs the detector of the cell's anomaly over released windows, as the results service does
/// (flagged windows leave the baseline), and scores it.
pub(crate) fn evaluate(
    s: &Scenario,
    cfg: &DetectorConfig,
    cell: &Cell,
    released: &[Released],
) -> RunResult {
    let a = &s.anomalies[cell.anomaly];
    let svc = s.service(&a.service).expect("validated");
    let bounds = s.bounds_us();
    let mut hist: Vec<HistogramWindow> = Vec::new();
    let mut errs: Vec<CountWindow> = Vec::new();
    let (mut null_tests, mut null_flags, mut delay) = (0, 0, None);
    let (mut sq, mut sq99) = (0.0, 0.0);
    for (w, r) in released.iter().enumerate() {
        let h = HistogramWindow {
            start: w as u64,
            counts: r.counts.clone(),
            bounds_us: bounds.clone(),
            noise_sd: r.noise_sd,
        };
        let requests: f64 = r.counts.iter().sum::<i64>() as f64;
        let c = CountWindow {
            start: w as u64,
            value: r.errors,
            noise_sd: r.errors_sd,
            requests: Some((requests, r.noise_sd * (r.counts.len() as f64).sqrt())),
        };
        let test = match a.kind {
            AnomalyKind::LatencyShift => detect::latency_regression(cfg, &hist, &h),
            AnomalyKind::ErrorSpike => detect::error_spike(cfg, &errs, &c),
        };
        let flagged = test.as_ref().is_some_and(|t| t.flagged);
        let anomalous = cell.magnitude > 0.0 && w >= a.start_window;
        if test.is_some() && !anomalous {
            null_tests += 1;
            null_flags += flagged as u32;
        }
        if anomalous && flagged && delay.is_none() {
            delay = Some(w - a.start_window);
        }
        if !flagged {
            hist.push(h);
            errs.push(c);
        }
        let (shift, _) = shift_and_rate(s, cell, w);
        for (q, acc) in [(0.95, &mut sq), (0.99, &mut sq99)] {
            let truth = true_quantile_ms(svc, shift, q);
            let est = quantile_point_ms(&r.counts, &bounds, q).unwrap_or(f64::NAN);
            *acc += (est - truth).powi(2);
        }
    }
    let n = released.len().max(1) as f64;
    RunResult {
        delay,
        null_tests,
        null_flags,
        p95_rmse_ms: (sq / n).sqrt(),
        p99_rmse_ms: (sq99 / n).sqrt(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        Scenario::from_toml(include_str!("../../scenarios/default.toml")).unwrap()
    }

    #[test]
    fn multinomial_counts_add_up_and_follow_the_probabilities() {
        let s = scenario();
        let svc = &s.services[0];
        let bounds = s.bounds_us();
        let p = bucket_probs(svc, 0.0, &bounds);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let c = multinomial(&mut rng, 1_000_000, &p);
        assert_eq!(c.iter().sum::<i64>(), 1_000_000);
        for (ci, pi) in c.iter().zip(&p) {
            let sd = (1e6 * pi * (1.0 - pi)).sqrt().max(1.0);
            assert!(
                ((*ci as f64) - 1e6 * pi).abs() < 6.0 * sd,
                "{ci} vs {}",
                1e6 * pi
            );
        }
        // The default service's p95 is near 120 ms.
        let p95 = true_quantile_ms(svc, 0.0, 0.95);
        assert!((p95 - 120.0).abs() < 1.0, "{p95}");
    }

    #[test]
    fn a_large_shift_is_detected_in_the_window_it_starts() {
        let s = scenario();
        let cell = Cell {
            anomaly: 0,
            magnitude: 60.0,
            epsilon: 1.0,
            events: 100_000,
        };
        for rep in 0..5 {
            let r = simulate(&s, &cell, run_seed(s.seed, 0, rep)).unwrap();
            let out = evaluate(&s, &s.detection, &cell, &r);
            assert_eq!(out.delay, Some(0), "{out:?}");
        }
    }
}
