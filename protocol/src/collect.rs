//! Collection results: how an aggregator seals its noisy aggregate share to the collector, and
//! how the collector opens, combines and decodes the two shares.
//!
//! ```text
//! AAD of a sealed aggregate share:
//!     "hush/1 aggregate share" ‖ task_id[32] ‖ interval start u64 ‖ interval duration u64
//!     ‖ report_count u64 ‖ epsilon_micro u64
//! ```
//!
//! Binding the interval, count and ε means a share cannot be passed off as another collection's.

use crate::VERSION;
use crate::codec::Writer;
use crate::dp::{self, DecodeSignedError};
use crate::hpke::{self, HpkeCiphertext, HpkeConfig, HpkeError, Keyring, Label, Role};
use crate::ids::{Interval, TaskId};
use crate::proto::v1 as pb;
use crate::task::{Epsilon, TaskConfig};
use crate::vdaf::{AggregateShare, VdafError};

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
    report_count: u64,
    epsilon: Epsilon,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 32);
    out.extend_from_slice(VERSION.as_bytes());
    out.extend_from_slice(b" aggregate share");
    out.extend_from_slice(task.as_bytes());
    out.put_u64(interval.start().as_secs());
    out.put_u64(interval.duration());
    out.put_u64(report_count);
    out.put_u64(epsilon.micros());
    out
}

/// Seals `role`'s noisy aggregate share to the collector.
pub fn seal_aggregate_share(
    collector: &HpkeConfig,
    role: Role,
    task: &TaskId,
    interval: &Interval,
    report_count: u64,
    epsilon: Epsilon,
    share: &AggregateShare,
) -> Result<HpkeCiphertext, HpkeError> {
    hpke::seal(
        collector,
        &Label::AggregateShare(role),
        &share.to_bytes(),
        &aggregate_share_aad(task, interval, report_count, epsilon),
    )
}

/// A collected, decoded aggregate.
#[derive(Clone, Debug, PartialEq)]
pub struct Collected {
    /// The interval collected.
    pub interval: Interval,
    /// Reports in it.
    pub report_count: u64,
    /// The noisy aggregate, each entry decoded as a signed integer (noise can make a count
    /// negative).
    pub values: Vec<i64>,
    /// ε each aggregator spent.
    pub epsilon: Epsilon,
    /// The L1 sensitivity the noise was calibrated to.
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
    let aad = aggregate_share_aad(&task.id(), &interval, resp.report_count, epsilon);
    let mut sum = AggregateShare::zero(task.output_len());
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
        let share = AggregateShare::from_bytes(&pt, task.output_len())
            .map_err(|e| CollectError::Share(role, e))?;
        sum.merge(&share)
            .map_err(|e| CollectError::Share(role, e))?;
    }
    let values = dp::decode_signed(&sum)?;
    Ok(Collected {
        interval,
        report_count: resp.report_count,
        values,
        epsilon,
        sensitivity: resp.sensitivity,
        noise_stddev: dp::aggregate_noise_stddev(resp.sensitivity, epsilon),
        budget_left: Epsilon::from_micros(resp.budget_left_micro),
    })
}
