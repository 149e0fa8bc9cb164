//! The decoders hush exposes to untrusted bytes, as entry points the cargo-fuzz targets in
//! `fuzz/` and the regression test over `tests/fuzz-regressions/` share. Each takes arbitrary
//! bytes and must return without panicking; where an encoding is canonical, whatever decodes must
//! encode back to the same bytes (a mismatch panics: it is a bug).

use std::sync::OnceLock;

use hush_protocol::codec::Codec;
use hush_protocol::keys::KeySet;
use hush_protocol::proto::v1 as pb;
use hush_protocol::{
    HpkeCiphertext, HpkeConfig, HpkeKeypair, Interval, Keyring, Label, Report, TaskConfig, TaskId,
    TaskParams, onion,
};
use prost::Message;

/// A decoder entry point.
pub type Decoder = fn(&[u8]);

/// The decoders, by the name of their fuzz target and regression directory.
pub const TARGETS: [(&str, Decoder); 6] = [
    ("report", report),
    ("onion_packet", onion_packet),
    ("onion_layer", onion_layer),
    ("hpke", hpke),
    ("proto", proto),
    ("config", config),
];

fn canonical<T: Codec>(data: &[u8]) {
    if let Ok(v) = T::from_bytes(data) {
        assert_eq!(
            v.to_bytes(),
            data,
            "{} decodes but re-encodes differently",
            T::NAME
        );
    }
}

/// A report as the leader reads it from `SubmitReports`.
pub fn report(data: &[u8]) {
    canonical::<Report>(data);
}

/// A packet's header, as a shuffler reads it before opening: at the packet's own size and at a
/// task's fixed size.
pub fn onion_packet(data: &[u8]) {
    let _ = onion::packet_header(data, data.len());
    let _ = onion::packet_header(data, 4_096);
    let keys = Keyring::new(vec![layer_key().clone()]);
    let _ = onion::peel(&TaskId::from([7; 32]), data.len(), &keys, data);
}

fn layer_key() -> &'static HpkeKeypair {
    static KEY: OnceLock<HpkeKeypair> = OnceLock::new();
    KEY.get_or_init(|| HpkeKeypair::generate(1))
}

/// The inside of an onion layer after decryption: `data` is sealed as a layer to a hop's key,
/// and the hop peels it.
pub fn onion_layer(data: &[u8]) {
    let task = TaskId::from([7; 32]);
    let key = layer_key();
    let ct = hush_protocol::hpke::seal(key.config(), &Label::OnionLayer, data, task.as_bytes())
        .expect("sealing to our own key");
    let mut packet = vec![ct.config_id()];
    packet.extend_from_slice(ct.encapsulated_key());
    packet.extend_from_slice(&(ct.payload().len() as u32).to_be_bytes());
    packet.extend_from_slice(ct.payload());
    let size = packet.len();
    let _ = onion::peel(&task, size, &Keyring::new(vec![key.clone()]), &packet);
}

/// HPKE configs, ciphertexts, key pairs and key sets (as stored and published).
pub fn hpke(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => canonical::<HpkeConfig>(rest),
        1 => canonical::<HpkeCiphertext>(rest),
        2 => {
            let _ = HpkeKeypair::from_bytes(rest);
        }
        _ => {
            let _ = KeySet::from_bytes(rest);
        }
    }
}

