//! The Prio3 wrapper: one plain enum over hush's task kinds, with byte-level inputs and outputs.
//!
//! Event histograms use Prio3Histogram; window histograms and counters use Prio3L1BoundSum (a
//! counter is a vector of length one), so every task kind aggregates in `Field128` and every
//! aggregate share has the same representation. Chunk lengths come from prio's
//! `optimal_chunk_length`. The VDAF context is the protocol version and the task id
//! (draft-irtf-cfrg-vdaf-18, section 5).

use std::fmt;

use prio::codec::{Encode, ParameterizedDecode};
use prio::dp::distributions::PureDpDiscreteLaplace;
use prio::dp::{DifferentialPrivacyStrategy, PureDpBudget, Rational};
use prio::field::{Field128, FieldElement};
use prio::vdaf::prio3::{
    Prio3Histogram, Prio3InputShare, Prio3L1BoundSum, Prio3PublicShare, Prio3VerifierMessage,
    Prio3VerifierShare, Prio3VerifyState, optimal_chunk_length,
};
use prio::vdaf::{Aggregator, AggregatorWithNoise, Client, VerifyTransition};
use zeroize::Zeroizing;

use crate::VERSION;
use crate::hpke::Role;
use crate::ids::{ReportId, TaskId};
use crate::task::{Epsilon, MeasurementKind, TaskConfig};

/// Length of the Prio3 verification key shared by the two aggregators.
pub const VERIFY_KEY_LEN: usize = 32;
/// Encoded length of one field element of an aggregate share.
pub const FIELD_LEN: usize = 16;

/// Errors of the VDAF layer. `Malformed` and `InvalidProof` are the two outcomes a report can
/// have at an aggregator; the others are caller errors.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VdafError {
    /// The measurement does not fit the task.
    #[error("measurement out of range: {0}")]
    InvalidMeasurement(String),
    /// A share or message did not decode for this task.
    #[error("malformed {0} for this task")]
    Malformed(&'static str),
    /// The proof did not verify: the report is invalid.
    #[error("Prio3 verification failed: the report's proof is invalid")]
    InvalidProof,
    /// The task's parameters do not make a Prio3 instance.
    #[error("cannot build Prio3 for this task: {0}")]
    Setup(String),
    /// An aggregate share has the wrong length.
    #[error("aggregate share has {got} entries, the task has {want}")]
    LengthMismatch {
        /// Entries found.
        got: usize,
        /// Entries expected.
        want: usize,
    },
}

/// One client measurement, before sharding.
#[derive(Clone, PartialEq, Eq)]
pub enum Measurement {
    /// Event histogram: the index of the event's bucket.
    Bucket(usize),
    /// Window histogram: the count of events per bucket; their sum is bounded.
    Counts(Vec<u64>),
    /// Counter: the count over the window.
    Count(u64),
}

/// A measurement is the one thing that must never reach a log.
impl fmt::Debug for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Measurement(<redacted>)")
    }
}

/// The Prio3 verification key, shared by the leader and helper of a task and nobody else.
#[derive(Clone)]
pub struct VerifyKey(Zeroizing<[u8; VERIFY_KEY_LEN]>);

impl VerifyKey {
    /// A fresh random key.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut k = Zeroizing::new([0u8; VERIFY_KEY_LEN]);
        rand::rng().fill_bytes(k.as_mut());
        Self(k)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; VERIFY_KEY_LEN] {
        &self.0
    }
}

impl TryFrom<&[u8]> for VerifyKey {
    type Error = VdafError;
    fn try_from(b: &[u8]) -> Result<Self, VdafError> {
        let arr: [u8; VERIFY_KEY_LEN] = b.try_into().map_err(|_| {
            VdafError::Setup(format!(
                "the verification key must be {VERIFY_KEY_LEN} bytes, got {}",
                b.len()
            ))
        })?;
        Ok(Self(Zeroizing::new(arr)))
    }
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerifyKey(<redacted>)")
    }
}

impl PartialEq for VerifyKey {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&*other.0).into()
    }
}

#[derive(Clone, Debug)]
enum Inner {
    Histogram(Prio3Histogram),
    L1BoundSum(Prio3L1BoundSum),
}

/// Runs `$body` with `$v` bound to the concrete Prio3 instance. Both instances share their
/// field, XOF and seed size, so the associated types in `$body` are the same in both arms.
macro_rules! with_prio3 {
    ($self:expr, $v:ident => $body:expr) => {
        match &$self.inner {
            Inner::Histogram($v) => $body,
            Inner::L1BoundSum($v) => $body,
        }
    };
}

