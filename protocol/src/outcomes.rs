//! Counts of accepted and refused items by reason, as ingest responses report them.

use crate::proto::v1::{ReasonCount, RejectReason};

/// Counts of outcomes by reason, for responses.
#[derive(Clone, Debug, Default)]
pub struct Outcomes {
    accepted: u64,
    rejected: std::collections::BTreeMap<i32, u64>,
}

impl Outcomes {
    /// One accepted.
    pub fn accept(&mut self) {
        self.accepted += 1;
    }
    /// One rejected for `r`.
    pub fn reject(&mut self, r: RejectReason) {
        *self.rejected.entry(r as i32).or_default() += 1;
    }
    /// Accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }
    /// Rejections as protobuf counts.
    pub fn reason_counts(&self) -> Vec<ReasonCount> {
        self.rejected
            .iter()
            .map(|(r, n)| ReasonCount {
                reason: *r,
                count: *n,
            })
            .collect()
    }
}
