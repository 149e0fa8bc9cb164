//! Identifiers and coarse time.
//!
//! Ids are random byte strings shown as unpadded base64url (as in DAP). Report times are whole
//! seconds since the UNIX epoch rounded down to the task's time precision, so a report's time says
//! no more than which window it belongs to.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::{Codec, DecodeError, Reader};

/// A malformed id in text or protobuf form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {reason}")]
pub struct IdError {
    kind: &'static str,
    reason: String,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Length of the id in bytes.
            pub const LEN: usize = $len;

            /// A fresh id from the operating system's CSPRNG.
            pub fn random() -> Self {
                let mut b = [0u8; $len];
                rand::rng().fill_bytes(&mut b);
                Self(b)
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl From<[u8; $len]> for $name {
            fn from(b: [u8; $len]) -> Self {
                Self(b)
            }
        }

        impl TryFrom<&[u8]> for $name {
            type Error = IdError;
            fn try_from(b: &[u8]) -> Result<Self, IdError> {
                let arr: [u8; $len] = b.try_into().map_err(|_| IdError {
                    kind: stringify!($name),
                    reason: format!("expected {} bytes, got {}", $len, b.len()),
                })?;
                Ok(Self(arr))
            }
        }

        impl AsRef<[u8]> for $name {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let b = URL_SAFE_NO_PAD.decode(s).map_err(|e| IdError {
                    kind: stringify!($name),
                    reason: format!("not unpadded base64url: {e}"),
                })?;
                Self::try_from(b.as_slice())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl Codec for $name {
            const NAME: &'static str = stringify!($name);
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.0);
            }
            fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                Ok(Self(r.array(stringify!($name))?))
            }
        }
    };
}

id_type!(
    /// Identifies a task: one kind of measurement of one tenant, provisioned on both aggregators.
    TaskId,
    32
);
id_type!(
    /// Identifies a report; also the Prio3 nonce, so it must be random and never reused.
    ReportId,
    16
);
id_type!(
    /// Identifies one aggregation job between the leader and the helper.
    AggregationJobId,
    16
);
id_type!(
    /// Identifies one collection; retries with the same id spend no more privacy budget.
    CollectionId,
    16
);

/// Seconds since the UNIX epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Time(u64);

impl Time {
    /// The time `secs` seconds after the epoch.
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs)
    }

    /// Seconds since the epoch.
    pub const fn as_secs(self) -> u64 {
        self.0
    }

    /// Rounds down to a multiple of `precision` seconds (the start of the window holding `self`).
    /// A precision of zero leaves the time unchanged.
    pub fn round_down(self, precision: u64) -> Self {
        if precision == 0 {
            self
        } else {
            Self(self.0 - self.0 % precision)
        }
    }

    /// Whether the time is a multiple of `precision`.
    pub fn is_aligned(self, precision: u64) -> bool {
        precision != 0 && self.0.is_multiple_of(precision)
    }

    /// `self + secs`, saturating.
    pub fn add_secs(self, secs: u64) -> Self {
        Self(self.0.saturating_add(secs))
    }

    /// `self - secs`, saturating at the epoch.
    pub fn sub_secs(self, secs: u64) -> Self {
        Self(self.0.saturating_sub(secs))
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Codec for Time {
    const NAME: &'static str = "Time";
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self(r.u64("time")?))
    }
}

/// A half-open time interval `[start, start + duration)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Interval {
    start: Time,
    duration: u64,
}

/// Why an interval is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IntervalError {
    /// The interval is empty.
    #[error("interval is empty: give a duration of at least one time precision")]
    Empty,
    /// The end is past the largest representable time.
    #[error("interval end overflows: start {start} + duration {duration}")]
    Overflow {
        /// Start in seconds.
        start: u64,
        /// Duration in seconds.
        duration: u64,
    },
    /// The start or the duration is not a multiple of the precision.
    #[error(
        "interval [{start}, +{duration}) is not aligned to the task's time precision of {precision} s"
    )]
    NotAligned {
        /// Start in seconds.
        start: u64,
        /// Duration in seconds.
        duration: u64,
        /// The task's time precision.
        precision: u64,
    },
}

impl Interval {
    /// A new non-empty interval.
    pub fn new(start: Time, duration: u64) -> Result<Self, IntervalError> {
        if duration == 0 {
            return Err(IntervalError::Empty);
        }
        if start.0.checked_add(duration).is_none() {
            return Err(IntervalError::Overflow {
                start: start.0,
                duration,
            });
        }
        Ok(Self { start, duration })
    }

    /// Checks that start and duration are multiples of `precision`.
    pub fn check_aligned(&self, precision: u64) -> Result<(), IntervalError> {
        if self.start.is_aligned(precision)
            && precision != 0
            && self.duration.is_multiple_of(precision)
        {
            Ok(())
        } else {
            Err(IntervalError::NotAligned {
                start: self.start.0,
                duration: self.duration,
                precision,
            })
        }
    }