/// The Prio3 instance of one task.
#[derive(Clone, Debug)]
pub struct Vdaf {
    inner: Inner,
    kind: MeasurementKind,
    ctx: Vec<u8>,
    output_len: usize,
    bound: u64,
}

/// The result of sharding: one public share and an input share per aggregator, encoded.
#[derive(Clone)]
pub struct Sharded {
    /// The public share (joint randomness parts).
    pub public_share: Vec<u8>,
    /// The leader's input share.
    pub leader_share: Vec<u8>,
    /// The helper's input share.
    pub helper_share: Vec<u8>,
}

impl fmt::Debug for Sharded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sharded")
            .field("public_share_len", &self.public_share.len())
            .field("leader_share_len", &self.leader_share.len())
            .field("helper_share_len", &self.helper_share.len())
            .finish()
    }
}

/// An aggregator's state between `verify_init` and `verify_finish` for one report.
#[derive(Clone)]
pub struct VerifyState(Prio3VerifyState<Field128, 32>);

impl fmt::Debug for VerifyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerifyState(<redacted>)")
    }
}

/// One report's verified contribution to an aggregate, as one aggregator's share.
#[derive(Clone)]
pub struct OutputShare(prio::vdaf::OutputShare<Field128>);

impl fmt::Debug for OutputShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OutputShare(<redacted>)")
    }
}

/// One aggregator's share of an aggregate: a vector of `Field128` elements.
#[derive(Clone, PartialEq, Eq)]
pub struct AggregateShare(Vec<Field128>);

impl fmt::Debug for AggregateShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AggregateShare(len={}, <redacted>)", self.0.len())
    }
}

impl AggregateShare {
    /// An all-zero share of `len` entries.
    pub fn zero(len: usize) -> Self {
        Self(vec![Field128::zero(); len])
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the share has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds one verified output share.
    pub fn accumulate(&mut self, out: &OutputShare) -> Result<(), VdafError> {
        if out.0.as_ref().len() != self.0.len() {
            return Err(VdafError::LengthMismatch {
                got: out.0.as_ref().len(),
                want: self.0.len(),
            });
        }
        for (a, b) in self.0.iter_mut().zip(out.0.as_ref()) {
            *a += *b;
        }
        Ok(())
    }

    /// Adds another aggregate share of the same length.
    pub fn merge(&mut self, other: &AggregateShare) -> Result<(), VdafError> {
        if other.0.len() != self.0.len() {
            return Err(VdafError::LengthMismatch {
                got: other.0.len(),
                want: self.0.len(),
            });
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += *b;
        }
        Ok(())
    }

    /// The field elements.
    pub fn as_field(&self) -> &[Field128] {
        &self.0
    }

    /// Appends one entry (e.g. a share of the report count carried beside the aggregate).
    pub fn push(&mut self, x: Field128) {
        self.0.push(x);
    }

    /// Removes and returns the last entry.
    pub fn pop(&mut self) -> Option<Field128> {
        self.0.pop()
    }

    /// Encoding: the elements back to back, 16 bytes each (prio's field encoding).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * FIELD_LEN);
        for x in &self.0 {
            // Unwrap safety: encoding a field element into a Vec cannot fail.
            x.encode(&mut out).unwrap();
        }
        out
    }

    /// Decodes a share that must have exactly `len` entries.
    pub fn from_bytes(bytes: &[u8], len: usize) -> Result<Self, VdafError> {
        if bytes.len() != len * FIELD_LEN {
            return Err(VdafError::LengthMismatch {
                got: bytes.len() / FIELD_LEN,
                want: len,
            });
        }
        let v = bytes
            .chunks_exact(FIELD_LEN)
            .map(|c| Field128::try_from(c).map_err(|_| VdafError::Malformed("aggregate share")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(v))
    }
}

impl Vdaf {
    /// The Prio3 instance for `task`.
    pub fn new(task: &TaskConfig) -> Result<Self, VdafError> {
        let len = task.output_len();
        let bound = task.contribution_bound();
        let inner = match task.kind() {
            MeasurementKind::EventHistogram => Inner::Histogram(
                Prio3Histogram::new_histogram(2, len, optimal_chunk_length(len))
                    .map_err(|e| VdafError::Setup(e.to_string()))?,
            ),
            MeasurementKind::WindowHistogram | MeasurementKind::Counter => {
                // The encoded measurement is `bits` bits per entry plus the claimed norm.
                let bits = (u64::BITS - bound.leading_zeros()) as usize;
                let chunk = optimal_chunk_length(bits * (len + 1));
                Inner::L1BoundSum(
                    Prio3L1BoundSum::new_l1_bound_sum(2, bound as u128, len, chunk)
                        .map_err(|e| VdafError::Setup(e.to_string()))?,
                )
            }
        };
        Ok(Self {
            inner,
            kind: task.kind(),
            ctx: Self::context(&task.id()),
            output_len: len,
            bound,
        })
    }