/// Every protobuf → domain conversion: the message is decoded with prost, then converted.
pub fn proto(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => {
            if let Ok(m) = pb::HpkeConfig::decode(rest) {
                let _ = HpkeConfig::try_from(&m);
            }
        }
        1 => {
            if let Ok(m) = pb::HpkeConfigList::decode(rest) {
                let _ = Vec::<HpkeConfig>::try_from(&m);
            }
        }
        2 => {
            if let Ok(m) = pb::HpkeCiphertext::decode(rest) {
                let _ = HpkeCiphertext::try_from(&m);
            }
        }
        3 => {
            if let Ok(m) = pb::Interval::decode(rest) {
                let _ = Interval::try_from(&m);
            }
        }
        4 => {
            if let Ok(m) = pb::TaskConfig::decode(rest)
                && let Ok(t) = TaskConfig::try_from(&m)
            {
                // A task that converts converts back to the same task.
                let again = TaskConfig::try_from(&pb::TaskConfig::from(&t)).expect("round trip");
                assert_eq!(again, t, "task config changes in a protobuf round trip");
            }
        }
        5 => {
            // Ingest: each report of a request.
            if let Ok(m) = pb::SubmitReportsRequest::decode(rest) {
                for r in &m.reports {
                    let _ = Report::from_bytes(r);
                }
            }
        }
        _ => {
            // Collection: task id and interval of a request.
            if let Ok(m) = pb::CollectRequest::decode(rest) {
                let _ = TaskId::try_from(m.task_id.as_ref());
                if let Some(i) = &m.interval {
                    let _ = Interval::try_from(i);
                }
            }
        }
    }
}

/// Config files: aggregator, shuffler, results service and task TOML.
pub fn config(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 => {
            let _ = hush_aggregator::AggregatorConfig::from_toml(text);
        }
        1 => {
            let _ = hush_shuffler::ShufflerConfig::from_toml(text);
        }
        2 => {
            let _ = hush_collector::ResultsConfig::from_toml(text);
        }
        _ => {
            if let Ok(p) = toml::from_str::<TaskParams>(text) {
                let _ = TaskConfig::new(p);
            }
        }
    }
}

/// Valid inputs for each target (seed corpora): a real report and packet, HPKE encodings, a
/// task in protobuf, and the sample configs.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use hush_protocol::{MeasurementKind, ReportId, Time};
    let f = crate::Fixture::new(MeasurementKind::EventHistogram, 2);
    let m = f
        .client
        .latency_event(std::time::Duration::from_millis(42))
        .unwrap();
    let now = Time::from_secs(1_800_000_000);
    let report = f
        .client
        .seal(f.client.shard(&m, ReportId::random()).unwrap(), now)
        .unwrap();
    let packet = f.client.packet(&m, now).unwrap();
    let key = HpkeKeypair::generate(3);
    let sealed = hush_protocol::hpke::seal(key.config(), &Label::OnionLayer, b"x", b"aad").unwrap();
    let with = |b: u8, rest: Vec<u8>| [vec![b], rest].concat();
    let mut out = vec![
        ("report", "report".into(), report.to_bytes()),
        ("onion_packet", "packet".into(), packet.data.to_vec()),
        ("onion_layer", "empty".into(), vec![]),
        ("hpke", "config".into(), with(0, key.config().to_bytes())),
        ("hpke", "ciphertext".into(), with(1, sealed.to_bytes())),
        ("hpke", "keypair".into(), with(2, key.to_bytes())),
        (
            "hpke",
            "keyset".into(),
            with(3, KeySet::generate(now).to_bytes()),
        ),
        (
            "proto",
            "hpke_config".into(),
            with(0, pb::HpkeConfig::from(key.config()).encode_to_vec()),
        ),
        (
            "proto",
            "task".into(),
            with(4, pb::TaskConfig::from(&f.task).encode_to_vec()),
        ),
        (
            "proto",
            "submit_reports".into(),
            with(
                5,
                pb::SubmitReportsRequest {
                    reports: vec![report.to_bytes().into()],
                }
                .encode_to_vec(),
            ),
        ),
    ];
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/samples");
    for (b, file) in [
        (0u8, "leader.toml"),
        (0, "helper.toml"),
        (1, "shuffler-a.toml"),
        (2, "results.toml"),
        (3, "task-errors.toml"),
    ] {
        let text = std::fs::read(samples.join(file)).expect("sample config");
        out.push(("config", file.replace(".toml", ""), with(b, text)));
    }
    out
}
