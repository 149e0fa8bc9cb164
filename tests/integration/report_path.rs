//! The client's report path against the real peeling, opening and Prio3 verification code.

use std::time::Duration;

use hush_protocol::dp::decode_signed;
use hush_protocol::onion::OnionError;
use hush_protocol::vdaf::VdafError;
use hush_protocol::{Measurement, MeasurementKind, ReportId, Role, TaskId, Time};
use hush_tests::{Failure, Fixture};
use rand::{Rng, SeedableRng, rngs::StdRng};

const NOW: Time = Time::from_secs(1_700_000_000);

/// Sends `measurements` through client → every hop → both aggregators, and returns the
/// unsharded aggregate.
fn aggregate(fx: &Fixture, measurements: &[Measurement]) -> Vec<i64> {
    let vdaf = fx.client.vdaf();
    let mut leader = vdaf.aggregate_init();
    let mut helper = vdaf.aggregate_init();
    for m in measurements {
        let packet = fx.client.packet(m, NOW).expect("client path");
        assert_eq!(packet.data.len(), fx.task.packet_size());
        let report = fx.decode_report(&fx.peel_all(&packet.data).expect("every hop peels"));
        assert_eq!(report.time(), fx.task.window_of(NOW));
        let (l, h) = fx.verify(&report).expect("valid report verifies");
        leader.accumulate(&l).unwrap();
        helper.accumulate(&h).unwrap();
    }
    leader.merge(&helper).unwrap();
    decode_signed(&leader).unwrap()
}

#[test]
fn event_histogram_of_1000_latencies_is_exact() {
    let fx = Fixture::new(MeasurementKind::EventHistogram, 2);
    let mut rng = StdRng::seed_from_u64(1);
    let mut expect = vec![0i64; fx.task.output_len()];
    let ms: Vec<Measurement> = (0..1_000)
        .map(|_| {
            // Log-uniform latencies from 100 µs to 30 s exercise every bucket, both open ends.
            let us = 10f64.powf(rng.random_range(2.0..7.5)) as u64;
            let m = fx.client.latency_event(Duration::from_micros(us)).unwrap();
            expect[fx.task.bucket_of(us)] += 1;
            m
        })
        .collect();
    assert_eq!(aggregate(&fx, &ms), expect);
    assert!(expect[0] > 0 && *expect.last().unwrap() > 0);
}

#[test]
fn window_histogram_of_1000_windows_is_exact() {
    let fx = Fixture::new(MeasurementKind::WindowHistogram, 2);
    let mut rng = StdRng::seed_from_u64(2);
    let mut expect = vec![0i64; fx.task.output_len()];
    let ms: Vec<Measurement> = (0..1_000)
        .map(|_| {
            let n = rng.random_range(0..=fx.task.contribution_bound());
            let lat: Vec<Duration> = (0..n)
                .map(|_| Duration::from_micros(10f64.powf(rng.random_range(2.5..7.2)) as u64))
                .collect();
            for l in &lat {
                expect[fx.task.bucket_of(l.as_micros() as u64)] += 1;
            }
            fx.client.latency_window(&lat).unwrap()
        })
        .collect();
    assert_eq!(aggregate(&fx, &ms), expect);
}

#[test]
fn counter_of_1000_windows_is_exact() {
    let fx = Fixture::new(MeasurementKind::Counter, 2);
    let mut rng = StdRng::seed_from_u64(3);
    let mut total = 0i64;
    let ms: Vec<Measurement> = (0..1_000)
        .map(|_| {
            let n = rng.random_range(0..=fx.task.contribution_bound());
            total += n as i64;
            fx.client.count(n).unwrap()
        })
        .collect();
    assert_eq!(aggregate(&fx, &ms), vec![total]);
}

#[test]
fn a_flipped_bit_in_any_layer_fails_to_open() {
    let fx = Fixture::new(MeasurementKind::EventHistogram, 2);
    let packet = fx
        .client
        .packet(&Measurement::Bucket(3), NOW)
        .unwrap()
        .data
        .to_vec();
    let header = hush_protocol::onion::PACKET_HEADER_LEN;

    // Outer layer: a flip in the encapsulated key, in the ciphertext, or in the fill.
    for pos in [5, header + 10, packet.len() - 1] {
        let mut p = packet.clone();
        p[pos] ^= 0x01;
        assert!(
            fx.peel_all(&p).is_err(),
            "outer flip at {pos} went unnoticed"
        );
    }
    // Inner layer: peel the outer one, then flip a bit of the inner packet's ciphertext.
    let task = fx.task.id();
    let inner =
        hush_protocol::onion::peel(&task, fx.task.packet_size(), &fx.shuffler_keys[0], &packet)
            .unwrap()
            .payload;
    let mut p = inner.clone();
    p[header + 100] ^= 0x80;
    assert_eq!(
        hush_protocol::onion::peel(&task, fx.task.packet_size(), &fx.shuffler_keys[1], &p),
        Err(OnionError::DecryptFailed)
    );
    // Innermost: flip a bit of each sealed share inside the report; it no longer opens.
    let report_bytes = fx.peel_all(&packet).unwrap();
    let report = fx.decode_report(&report_bytes);
    for role in [Role::Leader, Role::Helper] {
        let ct = report.encrypted_share(role);
        let mut payload = ct.payload().to_vec();
        payload[0] ^= 1;
        let tampered = hush_protocol::HpkeCiphertext::new(
            ct.config_id(),
            ct.encapsulated_key().to_vec(),
            payload,
        )
        .unwrap();
        let (t, id, time, ps, l, h) = report.clone().into_parts();
        let r = match role {
            Role::Leader => hush_protocol::Report::new(t, id, time, ps, tampered, h),
            Role::Helper => hush_protocol::Report::new(t, id, time, ps, l, tampered),
        };
        assert!(
            matches!(fx.verify(&r), Err(Failure::Decrypt)),
            "{role} share tamper"
        );
    }
}

