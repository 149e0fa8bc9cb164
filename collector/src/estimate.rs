//! Estimates with 95% confidence intervals from noisy aggregates: bucket counts, totals and
//! latency quantiles. Pure post-processing of released values: it costs no privacy budget.
//!
//! Uncertainty here is the DP noise (known exactly from ε and the sensitivity) and, for
//! quantiles, the bucket width: a quantile is only known to lie in a bucket. The confidence
//! interval of a quantile therefore runs from the lower edge of the bucket the 2.5th percentile
//! of noisy replicates falls in to the upper edge of the bucket of the 97.5th. The noise of the
//! two aggregators' discrete Laplace draws is approximated by a normal distribution of the same
//! variance in the replicates.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use hush_protocol::dp::Z_95;

/// A value with its 95% confidence interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Estimate {
    /// The point estimate.
    pub value: f64,
    /// Lower end of the 95% confidence interval.
    pub ci_low: f64,
    /// Upper end; infinite when a quantile may lie in the open-ended last bucket (`null` in
    /// JSON, which has no infinity, and read back as infinite).
    #[serde(deserialize_with = "null_is_infinite")]
    #[schema(nullable)]
    pub ci_high: f64,
}

fn null_is_infinite<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

impl Estimate {
    /// Whether `x` lies in the interval.
    pub fn covers(&self, x: f64) -> bool {
        self.ci_low <= x && x <= self.ci_high
    }
}

/// A noisy count with its interval: ± z·σ.
pub fn count(value: i64, noise_sd: f64) -> Estimate {
    let v = value as f64;
    Estimate {
        value: v,
        ci_low: v - Z_95 * noise_sd,
        ci_high: v + Z_95 * noise_sd,
    }
}

/// The sum of noisy entries, each with independent noise of standard deviation `noise_sd`.
pub fn total(values: &[i64], noise_sd: f64) -> Estimate {
    let sum: i64 = values.iter().sum();
    count(sum, noise_sd * (values.len() as f64).sqrt())
}

/// The edges of bucket `i` in microseconds given the upper bounds of the histogram: bucket 0 is
/// `[0, b0)`, bucket i is `[b(i-1), b(i))`, the last one `[b(last), ∞)`.
pub fn bucket_edges_us(bounds_us: &[u64], i: usize) -> (f64, f64) {
    let lo = if i == 0 { 0.0 } else { bounds_us[i - 1] as f64 };
    let hi = bounds_us.get(i).map(|b| *b as f64).unwrap_or(f64::INFINITY);
    (lo, hi)
}

/// The bucket holding quantile `q` of `counts` (negative counts read as 0) and the fraction of
/// the way through it; None if the counts sum to nothing.
fn locate(counts: &[f64], q: f64) -> Option<(usize, f64)> {
    let total: f64 = counts.iter().map(|c| c.max(0.0)).sum();
    if total <= 0.0 {
        return None;
    }
    let target = q * total;
    let mut cum = 0.0;
    for (i, c) in counts.iter().enumerate() {
        let c = c.max(0.0);
        if c > 0.0 && cum + c >= target {
            return Some((i, ((target - cum) / c).clamp(0.0, 1.0)));
        }
        cum += c;
    }
    Some((counts.len() - 1, 1.0))
}