    /// The VDAF application context: version and task id.
    pub fn context(task_id: &TaskId) -> Vec<u8> {
        let mut ctx = Vec::with_capacity(VERSION.len() + 1 + TaskId::LEN);
        ctx.extend_from_slice(VERSION.as_bytes());
        ctx.push(b' ');
        ctx.extend_from_slice(task_id.as_bytes());
        ctx
    }

    /// Entries in the aggregate.
    pub fn output_len(&self) -> usize {
        self.output_len
    }

    /// An empty aggregate share.
    pub fn aggregate_init(&self) -> AggregateShare {
        AggregateShare::zero(self.output_len)
    }

    /// Splits `m` into a public share and two input shares, using `report_id` as the nonce.
    pub fn shard(&self, m: &Measurement, report_id: &ReportId) -> Result<Sharded, VdafError> {
        let nonce = report_id.as_bytes();
        let (public, inputs) = match (&self.inner, m) {
            (Inner::Histogram(v), Measurement::Bucket(b)) => {
                if *b >= self.output_len {
                    return Err(VdafError::InvalidMeasurement(format!(
                        "bucket {b} does not exist; the task has {} buckets",
                        self.output_len
                    )));
                }
                v.shard(&self.ctx, b, nonce)
            }
            (Inner::L1BoundSum(v), Measurement::Counts(c))
                if self.kind == MeasurementKind::WindowHistogram =>
            {
                if c.len() != self.output_len {
                    return Err(VdafError::InvalidMeasurement(format!(
                        "{} bucket counts given; the task has {} buckets",
                        c.len(),
                        self.output_len
                    )));
                }
                let total: u128 = c.iter().map(|x| *x as u128).sum();
                if total > self.bound as u128 {
                    return Err(VdafError::InvalidMeasurement(format!(
                        "{total} events in one window exceed the task's contribution bound of {}",
                        self.bound
                    )));
                }
                let m: Vec<u128> = c.iter().map(|x| *x as u128).collect();
                v.shard(&self.ctx, &m, nonce)
            }
            (Inner::L1BoundSum(v), Measurement::Count(n))
                if self.kind == MeasurementKind::Counter =>
            {
                if *n > self.bound {
                    return Err(VdafError::InvalidMeasurement(format!(
                        "count {n} exceeds the task's contribution bound of {}",
                        self.bound
                    )));
                }
                v.shard(&self.ctx, &vec![*n as u128], nonce)
            }
            _ => {
                return Err(VdafError::InvalidMeasurement(format!(
                    "this kind of measurement does not fit a {:?} task",
                    self.kind
                )));
            }
        }
        .map_err(|e| VdafError::InvalidMeasurement(e.to_string()))?;
        let [leader, helper]: [_; 2] = inputs
            .try_into()
            .map_err(|_| VdafError::Setup("Prio3 returned other than two input shares".into()))?;
        Ok(Sharded {
            public_share: encode(&public),
            leader_share: encode(&leader),
            helper_share: encode(&helper),
        })
    }

    /// Checks that `public_share` decodes for this task.
    pub fn check_public_share(&self, public_share: &[u8]) -> Result<(), VdafError> {
        with_prio3!(self, v => {
            Prio3PublicShare::<32>::get_decoded_with_param(v, public_share)
                .map(|_| ())
                .map_err(|_| VdafError::Malformed("public share"))
        })
    }

    /// Starts verifying one report as `role`: returns this aggregator's state and its encoded
    /// verifier share, which goes to the other aggregator.
    pub fn verify_init(
        &self,
        key: &VerifyKey,
        role: Role,
        report_id: &ReportId,
        public_share: &[u8],
        input_share: &[u8],
    ) -> Result<(VerifyState, Vec<u8>), VdafError> {
        let agg_id = role.agg_id();
        with_prio3!(self, v => {
            let public = Prio3PublicShare::<32>::get_decoded_with_param(v, public_share)
                .map_err(|_| VdafError::Malformed("public share"))?;
            let input = Prio3InputShare::<Field128, 32>::get_decoded_with_param(&(v, agg_id), input_share)
                .map_err(|_| VdafError::Malformed("input share"))?;
            let (state, share) = v
                .verify_init(key.as_bytes(), &self.ctx, agg_id, &(), report_id.as_bytes(), &public, &input)
                .map_err(|_| VdafError::InvalidProof)?;
            Ok((VerifyState(state), encode(&share)))
        })
    }

