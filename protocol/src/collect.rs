//! Collection results: how an aggregator seals its noisy aggregate share (and its noisy share of
//! the report count) to the collector, and how the collector opens, combines and decodes them.
//!
//! ```text
//! Plaintext of a sealed share:
//!     aggregate share (output_len × 16 bytes) ‖ [count share (16 bytes), if the task releases a count]
//! AAD:
//!     "hush/1 aggregate share" ‖ task_id[32] ‖ interval start u64 ‖ interval duration u64
//!     ‖ aggregate epsilon_micro u64 ‖ count epsilon_micro u64 (0: no count)
//! ```
//!
//! Binding the interval and both ε means a share cannot be passed off as another collection's.
//!
//! **The report count is never released exactly.** Both aggregators know a batch's exact count
//! (they must agree on it before releasing anything), so the collector gets it only as a
//! secret-shared, noisy value: the leader's count share is `count + mask + noise_L`, the helper's
//! `-mask + noise_H`, where `mask` is a pseudorandom field element derived from the task's VDAF
//! verification key (which only the two aggregators hold) and the collection. Each share alone is
//! uniformly random to the collector; their sum is the count plus both aggregators' discrete
//! Laplace noise at the task's count ε, whose sensitivity is the most reports one instance sends
//! per window.

use prio::field::{Field128, FieldElementWithInteger};

use crate::VERSION;
use crate::codec::Writer;
use crate::dp::{self, DecodeSignedError};
use crate::hpke::{self, HpkeCiphertext, HpkeConfig, HpkeError, Keyring, Label, Role};
use crate::ids::{Interval, TaskId};
use crate::proto::v1 as pb;
use crate::task::{Epsilon, TaskConfig};
use crate::vdaf::{AggregateShare, VdafError, VerifyKey};

/// Largest collection answer (two sealed aggregate shares of at most 1,025 entries, plus the
/// count): far below this.
pub const MAX_COLLECTION_BYTES: usize = 4 * 1024 * 1024;

/// Why a collection result could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectError {
    /// A field of the response is missing or malformed.
    #[error("malformed collection response: {0}")]
    Malformed(String),
    /// A share did not open with the collector's key.
    #[error(
        "the {0} aggregate share did not open: wrong collector key, or the response was altered"
    )]
    Open(Role, #[source] HpkeError),
    /// A share has the wrong length for the task.
    #[error("the {0} aggregate share does not fit the task: {1}")]
    Share(Role, VdafError),
    /// A noisy value is too large for an i64.
    #[error("entry {} of the aggregate is out of range", .0.index)]
    Range(#[from] DecodeSignedError),
}

/// The AAD binding a sealed aggregate share to its collection.
pub fn aggregate_share_aad(
    task: &TaskId,
    interval: &Interval,
    epsilon: Epsilon,
    count_epsilon: Option<Epsilon>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 32);
    out.extend_from_slice(VERSION.as_bytes());
    out.extend_from_slice(b" aggregate share");
    out.extend_from_slice(task.as_bytes());
    out.put_u64(interval.start().as_secs());
    out.put_u64(interval.duration());
    out.put_u64(epsilon.micros());
    out.put_u64(count_epsilon.map_or(0, Epsilon::micros));
    out
}

/// The mask that secret-shares a collection's report count between the two aggregators:
/// HMAC-SHA256 keyed with the task's VDAF verification key (held by the two aggregators only)
/// over the task, the collection id and the interval, read as a field element.
pub fn count_mask(
    verify_key: &VerifyKey,
    task: &TaskId,
    collection_id: &[u8; 16],
    interval: &Interval,
) -> Field128 {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, verify_key.as_bytes());
    let mut msg = Vec::with_capacity(96);
    msg.extend_from_slice(VERSION.as_bytes());
    msg.extend_from_slice(b" count mask");
    msg.extend_from_slice(task.as_bytes());
    msg.extend_from_slice(collection_id);
    msg.put_u64(interval.start().as_secs());
    msg.put_u64(interval.duration());
    let tag = ring::hmac::sign(&key, &msg);
    let mut b = [0u8; 16];
    b.copy_from_slice(&tag.as_ref()[..16]);
    // The modulus is within 2^-60 of 2^128: the reduction's bias is negligible.
    Field128::from(u128::from_be_bytes(b) % Field128::modulus())
}

