//! The client's whole report path against the raw crypto it is made of, in one run.
//!
//! `cargo bench -p hush-client` measures, for an event histogram with 32 buckets and a cascade of
//! two shufflers:
//!
//! * `whole_path`: measurement → shard → seal to leader and helper → two onion layers → padded
//!   packet, through `ClientTask::packet`;
//! * the raw parts, called directly on prio and hpke with the same inputs and sizes: one
//!   Prio3Histogram shard and four HPKE seals (the two input shares and the two onion layers'
//!   plaintexts).
//!
//! It then prints `whole_path / (shard + seals)`: the cost of hush's own encoding, copying and
//! padding on top of the crypto. Target: ≤ 1.15.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::hint::black_box;

use criterion::Criterion;
use hpke::aead::AesGcm128;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeS};
use hush_client::ClientTask;
use hush_protocol::hpke::{AEAD_TAG_LEN, HpkeKeypair};
use hush_protocol::onion::{Hop, PACKET_HEADER_LEN, Route};
use hush_protocol::task::log_spaced_bounds;
use hush_protocol::{
    Codec, Epsilon, Measurement, MeasurementKind, ReportId, TaskConfig, TaskId, TaskParams, Time,
};
use prio::vdaf::Client;
use prio::vdaf::prio3::{Prio3, optimal_chunk_length};

/// Mean time per iteration of each criterion sample, per benchmark.
static SAMPLES: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());

fn timed<F: FnMut()>(name: &'static str, mut f: F) -> impl FnMut(u64) -> Duration {
    move |iters| {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        let el = start.elapsed();
        SAMPLES
            .lock()
            .unwrap()
            .push((name, el / iters.max(1) as u32));
        el
    }
}

fn median(name: &str) -> Duration {
    let mut v: Vec<Duration> = SAMPLES
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .collect();
    v.sort();
    v[v.len() / 2]
}

fn raw_seal(pk: &<X25519HkdfSha256 as hpke::Kem>::PublicKey, plaintext: &[u8]) {
    let out = hpke::single_shot_seal::<AesGcm128, HkdfSha256, X25519HkdfSha256, _>(
        &OpModeS::Base,
        pk,
        b"info",
        plaintext,
        b"aad",
        &mut rand::rng(),
    )
    .unwrap();
    black_box(out);
}

