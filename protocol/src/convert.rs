//! Conversions between the generated protobuf types and the checked domain types.
//!
//! Protobuf decoding accepts any field values; these `TryFrom` impls are where values are checked,
//! so code past the gRPC boundary only sees domain types. A failure maps to `INVALID_ARGUMENT`.

use crate::codec::DecodeError;
use crate::hpke::{HpkeCiphertext, HpkeConfig};
use crate::ids::{Interval, Time};
use crate::proto::v1 as pb;
use crate::task::{Epsilon, MeasurementKind, TaskConfig, TaskParams};

/// A protobuf message that does not convert into its domain type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {message}.{field}: {reason}")]
pub struct ProtoError {
    /// The message.
    pub message: &'static str,
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl ProtoError {
    /// A new error.
    pub fn new(message: &'static str, field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            message,
            field,
            reason: reason.into(),
        }
    }
}

impl From<ProtoError> for tonic::Status {
    fn from(e: ProtoError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn u16_field(message: &'static str, field: &'static str, v: u32) -> Result<u16, ProtoError> {
    u16::try_from(v)
        .map_err(|_| ProtoError::new(message, field, format!("{v} does not fit 16 bits")))
}

impl TryFrom<&pb::HpkeConfig> for HpkeConfig {
    type Error = ProtoError;
    fn try_from(p: &pb::HpkeConfig) -> Result<Self, ProtoError> {
        const M: &str = "HpkeConfig";
        let id = u8::try_from(p.id)
            .map_err(|_| ProtoError::new(M, "id", format!("{} does not fit 8 bits", p.id)))?;
        HpkeConfig::new(
            id,
            u16_field(M, "kem_id", p.kem_id)?.into(),
            u16_field(M, "kdf_id", p.kdf_id)?.into(),
            u16_field(M, "aead_id", p.aead_id)?.into(),
            p.public_key.to_vec(),
        )
        .map_err(|e| ProtoError::new(M, "public_key", e.to_string()))
    }
}

impl From<&HpkeConfig> for pb::HpkeConfig {
    fn from(c: &HpkeConfig) -> Self {
        pb::HpkeConfig {
            id: c.id().into(),
            kem_id: u16::from(c.kem()).into(),
            kdf_id: u16::from(c.kdf()).into(),
            aead_id: u16::from(c.aead()).into(),
            public_key: c.public_key().to_vec().into(),
        }
    }
}

impl TryFrom<&pb::HpkeConfigList> for Vec<HpkeConfig> {
    type Error = ProtoError;
    fn try_from(p: &pb::HpkeConfigList) -> Result<Self, ProtoError> {
        if p.configs.is_empty() {
            return Err(ProtoError::new("HpkeConfigList", "configs", "empty"));
        }
        p.configs.iter().map(HpkeConfig::try_from).collect()
    }
}

impl TryFrom<&pb::HpkeCiphertext> for HpkeCiphertext {
    type Error = ProtoError;
    fn try_from(p: &pb::HpkeCiphertext) -> Result<Self, ProtoError> {
        const M: &str = "HpkeCiphertext";
        let id = u8::try_from(p.config_id).map_err(|_| {
            ProtoError::new(
                M,
                "config_id",
                format!("{} does not fit 8 bits", p.config_id),
            )
        })?;
        HpkeCiphertext::new(id, p.encapsulated_key.to_vec(), p.payload.to_vec())
            .map_err(|e: DecodeError| ProtoError::new(M, "payload", e.to_string()))
    }
}

impl From<&HpkeCiphertext> for pb::HpkeCiphertext {
    fn from(c: &HpkeCiphertext) -> Self {
        pb::HpkeCiphertext {
            config_id: c.config_id().into(),
            encapsulated_key: c.encapsulated_key().to_vec().into(),
            payload: c.payload().to_vec().into(),
        }
    }
}

impl TryFrom<&pb::Interval> for Interval {
    type Error = ProtoError;
    fn try_from(p: &pb::Interval) -> Result<Self, ProtoError> {
        Interval::new(Time::from_secs(p.start), p.duration)
            .map_err(|e| ProtoError::new("Interval", "duration", e.to_string()))
    }
}

impl From<&Interval> for pb::Interval {
    fn from(i: &Interval) -> Self {
        pb::Interval {
            start: i.start().as_secs(),
            duration: i.duration(),
        }
    }
}

/// Converts an optional message field that must be present.
pub fn required<'a, T>(
    message: &'static str,
    field: &'static str,
    v: Option<&'a T>,
) -> Result<&'a T, ProtoError> {
    v.ok_or_else(|| ProtoError::new(message, field, "missing"))
}

