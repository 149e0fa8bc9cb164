//! The client's report path: measurement → Prio3 shares → two HPKE seals → onion → fixed-size
//! packet.
//!
//! [`ClientTask`] holds what a client needs for one task: the task config, both aggregators'
//! HPKE configs and the route through the shufflers. Each step is also available on its own
//! ([`ClientTask::shard`], [`ClientTask::seal`], [`ClientTask::wrap`]) for tests and tools.

use std::time::Duration;

use hush_protocol::hpke::HpkeError;
use hush_protocol::onion::{self, OnionError, Route};
use hush_protocol::proto::v1 as pb;
use hush_protocol::vdaf::{Sharded, VdafError};
use hush_protocol::{
    Codec, HpkeConfig, Measurement, MeasurementKind, Report, ReportId, TaskConfig, Time, Vdaf,
};

/// Errors on the client's report path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A value is over the task's per-window contribution bound and the task does not clip.
    #[error(
        "value {value} is over the task's contribution bound of {bound} per window; \
         record less or provision the task with clip_contributions = true"
    )]
    OverBound {
        /// The value given.
        value: u64,
        /// The task's bound.
        bound: u64,
    },
    /// The measurement does not fit the task's kind or buckets.
    #[error(transparent)]
    Measurement(#[from] VdafError),
    /// The measurement kind does not match the task.
    #[error("the task {task} measures {kind:?}; {what} does not apply")]
    WrongKind {
        /// The task's name.
        task: String,
        /// The task's kind.
        kind: MeasurementKind,
        /// The call that was made.
        what: &'static str,
    },
    /// Sealing a share failed (e.g. an aggregator config with an unsupported suite).
    #[error("sealing an input share failed: {0}")]
    Seal(#[from] HpkeError),
    /// Wrapping the onion failed (e.g. the packet size is too small).
    #[error(transparent)]
    Onion(#[from] OnionError),
}

/// Everything a client needs to report measurements of one task.
#[derive(Clone, Debug)]
pub struct ClientTask {
    task: TaskConfig,
    vdaf: Vdaf,
    leader: HpkeConfig,
    helper: HpkeConfig,
    route: Route,
}

impl ClientTask {
    /// Builds the task's report path and checks that a report fits the task's packet size on this
    /// route.
    pub fn new(
        task: TaskConfig,
        leader: HpkeConfig,
        helper: HpkeConfig,
        route: Route,
    ) -> Result<Self, ClientError> {
        leader.validate()?;
        helper.validate()?;
        let vdaf = Vdaf::new(&task)?;
        let me = Self {
            task,
            vdaf,
            leader,
            helper,
            route,
        };
        // Reports of a task all have the same size; make one to learn it.
        let probe = match me.task.kind() {
            MeasurementKind::EventHistogram => Measurement::Bucket(0),
            MeasurementKind::WindowHistogram => Measurement::Counts(vec![0; me.task.output_len()]),
            MeasurementKind::Counter => Measurement::Count(0),
        };
        let report = me.seal(me.shard(&probe, ReportId::random())?, Time::from_secs(0))?;
        let need = report.to_bytes().len() + me.route.overhead();
        if need > me.task.packet_size() {
            return Err(OnionError::TooLarge {
                need,
                hops: me.route.hops().len(),
                packet_size: me.task.packet_size(),
            }
            .into());
        }
        Ok(me)
    }

    /// The task.
    pub fn task(&self) -> &TaskConfig {
        &self.task
    }

    /// The route.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// The Prio3 instance.
    pub fn vdaf(&self) -> &Vdaf {
        &self.vdaf
    }

    /// The measurement for one event with this latency (event histograms).
    pub fn latency_event(&self, latency: Duration) -> Result<Measurement, ClientError> {
        self.expect_kind(MeasurementKind::EventHistogram, "latency_event")?;
        Ok(Measurement::Bucket(
            self.task.bucket_of(duration_us(latency)),
        ))
    }

    /// The bucket counts of one window of latencies (window histograms). More events than the
    /// contribution bound are an error, or are scaled down proportionally if the task clips.
    pub fn latency_window(&self, latencies: &[Duration]) -> Result<Measurement, ClientError> {
        self.expect_kind(MeasurementKind::WindowHistogram, "latency_window")?;
        let mut counts = vec![0u64; self.task.output_len()];
        for l in latencies {
            counts[self.task.bucket_of(duration_us(*l))] += 1;
        }
        self.window_counts(counts)
    }

    /// A window's bucket counts as a measurement, applying the task's contribution bound.
    pub fn window_counts(&self, mut counts: Vec<u64>) -> Result<Measurement, ClientError> {
        self.expect_kind(MeasurementKind::WindowHistogram, "window_counts")?;
        let bound = self.task.contribution_bound();
        let total: u64 = counts.iter().sum();
        if total > bound {
            if !self.task.clip_contributions() {
                return Err(ClientError::OverBound {
                    value: total,
                    bound,
                });
            }
            counts = clip_counts(&counts, bound);
        }
        Ok(Measurement::Counts(counts))
    }

    /// A window's count as a measurement (counters), applying the task's contribution bound.
    pub fn count(&self, n: u64) -> Result<Measurement, ClientError> {
        self.expect_kind(MeasurementKind::Counter, "count")?;
        let bound = self.task.contribution_bound();
        if n > bound {
            if !self.task.clip_contributions() {
                return Err(ClientError::OverBound { value: n, bound });
            }
            return Ok(Measurement::Count(bound));
        }
        Ok(Measurement::Count(n))
    }

    fn expect_kind(&self, kind: MeasurementKind, what: &'static str) -> Result<(), ClientError> {
        if self.task.kind() == kind {
            Ok(())
        } else {
            Err(ClientError::WrongKind {
                task: self.task.name().to_owned(),
                kind: self.task.kind(),
                what,
            })
        }
    }

    /// Step 1: shards `m` with `report_id` as the nonce.
    pub fn shard(&self, m: &Measurement, report_id: ReportId) -> Result<Prepared, ClientError> {
        let sharded = self.vdaf.shard(m, &report_id)?;
        Ok(Prepared { report_id, sharded })
    }

    /// Step 2: seals the input shares to the two aggregators; `now` is rounded to the task's
    /// time precision.
    pub fn seal(&self, prepared: Prepared, now: Time) -> Result<Report, ClientError> {
        let time = self.task.window_of(now);
        Ok(Report::seal(
            self.task.id(),
            prepared.report_id,
            time,
            prepared.sharded,
            &self.leader,
            &self.helper,
        )?)
    }

    /// Step 3: wraps a report in one onion layer per hop and pads it to the packet size.
    pub fn wrap(&self, report: &Report) -> Result<pb::Packet, ClientError> {
        let data = onion::wrap(
            &self.task.id(),
            self.task.packet_size(),
            &self.route,
            &report.to_bytes(),
        )?;
        Ok(pb::Packet {
            task_id: self.task.id().as_bytes().to_vec().into(),
            data: data.into(),
        })
    }

    /// The whole path: measurement → packet for the first shuffler.
    pub fn packet(&self, m: &Measurement, now: Time) -> Result<pb::Packet, ClientError> {
        let prepared = self.shard(m, ReportId::random())?;
        let report = self.seal(prepared, now)?;
        self.wrap(&report)
    }
}

/// A sharded measurement, before sealing. Its fields are public so tests can play a malicious
/// client that tampers with a share.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The report id, which is also the Prio3 nonce.
    pub report_id: ReportId,
    /// The encoded public share and input shares.
    pub sharded: Sharded,
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Scales `counts` down so they sum to at most `bound`, keeping their proportions (largest
/// remainder rounding).
fn clip_counts(counts: &[u64], bound: u64) -> Vec<u64> {
    let total: u128 = counts.iter().map(|c| *c as u128).sum();
    if total <= bound as u128 {
        return counts.to_vec();
    }
    let mut out: Vec<u64> = Vec::with_capacity(counts.len());
    let mut rem: Vec<(u128, usize)> = Vec::with_capacity(counts.len());
    for (i, c) in counts.iter().enumerate() {
        let scaled = *c as u128 * bound as u128;
        out.push((scaled / total) as u64);
        rem.push((scaled % total, i));
    }
    let mut left = bound - out.iter().sum::<u64>();
    rem.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in rem {
        if left == 0 {
            break;
        }
        out[i] += 1;
        left -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_keeps_proportions_and_the_bound() {
        assert_eq!(clip_counts(&[10, 10], 5), vec![3, 2]);
        assert_eq!(clip_counts(&[1, 0, 3], 10), vec![1, 0, 3]);
        let c = clip_counts(&[7, 2, 1, 90], 10);
        assert_eq!(c.iter().sum::<u64>(), 10);
        assert_eq!(c[3], 9);
    }
}