/// One aggregator's noisy share of a report count: the leader's is `count + mask + noise`, the
/// helper's `noise - mask`, so only their sum means anything.
pub fn count_share(role: Role, report_count: u64, mask: Field128, noise: i64) -> Field128 {
    let noise = dp::encode_signed(noise);
    match role {
        Role::Leader => Field128::from(u128::from(report_count)) + mask + noise,
        Role::Helper => noise - mask,
    }
}

/// Seals `role`'s noisy aggregate share, and its noisy count share if the task releases a
/// count, to the task's collector.
pub fn seal_aggregate_share(
    collector: &HpkeConfig,
    role: Role,
    task: &TaskConfig,
    interval: &Interval,
    share: &AggregateShare,
    count: Option<Field128>,
) -> Result<HpkeCiphertext, HpkeError> {
    let mut share = share.clone();
    if let Some(c) = count {
        share.push(c);
    }
    hpke::seal(
        collector,
        &Label::AggregateShare(role),
        &share.to_bytes(),
        &aggregate_share_aad(
            &task.id(),
            interval,
            task.aggregate_epsilon(),
            task.count_epsilon(),
        ),
    )
}

/// A collected, decoded aggregate.
#[derive(Clone, Debug, PartialEq)]
pub struct Collected {
    /// The interval collected.
    pub interval: Interval,
    /// The noisy number of reports in it, if the task releases a count (can be negative).
    pub report_count: Option<i64>,
    /// Standard deviation of the total noise on the report count (0 without a count).
    pub count_noise_stddev: f64,
    /// The noisy aggregate, each entry decoded as a signed integer (noise can make a count
    /// negative).
    pub values: Vec<i64>,
    /// ε of each aggregator's noise on the aggregate.
    pub epsilon: Epsilon,
    /// The L1 sensitivity the aggregate's noise was calibrated to.
    pub sensitivity: u64,
    /// Standard deviation of the total noise on each entry (both aggregators' draws).
    pub noise_stddev: f64,
    /// What is left of the purpose's budget for the interval's buckets.
    pub budget_left: Epsilon,
}

