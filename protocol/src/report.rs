//! The report: what a client's measurement becomes before it enters the shuffler cascade.
//!
//! ```text
//! struct {
//!     TaskId task_id;                  // 32 bytes
//!     ReportId report_id;              // 16 bytes, also the Prio3 nonce
//!     Time time;                       // u64, rounded to the task's time precision
//!     opaque public_share<0..2^32-1>;
//!     HpkeCiphertext leader_share;     // sealed to the leader
//!     HpkeCiphertext helper_share;     // sealed to the helper
//! } Report;
//!
//! struct { u8 config_id; opaque enc<0..2^16-1>; opaque payload<0..2^32-1>; } HpkeCiphertext;
//! ```
//!
//! Each input share is sealed with the info string of [`Label::InputShare`] for its aggregator and
//! an AAD that binds the task id, report id, time and public share ([`input_share_aad`]): a share
//! cannot be moved to another report, task or time without failing to open.

use std::fmt;

use crate::codec::{Codec, DecodeError, Reader, Writer};
use crate::hpke::{self, HpkeCiphertext, HpkeConfig, HpkeError, Keyring, Label, Role};
use crate::ids::{ReportId, TaskId, Time};
use crate::vdaf::Sharded;

/// The AAD of an input share: `task_id || report_id || time || u32 len || public_share`.
pub fn input_share_aad(
    task_id: &TaskId,
    report_id: &ReportId,
    time: Time,
    public_share: &[u8],
) -> Vec<u8> {
    let mut aad = Vec::with_capacity(TaskId::LEN + ReportId::LEN + 8 + 4 + public_share.len());
    task_id.encode(&mut aad);
    report_id.encode(&mut aad);
    time.encode(&mut aad);
    aad.put_opaque_u32(public_share);
    aad
}

/// A client report.
#[derive(Clone, PartialEq, Eq)]
pub struct Report {
    task_id: TaskId,
    report_id: ReportId,
    time: Time,
    public_share: Vec<u8>,
    leader_share: HpkeCiphertext,
    helper_share: HpkeCiphertext,
}

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Report")
            .field("task_id", &self.task_id)
            .field("report_id", &self.report_id)
            .field("time", &self.time)
            .field("public_share_len", &self.public_share.len())
            .field("leader_share", &self.leader_share)
            .field("helper_share", &self.helper_share)
            .finish()
    }
}

impl Report {
    /// A report from its parts.
    pub fn new(
        task_id: TaskId,
        report_id: ReportId,
        time: Time,
        public_share: Vec<u8>,
        leader_share: HpkeCiphertext,
        helper_share: HpkeCiphertext,
    ) -> Self {
        Self {
            task_id,
            report_id,
            time,
            public_share,
            leader_share,
            helper_share,
        }
    }

    /// Seals the two input shares of `sharded` to the leader's and helper's configs.
    pub fn seal(
        task_id: TaskId,
        report_id: ReportId,
        time: Time,
        sharded: Sharded,
        leader: &HpkeConfig,
        helper: &HpkeConfig,
    ) -> Result<Self, HpkeError> {
        let aad = input_share_aad(&task_id, &report_id, time, &sharded.public_share);
        let leader_share = hpke::seal(
            leader,
            &Label::InputShare(Role::Leader),
            &sharded.leader_share,
            &aad,
        )?;
        let helper_share = hpke::seal(
            helper,
            &Label::InputShare(Role::Helper),
            &sharded.helper_share,
            &aad,
        )?;
        Ok(Self {
            task_id,
            report_id,
            time,
            public_share: sharded.public_share,
            leader_share,
            helper_share,
        })
    }

    /// The task.
    pub fn task_id(&self) -> &TaskId {
        &self.task_id
    }
    /// The report id (Prio3 nonce).
    pub fn report_id(&self) -> &ReportId {
        &self.report_id
    }
    /// The coarse report time.
    pub fn time(&self) -> Time {
        self.time
    }
    /// The encoded Prio3 public share.
    pub fn public_share(&self) -> &[u8] {
        &self.public_share
    }
    /// The input share sealed to `role`.
    pub fn encrypted_share(&self, role: Role) -> &HpkeCiphertext {
        match role {
            Role::Leader => &self.leader_share,
            Role::Helper => &self.helper_share,
        }
    }

    /// The AAD both input shares were sealed with.
    pub fn aad(&self) -> Vec<u8> {
        input_share_aad(
            &self.task_id,
            &self.report_id,
            self.time,
            &self.public_share,
        )
    }

    /// Opens the input share for `role` with the aggregator's keyring.
    pub fn open_share(&self, role: Role, keys: &Keyring) -> Result<Vec<u8>, HpkeError> {
        keys.open(
            &Label::InputShare(role),
            self.encrypted_share(role),
            &self.aad(),
        )
    }

    /// Splits the report into its parts.
    pub fn into_parts(
        self,
    ) -> (
        TaskId,
        ReportId,
        Time,
        Vec<u8>,
        HpkeCiphertext,
        HpkeCiphertext,
    ) {
        (
            self.task_id,
            self.report_id,
            self.time,
            self.public_share,
            self.leader_share,
            self.helper_share,
        )
    }
}

impl Codec for Report {
    const NAME: &'static str = "Report";
    fn encode(&self, out: &mut Vec<u8>) {
        self.task_id.encode(out);
        self.report_id.encode(out);
        self.time.encode(out);
        out.put_opaque_u32(&self.public_share);
        self.leader_share.encode(out);
        self.helper_share.encode(out);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            task_id: TaskId::decode(r)?,
            report_id: ReportId::decode(r)?,
            time: Time::decode(r)?,
            public_share: r.opaque_u32("public_share")?.to_vec(),
            leader_share: HpkeCiphertext::decode(r)?,
            helper_share: HpkeCiphertext::decode(r)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report::new(
            TaskId::from([1; 32]),
            ReportId::from([2; 16]),
            Time::from_secs(0x0102),
            vec![0xaa, 0xbb],
            HpkeCiphertext::new(7, vec![3; 2], vec![4; 3]).unwrap(),
            HpkeCiphertext::new(8, vec![5; 1], vec![]).unwrap(),
        )
    }

    /// The exact bytes of a report, field by field.
    #[test]
    fn encoding_is_pinned() {
        let expect = concat!(
            "0101010101010101010101010101010101010101010101010101010101010101", // task_id
            "02020202020202020202020202020202",                                 // report_id
            "0000000000000102",                                                 // time
            "00000002aabb",                                                     // public_share
            "07",
            "00020303",
            "00000003040404", // leader_share
            "08",
            "000105",
            "00000000", // helper_share
        );
        assert_eq!(hex::encode(sample().to_bytes()), expect);
        assert_eq!(
            Report::from_bytes(&hex::decode(expect).unwrap()).unwrap(),
            sample()
        );
    }

    #[test]
    fn truncated_and_extended_reports_are_refused() {
        let b = sample().to_bytes();
        for n in 0..b.len() {
            assert!(Report::from_bytes(&b[..n]).is_err(), "prefix {n}");
        }
        let mut ext = b.clone();
        ext.push(0);
        assert!(matches!(
            Report::from_bytes(&ext),
            Err(DecodeError::TrailingBytes { extra: 1, .. })
        ));
    }
}