    /// First second of the interval.
    pub fn start(&self) -> Time {
        self.start
    }

    /// Length in seconds.
    pub fn duration(&self) -> u64 {
        self.duration
    }

    /// First second after the interval.
    pub fn end(&self) -> Time {
        Time(self.start.0 + self.duration)
    }

    /// Whether `t` lies in the interval.
    pub fn contains(&self, t: Time) -> bool {
        t >= self.start && t < self.end()
    }

    /// How many windows of `precision` seconds the interval spans (rounded up), without
    /// building them: check this against a limit before calling [`Interval::buckets`].
    pub fn bucket_count(&self, precision: u64) -> u64 {
        self.duration.div_ceil(precision.max(1))
    }

    /// The window starts (multiples of `precision`) the interval covers, in order.
    pub fn buckets(&self, precision: u64) -> impl Iterator<Item = Time> + use<> {
        let start = self.start.0;
        let end = self.end().0;
        let step = precision.max(1);
        (0..)
            .map_while(move |i: u64| i.checked_mul(step).and_then(|o| start.checked_add(o)))
            .take_while(move |t| *t < end)
            .map(Time)
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_intervals_count_their_windows_without_overflow() {
        let top = u64::MAX - u64::MAX % 60;
        let i = Interval::new(Time(0), top).unwrap();
        assert_eq!(i.bucket_count(60), top / 60);
        let last = Interval::new(Time(top - 60), 60).unwrap();
        assert_eq!(last.buckets(60).collect::<Vec<_>>(), vec![Time(top - 60)]);
        assert!(
            Interval::new(Time(top), 120).is_err(),
            "start + duration overflows"
        );
    }

    #[test]
    fn ids_round_trip_through_text_and_bytes() {
        let id = TaskId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 43);
        assert_eq!(s.parse::<TaskId>().unwrap(), id);
        assert_eq!(TaskId::from_bytes(&id.to_bytes()).unwrap(), id);
        assert!("abc".parse::<TaskId>().is_err());
        assert!(ReportId::try_from(&[0u8; 15][..]).is_err());
    }

    #[test]
    fn time_rounds_to_precision() {
        let t = Time::from_secs(3_725);
        assert_eq!(t.round_down(3_600), Time::from_secs(3_600));
        assert_eq!(t.round_down(0), t);
        assert!(Time::from_secs(7_200).is_aligned(3_600));
        assert!(!Time::from_secs(7_201).is_aligned(3_600));
    }

    #[test]
    fn intervals_check_alignment_and_list_buckets() {
        let i = Interval::new(Time::from_secs(600), 1_800).unwrap();
        i.check_aligned(600).unwrap();
        assert!(i.check_aligned(700).is_err());
        let b: Vec<_> = i.buckets(600).map(Time::as_secs).collect();
        assert_eq!(b, vec![600, 1_200, 1_800]);
        assert!(i.contains(Time::from_secs(2_399)));
        assert!(!i.contains(Time::from_secs(2_400)));
        assert_eq!(
            Interval::new(Time::from_secs(1), 0),
            Err(IntervalError::Empty)
        );
        assert!(Interval::new(Time::from_secs(u64::MAX), 2).is_err());
    }
}

/// An order-independent checksum of a set of report ids: the XOR of SHA-256 of each id. Both
/// aggregators keep one per batch, so a collection can prove they aggregated the same reports.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ReportIdChecksum([u8; 32]);

impl ReportIdChecksum {
    /// Adds (or, being an XOR, removes) one report id.
    pub fn update(&mut self, id: &ReportId) {
        let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
        for (a, b) in self.0.iter_mut().zip(d.as_ref()) {
            *a ^= b;
        }
    }

    /// Combines two checksums of disjoint sets.
    pub fn combine(&mut self, other: &ReportIdChecksum) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a ^= b;
        }
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for ReportIdChecksum {
    fn from(b: [u8; 32]) -> Self {
        Self(b)
    }
}

impl fmt::Debug for ReportIdChecksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReportIdChecksum({})", hex::encode(&self.0[..8]))
    }
}

#[cfg(test)]
mod checksum_tests {
    use super::*;

    #[test]
    fn checksum_is_order_independent() {
        let ids: Vec<ReportId> = (0..5).map(|_| ReportId::random()).collect();
        let mut a = ReportIdChecksum::default();
        ids.iter().for_each(|i| a.update(i));
        let mut b = ReportIdChecksum::default();
        ids.iter().rev().for_each(|i| b.update(i));
        assert_eq!(a, b);
        let mut c = ReportIdChecksum::default();
        ids[..2].iter().for_each(|i| c.update(i));
        let mut d = ReportIdChecksum::default();
        ids[2..].iter().for_each(|i| d.update(i));
        c.combine(&d);
        assert_eq!(a, c);
        b.update(&ids[0]);
        assert_ne!(a, b);
    }
}