/// Opens both shares of a collection response with the collector's keys, adds them, and decodes
/// the sum as signed integers: values above p/2 are negative numbers, never huge positive ones.
pub fn open_collection(
    task: &TaskConfig,
    collector: &Keyring,
    resp: &pb::CollectResponse,
) -> Result<Collected, CollectError> {
    let interval = Interval::try_from(
        resp.interval
            .as_ref()
            .ok_or_else(|| CollectError::Malformed("interval is missing".into()))?,
    )
    .map_err(|e| CollectError::Malformed(e.to_string()))?;
    let epsilon = Epsilon::from_micros(resp.epsilon_micro);
    let count_epsilon =
        (resp.count_epsilon_micro > 0).then(|| Epsilon::from_micros(resp.count_epsilon_micro));
    let aad = aggregate_share_aad(&task.id(), &interval, epsilon, count_epsilon);
    let len = task.output_len() + usize::from(count_epsilon.is_some());
    let mut sum = AggregateShare::zero(len);
    for (role, ct) in [
        (Role::Leader, &resp.leader_encrypted_share),
        (Role::Helper, &resp.helper_encrypted_share),
    ] {
        let ct = HpkeCiphertext::try_from(
            ct.as_ref()
                .ok_or_else(|| CollectError::Malformed(format!("the {role} share is missing")))?,
        )
        .map_err(|e| CollectError::Malformed(e.to_string()))?;
        let pt = collector
            .open(&Label::AggregateShare(role), &ct, &aad)
            .map_err(|e| CollectError::Open(role, e))?;
        let share =
            AggregateShare::from_bytes(&pt, len).map_err(|e| CollectError::Share(role, e))?;
        sum.merge(&share)
            .map_err(|e| CollectError::Share(role, e))?;
    }
    let mut values = dp::decode_signed(&sum)?;
    let report_count = if count_epsilon.is_some() {
        values.pop()
    } else {
        None
    };
    Ok(Collected {
        interval,
        report_count,
        count_noise_stddev: count_epsilon
            .map_or(0.0, |e| dp::count_noise_stddev(resp.count_sensitivity, e)),
        values,
        epsilon,
        sensitivity: resp.sensitivity,
        noise_stddev: dp::aggregate_noise_stddev(resp.sensitivity, epsilon),
        budget_left: Epsilon::from_micros(resp.budget_left_micro),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MeasurementKind;
    use crate::hpke::HpkeKeypair;
    use crate::task::tests::params;

    #[test]
    fn count_shares_look_random_alone_and_add_up_to_the_noisy_count() {
        let key = VerifyKey::random();
        let task = TaskId::random();
        let i = Interval::new(crate::Time::from_secs(600), 60).unwrap();
        let mask = count_mask(&key, &task, &[1; 16], &i);
        assert_ne!(mask, count_mask(&key, &task, &[2; 16], &i));
        assert_ne!(mask, count_mask(&VerifyKey::random(), &task, &[1; 16], &i));
        let l = count_share(Role::Leader, 1234, mask, 3);
        let h = count_share(Role::Helper, 1234, mask, -5);
        // Neither share alone is anywhere near the count.
        for s in [l, h] {
            let v = u128::from(s);
            assert!(v > 1 << 64 && v < Field128::modulus() - (1 << 64), "{v}");
        }
        assert_eq!(dp::decode_signed_field(&[l + h]).unwrap(), vec![1232]);
    }

    #[test]
    fn sealed_shares_open_with_the_count_and_refuse_another_epsilon() {
        let collector = HpkeKeypair::generate(1);
        let mut p = params(MeasurementKind::Counter);
        p.collector_hpke_config = collector.config().clone();
        let t = TaskConfig::new(p).unwrap();
        let i = Interval::new(crate::Time::from_secs(600), 60).unwrap();
        let key = VerifyKey::random();
        let mask = count_mask(&key, &t.id(), &[9; 16], &i);
        let mut ls = AggregateShare::zero(0);
        ls.push(Field128::from(7u128));
        let hs = AggregateShare::zero(1);
        let seal = |role, s: &AggregateShare, n| {
            let ct = seal_aggregate_share(
                collector.config(),
                role,
                &t,
                &i,
                s,
                Some(count_share(role, n, mask, 0)),
            )
            .unwrap();
            Some(pb::HpkeCiphertext::from(&ct))
        };
        let mut resp = pb::CollectResponse {
            interval: Some((&i).into()),
            leader_encrypted_share: seal(Role::Leader, &ls, 40),
            helper_encrypted_share: seal(Role::Helper, &hs, 40),
            epsilon_micro: t.aggregate_epsilon().micros(),
            sensitivity: t.sensitivity(),
            count_epsilon_micro: t.count_epsilon().unwrap().micros(),
            count_sensitivity: t.reports_per_instance(),
            budget_left_micro: 0,
        };
        let ring = Keyring::new(vec![collector]);
        let c = open_collection(&t, &ring, &resp).unwrap();
        assert_eq!(c.values, vec![7]);
        assert_eq!(c.report_count, Some(40));
        assert!(c.count_noise_stddev > 0.0);
        // A response that claims another ε does not open: the AAD binds both.
        resp.count_epsilon_micro += 1;
        assert!(matches!(
            open_collection(&t, &ring, &resp),
            Err(CollectError::Open(..))
        ));
    }
}
