//! Differential-privacy arithmetic the collector needs: signed decoding of noisy aggregates and
//! the noise's variance.
//!
//! Each aggregator adds discrete Laplace noise with scale `t = sensitivity / ε` to its own share
//! (prio's `PureDpDiscreteLaplace`), so the unsharded aggregate carries the sum of two independent
//! draws. Noise can push a small count below zero; in the field that is a value just under the
//! modulus p, which must be read as a negative number before any statistic is computed.

use prio::field::{Field128, FieldElement, FieldElementWithInteger};

use crate::task::Epsilon;
use crate::vdaf::AggregateShare;

/// A noisy aggregate entry whose magnitude cannot be a count: the shares do not belong together.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "aggregate entry {index} decodes to a magnitude above 2^63: the aggregate shares do not belong \
     to the same batch"
)]
pub struct DecodeSignedError {
    /// The entry.
    pub index: usize,
}

/// Reads each field element `x` as a signed integer: `x` if `x <= p/2`, else `x - p`.
pub fn decode_signed(agg: &AggregateShare) -> Result<Vec<i64>, DecodeSignedError> {
    decode_signed_field(agg.as_field())
}

/// [`decode_signed`] on raw field elements.
pub fn decode_signed_field(v: &[Field128]) -> Result<Vec<i64>, DecodeSignedError> {
    let p = Field128::modulus();
    let half = p / 2;
    v.iter()
        .enumerate()
        .map(|(index, x)| {
            let n: u128 = u128::from(*x);
            let signed: i128 = if n <= half {
                n as i128
            } else {
                -((p - n) as i128)
            };
            i64::try_from(signed).map_err(|_| DecodeSignedError { index })
        })
        .collect()
}

/// The field element holding the signed integer `v` (the inverse of [`decode_signed_field`]).
pub fn encode_signed(v: i64) -> Field128 {
    if v >= 0 {
        Field128::from(v as u128)
    } else {
        Field128::zero() - Field128::from(v.unsigned_abs() as u128)
    }
}

/// The discrete Laplace scale `t = sensitivity / ε` one aggregator uses.
pub fn laplace_scale(sensitivity: u64, epsilon: Epsilon) -> f64 {
    sensitivity as f64 / epsilon.as_f64()
}

/// The variance of one discrete Laplace draw with scale `t`: `2q / (1 - q)^2` with `q = e^{-1/t}`.
pub fn discrete_laplace_variance(scale: f64) -> f64 {
    let q = (-1.0 / scale).exp();
    2.0 * q / ((1.0 - q) * (1.0 - q))
}

/// The standard deviation of the noise on each entry of an unsharded aggregate: two independent
/// draws, one from each aggregator.
pub fn aggregate_noise_stddev(sensitivity: u64, epsilon: Epsilon) -> f64 {
    (2.0 * discrete_laplace_variance(laplace_scale(sensitivity, epsilon))).sqrt()
}

/// A seeded generator for [`AggregateNoise`] (prio samples with its own `rand` version; this
/// keeps that out of callers' types).
#[derive(Debug)]
pub struct NoiseRng(prio_rand::rngs::StdRng);

impl NoiseRng {
    /// A generator that gives the same draws for the same seed.
    pub fn seed_from_u64(seed: u64) -> Self {
        use prio_rand::SeedableRng;
        Self(prio_rand::rngs::StdRng::seed_from_u64(seed))
    }
}

/// The noise an unsharded aggregate entry carries: the sum of two independent discrete Laplace
/// draws (one per aggregator) from prio's `PureDpDiscreteLaplace` at `epsilon` and
/// `sensitivity`, the same strategy and parameters the aggregators use. The simulation harness
/// applies it to exact aggregates with a seeded generator. Built once, drawn many times.
pub struct AggregateNoise(prio::dp::distributions::DiscreteLaplace);

impl std::fmt::Debug for AggregateNoise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateNoise").finish_non_exhaustive()
    }
}

impl AggregateNoise {
    /// The mechanism at `epsilon` per aggregator for `sensitivity`.
    pub fn new(sensitivity: u64, epsilon: Epsilon) -> Result<Self, prio::dp::DpError> {
        use prio::dp::distributions::PureDpDiscreteLaplace;
        use prio::dp::{DifferentialPrivacyStrategy, PureDpBudget, Rational};
        let budget = PureDpBudget::new(Rational::from_unsigned(
            epsilon.micros() as u128,
            1_000_000,
        )?)?;
        Ok(Self(
            PureDpDiscreteLaplace::from_budget(budget)
                .create_distribution(Rational::from_unsigned(sensitivity as u128, 1)?)?,
        ))
    }