fn main() {
    let buckets = 32;
    let collector = HpkeKeypair::generate(1);
    let task = TaskConfig::new(TaskParams {
        task_id: TaskId::random(),
        tenant: "bench".into(),
        name: "bench".into(),
        kind: MeasurementKind::EventHistogram,
        bucket_bounds_us: log_spaced_bounds(1_000, 10_000_000, buckets),
        contribution_bound: 100,
        clip_contributions: false,
        time_precision_s: 60,
        min_batch_size: 100,
        epsilon_per_collection: Epsilon::from_micros(1_000_000),
        epsilon_budget: Epsilon::from_micros(10_000_000),
        report_expiry_s: 3_600,
        packet_size: 4_096,
        collector_hpke_config: collector.config().clone(),
        alert_budget_percent: 70,
        retention_s: 0,
        count_epsilon_percent: 10,
        max_collections_per_batch: 0,
    })
    .unwrap();
    let leader = HpkeKeypair::generate(1);
    let helper = HpkeKeypair::generate(1);
    let shufflers: Vec<HpkeKeypair> = (0..2).map(|i| HpkeKeypair::generate(i + 1)).collect();
    let route = Route::new(
        shufflers
            .iter()
            .enumerate()
            .map(|(i, k)| Hop {
                name: format!("shuffler-{i}"),
                config: k.config().clone(),
            })
            .collect(),
        "leader",
    )
    .unwrap();
    let client = ClientTask::new(
        task.clone(),
        leader.config().clone(),
        helper.config().clone(),
        route.clone(),
    )
    .unwrap();
    let now = Time::from_secs(1_700_000_000);

    // The exact plaintext sizes of the four seals on the whole path.
    let sample = client
        .shard(&Measurement::Bucket(7), ReportId::random())
        .unwrap();
    let leader_pt = sample.sharded.leader_share.len();
    let helper_pt = sample.sharded.helper_share.len();
    let report_len = client.seal(sample, now).unwrap().to_bytes().len();
    let packet = task.packet_size();
    let outer_pt = packet - PACKET_HEADER_LEN - AEAD_TAG_LEN;
    let inner_pt = outer_pt - (PACKET_HEADER_LEN + AEAD_TAG_LEN + 2 + "shuffler-1".len() + 4);
    eprintln!(
        "Histogram({buckets}): leader share {leader_pt} B, helper share {helper_pt} B, report {report_len} B, \
         packet {packet} B, onion plaintexts {outer_pt} B and {inner_pt} B"
    );

    let raw_vdaf = Prio3::new_histogram(2, buckets, optimal_chunk_length(buckets)).unwrap();
    let pk = |c: &hush_protocol::HpkeConfig| {
        <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(c.public_key()).unwrap()
    };
    let (lpk, hpk, s0pk, s1pk) = (
        pk(leader.config()),
        pk(helper.config()),
        pk(shufflers[0].config()),
        pk(shufflers[1].config()),
    );
    let (lbuf, hbuf, obuf, ibuf) = (
        vec![1u8; leader_pt],
        vec![2u8; helper_pt],
        vec![3u8; outer_pt],
        vec![4u8; inner_pt],
    );

    let mut c = Criterion::default()
        .sample_size(40)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let mut g = c.benchmark_group("client_path_histogram32");
    g.bench_function("whole_path", |b| {
        b.iter_custom(timed("whole_path", || {
            black_box(client.packet(&Measurement::Bucket(7), now).unwrap());
        }))
    });
    g.bench_function("raw_prio3_shard", |b| {
        b.iter_custom(timed("raw_prio3_shard", || {
            let nonce: [u8; 16] = rand::random();
            black_box(raw_vdaf.shard(b"ctx", &7usize, &nonce).unwrap());
        }))
    });
    g.bench_function("raw_hpke_seal_leader_share", |b| {
        b.iter_custom(timed("raw_hpke_seal_leader_share", || {
            raw_seal(&lpk, &lbuf)
        }))
    });
    g.bench_function("raw_hpke_seal_helper_share", |b| {
        b.iter_custom(timed("raw_hpke_seal_helper_share", || {
            raw_seal(&hpk, &hbuf)
        }))
    });
    g.bench_function("raw_hpke_seal_onion_outer", |b| {
        b.iter_custom(timed("raw_hpke_seal_onion_outer", || {
            raw_seal(&s0pk, &obuf)
        }))
    });
    g.bench_function("raw_hpke_seal_onion_inner", |b| {
        b.iter_custom(timed("raw_hpke_seal_onion_inner", || {
            raw_seal(&s1pk, &ibuf)
        }))
    });
    g.finish();

    if SAMPLES
        .lock()
        .unwrap()
        .iter()
        .any(|(n, _)| *n == "whole_path")
        && SAMPLES
            .lock()
            .unwrap()
            .iter()
            .any(|(n, _)| *n == "raw_hpke_seal_onion_inner")
    {
        let whole = median("whole_path");
        let parts = [
            "raw_prio3_shard",
            "raw_hpke_seal_leader_share",
            "raw_hpke_seal_helper_share",
            "raw_hpke_seal_onion_outer",
            "raw_hpke_seal_onion_inner",
        ];
        let mut raw = Duration::ZERO;
        for p in parts {
            let d = median(p);
            eprintln!("  {p:<28} {:>9.1} µs", d.as_secs_f64() * 1e6);
            raw += d;
        }
        eprintln!("  {:<28} {:>9.1} µs", "raw sum", raw.as_secs_f64() * 1e6);
        eprintln!(
            "  {:<28} {:>9.1} µs",
            "whole_path",
            whole.as_secs_f64() * 1e6
        );
        eprintln!(
            "whole path / raw crypto = {:.3} (target ≤ 1.15; medians of per-sample means)",
            whole.as_secs_f64() / raw.as_secs_f64()
        );
    }
    c.final_summary();
}