    /// Combines both aggregators' verifier shares into the verifier message (done by the helper).
    /// A share that does not decode or does not verify makes the report invalid.
    pub fn verifier_message(
        &self,
        state: &VerifyState,
        leader_share: &[u8],
        helper_share: &[u8],
    ) -> Result<Vec<u8>, VdafError> {
        let l = Prio3VerifierShare::<Field128, 32>::get_decoded_with_param(&state.0, leader_share)
            .map_err(|_| VdafError::Malformed("verifier share"))?;
        let h = Prio3VerifierShare::<Field128, 32>::get_decoded_with_param(&state.0, helper_share)
            .map_err(|_| VdafError::Malformed("verifier share"))?;
        with_prio3!(self, v => {
            let msg = v
                .verifier_shares_to_message(&self.ctx, &(), [l, h])
                .map_err(|_| VdafError::InvalidProof)?;
            Ok(encode(&msg))
        })
    }

    /// Finishes verification with the verifier message and returns the output share.
    pub fn verify_finish(
        &self,
        state: VerifyState,
        message: &[u8],
    ) -> Result<OutputShare, VdafError> {
        let msg = Prio3VerifierMessage::<32>::get_decoded_with_param(&state.0, message)
            .map_err(|_| VdafError::Malformed("verifier message"))?;
        with_prio3!(self, v => {
            match v.verify_next(&self.ctx, state.0, msg).map_err(|_| VdafError::InvalidProof)? {
                VerifyTransition::Finish(out) => Ok(OutputShare(out)),
                VerifyTransition::Continue(..) => Err(VdafError::InvalidProof),
            }
        })
    }

    /// Adds discrete Laplace noise to `share` at `epsilon` for one service instance's whole
    /// contribution to a window, through prio's `PureDpDiscreteLaplace` strategy.
    ///
    /// prio calibrates each type to one report: sensitivity 2 for a histogram, `2 × bound` for
    /// an L1-bounded sum. An event-histogram instance sends up to `contribution_bound` reports
    /// per window, so by group privacy prio is given `epsilon / contribution_bound`: the scale is
    /// then `2 × bound / ε`, the instance's sensitivity ([`TaskConfig::sensitivity`]) over ε. The
    /// per-window kinds send one report per instance and get `epsilon` as it is.
    pub fn add_noise(
        &self,
        epsilon: Epsilon,
        share: &mut AggregateShare,
        num_measurements: usize,
    ) -> Result<(), VdafError> {
        let reports_per_instance = match self.kind {
            MeasurementKind::EventHistogram => self.bound as u128,
            MeasurementKind::WindowHistogram | MeasurementKind::Counter => 1,
        };
        let budget = PureDpBudget::new(
            Rational::from_unsigned(epsilon.micros() as u128, 1_000_000 * reports_per_instance)
                .map_err(|e| VdafError::Setup(e.to_string()))?,
        )
        .map_err(|e| VdafError::Setup(e.to_string()))?;
        let strategy = PureDpDiscreteLaplace::from_budget(budget);
        with_prio3!(self, v => {
            let mut agg = prio::vdaf::AggregateShare::from(std::mem::take(&mut share.0));
            let r = v.add_noise_to_agg_share(&strategy, &(), &mut agg, num_measurements);
            share.0 = agg.as_ref().to_vec();
            r.map_err(|e| VdafError::Setup(e.to_string()))
        })
    }
}

impl OutputShare {
    /// The output share as an aggregate share of one report.
    pub fn into_aggregate(self) -> AggregateShare {
        let agg: prio::vdaf::AggregateShare<Field128> = self.0.into();
        AggregateShare(agg.as_ref().to_vec())
    }
}

fn encode<E: Encode>(e: &E) -> Vec<u8> {
    // Unwrap safety: prio's encoders only fail on lengths that do not fit their prefixes, which
    // Prio3 shares never reach.
    e.get_encoded().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::tests::params;

    fn run(
        v: &Vdaf,
        key: &VerifyKey,
        m: &Measurement,
    ) -> Result<(OutputShare, OutputShare), VdafError> {
        let id = ReportId::random();
        let s = v.shard(m, &id)?;
        let (ls, lv) = v.verify_init(key, Role::Leader, &id, &s.public_share, &s.leader_share)?;
        let (hs, hv) = v.verify_init(key, Role::Helper, &id, &s.public_share, &s.helper_share)?;
        let msg = v.verifier_message(&hs, &lv, &hv)?;
        Ok((v.verify_finish(ls, &msg)?, v.verify_finish(hs, &msg)?))
    }

    #[test]
    fn histogram_round_trip_and_aggregate() {
        let task = TaskConfig::new(params(MeasurementKind::EventHistogram)).unwrap();
        let v = Vdaf::new(&task).unwrap();
        let key = VerifyKey::random();
        let mut la = v.aggregate_init();
        let mut ha = v.aggregate_init();
        for b in [0usize, 3, 3, 31] {
            let (l, h) = run(&v, &key, &Measurement::Bucket(b)).unwrap();
            la.accumulate(&l).unwrap();
            ha.accumulate(&h).unwrap();
        }
        la.merge(&ha).unwrap();
        let counts = crate::dp::decode_signed(&la).unwrap();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[3], 2);
        assert_eq!(counts[31], 1);
        assert_eq!(counts.iter().sum::<i64>(), 4);
    }