fn interpolate(bounds_us: &[u64], i: usize, frac: f64) -> f64 {
    let (lo, hi) = bucket_edges_us(bounds_us, i);
    if hi.is_finite() {
        lo + frac * (hi - lo)
    } else {
        lo
    }
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box–Muller.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The point estimate of quantile `q` in milliseconds from noisy counts, without an interval:
/// what [`quantile_ms`] reports as its value, for callers that need many (the harness).
pub fn quantile_point_ms(values: &[i64], bounds_us: &[u64], q: f64) -> Option<f64> {
    let counts: Vec<f64> = values.iter().map(|v| *v as f64).collect();
    let (b, frac) = locate(&counts, q)?;
    Some(interpolate(bounds_us, b, frac) / 1_000.0)
}

/// Quantile `q` (e.g. 0.95) of a noisy latency histogram, in milliseconds, with its 95%
/// confidence interval. `values` has one more entry than `bounds_us` (the open-ended last
/// bucket). `seed` makes the replicates reproducible. None if the histogram is empty after noise.
pub fn quantile_ms(
    values: &[i64],
    bounds_us: &[u64],
    q: f64,
    noise_sd: f64,
    seed: u64,
) -> Option<Estimate> {
    const REPLICATES: usize = 400;
    assert_eq!(values.len(), bounds_us.len() + 1, "one value per bucket");
    let counts: Vec<f64> = values.iter().map(|v| *v as f64).collect();
    let (b, frac) = locate(&counts, q)?;
    let value = interpolate(bounds_us, b, frac);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..REPLICATES)
        .filter_map(|_| {
            let noisy: Vec<f64> = counts
                .iter()
                .map(|c| c + noise_sd * normal(&mut rng))
                .collect();
            locate(&noisy, q).map(|(i, _)| i)
        })
        .collect();
    idx.sort_unstable();
    let (lo_b, hi_b) = if idx.is_empty() {
        (0, values.len() - 1)
    } else {
        let at = |p: f64| idx[((idx.len() - 1) as f64 * p).round() as usize];
        (at(0.025).min(b), at(0.975).max(b))
    };
    let ms = |us: f64| us / 1_000.0;
    Some(Estimate {
        value: ms(value),
        ci_low: ms(bucket_edges_us(bounds_us, lo_b).0),
        ci_high: ms(bucket_edges_us(bounds_us, hi_b).1),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_open_interval_survives_json() {
        let e = Estimate {
            value: 1.0,
            ci_low: 0.5,
            ci_high: f64::INFINITY,
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(text, r#"{"value":1.0,"ci_low":0.5,"ci_high":null}"#);
        assert_eq!(serde_json::from_str::<Estimate>(&text).unwrap(), e);
    }

    use super::*;

    #[test]
    fn quantile_of_an_exact_histogram_lies_in_its_bucket() {
        let bounds = [1_000, 2_000, 4_000, 8_000];
        // 100 events: 10 below 1 ms, 50 in [1, 2) ms, 30 in [2, 4) ms, 10 in [4, 8) ms.
        let values = [10, 50, 30, 10, 0];
        let p50 = quantile_ms(&values, &bounds, 0.5, 0.0, 1).unwrap();
        assert!((1.0..2.0).contains(&p50.value), "{p50:?}");
        assert_eq!((p50.ci_low, p50.ci_high), (1.0, 2.0));
        let p95 = quantile_ms(&values, &bounds, 0.95, 0.0, 1).unwrap();
        assert!((4.0..8.0).contains(&p95.value));
        assert!(quantile_ms(&[0, 0, 0, 0, 0], &bounds, 0.5, 0.0, 1).is_none());
    }

    #[test]
    fn noise_widens_the_quantile_interval_and_the_last_bucket_is_open() {
        let bounds = [1_000, 2_000, 4_000, 8_000];
        let values = [10, 50, 30, 10, 0];
        let p95 = quantile_ms(&values, &bounds, 0.95, 20.0, 7).unwrap();
        assert!(p95.ci_low <= 4.0 && p95.ci_high > 8.0, "{p95:?}");
        let tail = quantile_ms(&[0, 0, 0, 0, 100], &bounds, 0.5, 0.0, 1).unwrap();
        assert_eq!(tail.value, 8.0);
        assert!(tail.ci_high.is_infinite());
    }

    #[test]
    fn totals_and_counts_widen_with_noise() {
        let c = count(-3, 2.0);
        assert!(c.covers(0.0) && c.covers(-3.0));
        let t = total(&[1, 2, 3, 4], 1.0);
        assert_eq!(t.value, 10.0);
        assert!((t.ci_high - 10.0 - Z_95 * 2.0).abs() < 1e-9);
    }
}