impl TryFrom<&pb::TaskConfig> for TaskConfig {
    type Error = ProtoError;
    fn try_from(p: &pb::TaskConfig) -> Result<Self, ProtoError> {
        const M: &str = "TaskConfig";
        let kind = match pb::MeasurementKind::try_from(p.kind) {
            Ok(pb::MeasurementKind::EventHistogram) => MeasurementKind::EventHistogram,
            Ok(pb::MeasurementKind::WindowHistogram) => MeasurementKind::WindowHistogram,
            Ok(pb::MeasurementKind::Counter) => MeasurementKind::Counter,
            _ => {
                return Err(ProtoError::new(
                    M,
                    "kind",
                    format!("unknown measurement kind {}", p.kind),
                ));
            }
        };
        let params = TaskParams {
            task_id: p
                .task_id
                .as_ref()
                .try_into()
                .map_err(|e: crate::ids::IdError| ProtoError::new(M, "task_id", e.to_string()))?,
            tenant: p.tenant.clone(),
            name: p.name.clone(),
            kind,
            bucket_bounds_us: p.bucket_bounds_us.clone(),
            contribution_bound: p.contribution_bound,
            clip_contributions: p.clip_contributions,
            time_precision_s: p.time_precision_s,
            min_batch_size: p.min_batch_size,
            epsilon_per_collection: Epsilon::from_micros(p.epsilon_per_collection_micro),
            epsilon_budget: Epsilon::from_micros(p.epsilon_budget_micro),
            report_expiry_s: p.report_expiry_s,
            packet_size: p.packet_size,
            collector_hpke_config: HpkeConfig::try_from(required(
                M,
                "collector_hpke_config",
                p.collector_hpke_config.as_ref(),
            )?)?,
            alert_budget_percent: u8::try_from(p.alert_budget_percent)
                .map_err(|_| ProtoError::new(M, "alert_budget_percent", "must be at most 100"))?,
            retention_s: p.retention_s,
            count_epsilon_percent: u8::try_from(p.count_epsilon_percent)
                .map_err(|_| ProtoError::new(M, "count_epsilon_percent", "must be at most 50"))?,
            max_collections_per_batch: p.max_collections_per_batch,
        };
        TaskConfig::new(params).map_err(|e| ProtoError::new(M, "task", e.to_string()))
    }
}

impl From<&TaskConfig> for pb::TaskConfig {
    fn from(t: &TaskConfig) -> Self {
        let p = t.params();
        pb::TaskConfig {
            task_id: p.task_id.as_bytes().to_vec().into(),
            tenant: p.tenant.clone(),
            name: p.name.clone(),
            kind: match p.kind {
                MeasurementKind::EventHistogram => pb::MeasurementKind::EventHistogram,
                MeasurementKind::WindowHistogram => pb::MeasurementKind::WindowHistogram,
                MeasurementKind::Counter => pb::MeasurementKind::Counter,
            } as i32,
            bucket_bounds_us: p.bucket_bounds_us.clone(),
            contribution_bound: p.contribution_bound,
            clip_contributions: p.clip_contributions,
            time_precision_s: p.time_precision_s,
            min_batch_size: p.min_batch_size,
            epsilon_per_collection_micro: p.epsilon_per_collection.micros(),
            epsilon_budget_micro: p.epsilon_budget.micros(),
            report_expiry_s: p.report_expiry_s,
            packet_size: p.packet_size,
            collector_hpke_config: Some((&p.collector_hpke_config).into()),
            alert_budget_percent: p.alert_budget_percent.into(),
            retention_s: p.retention_s,
            count_epsilon_percent: p.count_epsilon_percent.into(),
            max_collections_per_batch: p.max_collections_per_batch,
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::hpke::HpkeKeypair;
    use crate::task::tests::params;

    fn wire<M: Message + Default>(m: &M) -> M {
        M::decode(m.encode_to_vec().as_slice()).unwrap()
    }

    #[test]
    fn task_config_round_trips_through_protobuf() {
        for kind in [
            MeasurementKind::EventHistogram,
            MeasurementKind::WindowHistogram,
            MeasurementKind::Counter,
        ] {
            let t = TaskConfig::new(params(kind)).unwrap();
            let p = wire(&pb::TaskConfig::from(&t));
            assert_eq!(TaskConfig::try_from(&p).unwrap(), t);
        }
    }

    #[test]
    fn bad_protobuf_values_are_named() {
        let t = TaskConfig::new(params(MeasurementKind::Counter)).unwrap();
        let mut p = pb::TaskConfig::from(&t);
        p.task_id = vec![1, 2, 3].into();
        assert!(
            TaskConfig::try_from(&p)
                .unwrap_err()
                .to_string()
                .contains("task_id")
        );
        let mut p = pb::TaskConfig::from(&t);
        p.kind = 99;
        assert!(
            TaskConfig::try_from(&p)
                .unwrap_err()
                .to_string()
                .contains("kind")
        );
        let mut p = pb::TaskConfig::from(&t);
        p.collector_hpke_config = None;
        assert!(
            TaskConfig::try_from(&p)
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
        let c = pb::HpkeConfig {
            id: 300,
            ..pb::HpkeConfig::from(HpkeKeypair::generate(1).config())
        };
        assert!(HpkeConfig::try_from(&c).is_err());
    }

    #[test]
    fn hpke_and_interval_round_trip() {
        let kp = HpkeKeypair::generate(4);
        let c = wire(&pb::HpkeConfig::from(kp.config()));
        assert_eq!(&HpkeConfig::try_from(&c).unwrap(), kp.config());
        let ct = HpkeCiphertext::new(4, vec![1; 32], vec![2; 40]).unwrap();
        let p = wire(&pb::HpkeCiphertext::from(&ct));
        assert_eq!(HpkeCiphertext::try_from(&p).unwrap(), ct);
        let i = Interval::new(Time::from_secs(60), 120).unwrap();
        assert_eq!(
            Interval::try_from(&wire(&pb::Interval::from(&i))).unwrap(),
            i
        );
        assert!(
            Interval::try_from(&pb::Interval {
                start: 5,
                duration: 0
            })
            .is_err()
        );
    }
}