    #[test]
    fn out_of_range_measurements_are_refused() {
        let task = TaskConfig::new(params(MeasurementKind::WindowHistogram)).unwrap();
        let v = Vdaf::new(&task).unwrap();
        let mut c = vec![0u64; 32];
        c[1] = 11;
        let e = v
            .shard(&Measurement::Counts(c), &ReportId::random())
            .unwrap_err();
        assert!(e.to_string().contains("contribution bound"), "{e}");
        assert!(
            v.shard(&Measurement::Counts(vec![1; 3]), &ReportId::random())
                .is_err()
        );
        assert!(
            v.shard(&Measurement::Bucket(0), &ReportId::random())
                .is_err()
        );
        let h =
            Vdaf::new(&TaskConfig::new(params(MeasurementKind::EventHistogram)).unwrap()).unwrap();
        assert!(
            h.shard(&Measurement::Bucket(32), &ReportId::random())
                .is_err()
        );
    }

    #[test]
    fn aggregate_share_bytes_round_trip() {
        let task = TaskConfig::new(params(MeasurementKind::Counter)).unwrap();
        let v = Vdaf::new(&task).unwrap();
        let (l, _) = run(&v, &VerifyKey::random(), &Measurement::Count(7)).unwrap();
        let a = l.into_aggregate();
        assert_eq!(AggregateShare::from_bytes(&a.to_bytes(), 1).unwrap(), a);
        assert!(AggregateShare::from_bytes(&a.to_bytes(), 2).is_err());
        assert!(AggregateShare::from_bytes(&[0xff; 16], 1).is_err());
    }

    /// The sample standard deviation of one aggregator's noise on `task` at ε = 1, over
    /// `draws` noisy zero shares, against the discrete Laplace spread at the instance's
    /// sensitivity.
    fn noise_spread(task: &TaskConfig, draws: usize) -> (f64, f64) {
        let v = Vdaf::new(task).unwrap();
        let eps = Epsilon::from_micros(1_000_000);
        let mut sq = 0.0;
        let mut n = 0.0;
        for _ in 0..draws {
            let mut share = v.aggregate_init();
            v.add_noise(eps, &mut share, 0).unwrap();
            for x in crate::dp::decode_signed(&share).unwrap() {
                sq += (x as f64) * (x as f64);
                n += 1.0;
            }
        }
        let want =
            crate::dp::discrete_laplace_variance(crate::dp::laplace_scale(task.sensitivity(), eps))
                .sqrt();
        ((sq / n).sqrt(), want)
    }

    #[test]
    fn event_histogram_noise_covers_every_event_of_an_instance() {
        // contribution_bound = 10 events per instance and window: the noise must be that of
        // sensitivity 20 (scale 20/ε, sd ≈ 28), not of one event (scale 2/ε, sd ≈ 2.9).
        let task = TaskConfig::new(params(MeasurementKind::EventHistogram)).unwrap();
        assert_eq!(task.contribution_bound(), 10);
        let (sd, want) = noise_spread(&task, 200);
        // 200 × 32 draws: the sample sd is within a few percent of the truth.
        assert!((sd / want - 1.0).abs() < 0.08, "sd {sd}, theory {want}");
        assert!(want > 25.0, "{want}");
    }

    #[test]
    fn per_window_kinds_keep_prios_calibration() {
        let task = TaskConfig::new(params(MeasurementKind::WindowHistogram)).unwrap();
        let (sd, want) = noise_spread(&task, 200);
        assert!((sd / want - 1.0).abs() < 0.08, "sd {sd}, theory {want}");
    }

    #[test]
    fn debug_never_shows_a_measurement() {
        assert_eq!(
            format!("{:?}", Measurement::Count(12345)),
            "Measurement(<redacted>)"
        );
    }
}