    /// One draw: both aggregators' noise on one entry.
    pub fn sample(&self, rng: &mut NoiseRng) -> Result<i64, prio::dp::DpError> {
        use prio_rand::distr::Distribution;
        let mut sum = 0i64;
        for _ in 0..2 {
            let x = self.0.sample(&mut rng.0);
            sum += i64::try_from(&x).map_err(|_| {
                prio::dp::DpError::InvalidParameter(format!("noise draw {x} does not fit in i64"))
            })?;
        }
        Ok(sum)
    }
}

/// One aggregator's noise on a single count (the report count of a batch, a late count): a
/// discrete Laplace draw from prio's `PureDpDiscreteLaplace` at `epsilon` and `sensitivity`,
/// sampled with a generator seeded from the OS.
pub fn count_noise(sensitivity: u64, epsilon: Epsilon) -> Result<i64, prio::dp::DpError> {
    use prio::dp::distributions::PureDpDiscreteLaplace;
    use prio::dp::{DifferentialPrivacyStrategy, PureDpBudget, Rational};
    use prio_rand::distr::Distribution;
    let budget = PureDpBudget::new(Rational::from_unsigned(
        epsilon.micros() as u128,
        1_000_000,
    )?)?;
    let dist = PureDpDiscreteLaplace::from_budget(budget)
        .create_distribution(Rational::from_unsigned(sensitivity as u128, 1)?)?;
    let mut rng: prio_rand::rngs::StdRng = prio_rand::make_rng();
    let x = dist.sample(&mut rng);
    i64::try_from(&x).map_err(|_| {
        prio::dp::DpError::InvalidParameter(format!("noise draw {x} does not fit in i64"))
    })
}

/// The standard deviation of a count released with noise from both aggregators (two draws).
pub fn count_noise_stddev(sensitivity: u64, epsilon: Epsilon) -> f64 {
    aggregate_noise_stddev(sensitivity, epsilon)
}

/// The two-sided 97.5% quantile of the standard normal, for 95% confidence intervals.
pub const Z_95: f64 = 1.959_963_984_540_054;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_values_decode_as_small_negatives() {
        let v = [
            encode_signed(-3),
            encode_signed(0),
            encode_signed(5),
            encode_signed(i64::MIN + 1),
        ];
        assert_eq!(
            decode_signed_field(&v).unwrap(),
            vec![-3, 0, 5, i64::MIN + 1]
        );
        // p - 1 is -1, never 3.4e38.
        let p_minus_1 = Field128::zero() - Field128::one();
        assert_eq!(decode_signed_field(&[p_minus_1]).unwrap(), vec![-1]);
        // A value in the middle of the field is garbage.
        let mid = Field128::from(Field128::modulus() / 2);
        assert_eq!(
            decode_signed_field(&[mid]),
            Err(DecodeSignedError { index: 0 })
        );
    }

    #[test]
    fn laplace_variance_matches_known_values() {
        // Small scale: almost no noise.
        assert!(discrete_laplace_variance(0.01) < 1e-40);
        // Large scale: approaches the continuous Laplace variance 2 t^2.
        let t = 100.0;
        let v = discrete_laplace_variance(t);
        assert!((v / (2.0 * t * t) - 1.0).abs() < 1e-3, "{v}");
        // ε = 1, sensitivity 2: t = 2.
        let sd = aggregate_noise_stddev(2, Epsilon::from_micros(1_000_000));
        let q: f64 = (-0.5f64).exp();
        let expect = (2.0 * 2.0 * q / (1.0 - q).powi(2)).sqrt();
        assert!((sd - expect).abs() < 1e-12);
    }

    #[test]
    fn count_noise_has_the_stated_spread() {
        let eps = Epsilon::from_micros(100_000);
        let draws: Vec<f64> = (0..4_000)
            .map(|_| count_noise(1, eps).unwrap() as f64)
            .collect();
        let sd = (draws.iter().map(|x| x * x).sum::<f64>() / draws.len() as f64).sqrt();
        let want = discrete_laplace_variance(laplace_scale(1, eps)).sqrt();
        // Unseeded: 12% fails by chance about once in 10^10 runs (8% did once in 10^5).
        assert!((sd / want - 1.0).abs() < 0.12, "sd {sd}, stated {want}");
    }

    #[test]
    fn sampled_noise_has_the_stated_spread() {
        let eps = Epsilon::from_micros(1_000_000);
        let mut rng = NoiseRng::seed_from_u64(3);
        let noise = AggregateNoise::new(40, eps).unwrap();
        let draws: Vec<f64> = (0..4_000)
            .map(|_| noise.sample(&mut rng).unwrap() as f64)
            .collect();
        let sd = (draws.iter().map(|x| x * x).sum::<f64>() / draws.len() as f64).sqrt();
        let want = aggregate_noise_stddev(40, eps);
        // The sample sd of 4,000 Laplace-like draws is within ~4% (1 se ≈ 1.9%) of the truth.
        assert!((sd / want - 1.0).abs() < 0.08, "sd {sd}, stated {want}");
    }
}