#[test]
fn a_report_sealed_for_task_a_does_not_open_as_task_b() {
    let fx = Fixture::new(MeasurementKind::EventHistogram, 1);
    let packet = fx.client.packet(&Measurement::Bucket(1), NOW).unwrap();
    let report = fx.decode_report(&fx.peel_all(&packet.data).unwrap());
    // Rewrite the task id: the AAD no longer matches, so neither share opens.
    let (_, id, time, ps, l, h) = report.into_parts();
    let moved =
        hush_protocol::Report::new(TaskId::random(), id, time, ps.clone(), l.clone(), h.clone());
    assert!(moved.open_share(Role::Leader, &fx.leader_keys).is_err());
    assert!(moved.open_share(Role::Helper, &fx.helper_keys).is_err());
    // The same for another report id or another time.
    let moved = hush_protocol::Report::new(
        fx.task.id(),
        ReportId::random(),
        time,
        ps.clone(),
        l.clone(),
        h.clone(),
    );
    assert!(moved.open_share(Role::Leader, &fx.leader_keys).is_err());
    let moved = hush_protocol::Report::new(fx.task.id(), id, time.add_secs(60), ps, l, h);
    assert!(moved.open_share(Role::Helper, &fx.helper_keys).is_err());
    // And the onion itself only peels for its own task.
    assert_eq!(
        hush_protocol::onion::peel(
            &TaskId::random(),
            fx.task.packet_size(),
            &fx.shuffler_keys[0],
            &packet.data
        ),
        Err(OnionError::DecryptFailed)
    );
}

#[test]
fn a_share_opened_with_the_wrong_aggregators_key_fails() {
    let fx = Fixture::new(MeasurementKind::Counter, 1);
    let packet = fx.client.packet(&Measurement::Count(2), NOW).unwrap();
    let report = fx.decode_report(&fx.peel_all(&packet.data).unwrap());
    // Both test aggregators use config id 1, so only the key itself differs.
    assert!(report.open_share(Role::Leader, &fx.helper_keys).is_err());
    assert!(report.open_share(Role::Helper, &fx.leader_keys).is_err());
    assert!(report.open_share(Role::Leader, &fx.leader_keys).is_ok());
}

#[test]
fn a_corrupted_input_share_fails_verification() {
    let fx = Fixture::new(MeasurementKind::EventHistogram, 1);
    let mut prepared = fx
        .client
        .shard(&Measurement::Bucket(4), ReportId::random())
        .unwrap();
    // A malicious client flips a low bit of the leader's first measurement-share element before
    // sealing: still a valid field element, but no longer a valid one-hot share.
    prepared.sharded.leader_share[0] ^= 1;
    let report = fx.client.seal(prepared, NOW).unwrap();
    let packet = fx.client.wrap(&report).unwrap();
    let report = fx.decode_report(&fx.peel_all(&packet.data).unwrap());
    assert!(matches!(
        fx.verify(&report),
        Err(Failure::Vdaf(VdafError::InvalidProof))
    ));
}

#[test]
fn out_of_range_measurements_are_refused_by_the_client() {
    let fx = Fixture::new(MeasurementKind::Counter, 1);
    let e = fx.client.count(21).unwrap_err();
    assert!(e.to_string().contains("contribution bound of 20"), "{e}");
    assert!(fx.client.packet(&Measurement::Count(21), NOW).is_err());
    assert!(
        fx.client.latency_event(Duration::from_millis(1)).is_err(),
        "wrong kind"
    );

    let fx = Fixture::new(MeasurementKind::WindowHistogram, 1);
    let lat = vec![Duration::from_millis(5); 21];
    assert!(fx.client.latency_window(&lat).is_err());
    let fx = Fixture::new(MeasurementKind::EventHistogram, 1);
    assert!(fx.client.packet(&Measurement::Bucket(32), NOW).is_err());
}

#[test]
fn a_clipping_task_clips_instead_of_refusing() {
    let collector = hush_protocol::HpkeKeypair::generate(1);
    let mut p = hush_tests::task_params(MeasurementKind::Counter, &collector);
    p.clip_contributions = true;
    let fx = Fixture::with_task(hush_protocol::TaskConfig::new(p).unwrap(), collector, 1);
    assert_eq!(aggregate(&fx, &[fx.client.count(1_000).unwrap()]), vec![20]);
}

#[test]
fn packets_of_a_task_all_have_the_same_size() {
    let fx = Fixture::new(MeasurementKind::WindowHistogram, 3);
    let mut rng = StdRng::seed_from_u64(4);
    let sizes: std::collections::BTreeSet<usize> = (0..20)
        .map(|_| {
            let mut counts = vec![0u64; fx.task.output_len()];
            for _ in 0..rng.random_range(0..=20) {
                counts[rng.random_range(0..fx.task.output_len())] += 1;
            }
            let m = fx.client.window_counts(counts).unwrap();
            fx.client.packet(&m, NOW).unwrap().data.len()
        })
        .collect();
    assert_eq!(
        sizes.into_iter().collect::<Vec<_>>(),
        vec![fx.task.packet_size()]
    );
}
