//! Every decoder refuses bad input with an error, never a panic; every message round-trips.

use hush_protocol::codec::Codec;
use hush_protocol::hpke::{HpkeCiphertext, HpkeConfig, HpkeKeypair, Keyring};
use hush_protocol::onion::{self, Hop, Route};
use hush_protocol::proto::v1 as pb;
use hush_protocol::{Interval, Report, ReportId, TaskConfig, TaskId, Time};
use proptest::prelude::*;
use prost::Message;

fn sample_report() -> Report {
    Report::new(
        TaskId::random(),
        ReportId::random(),
        Time::from_secs(1_700_000_040),
        vec![9; 64],
        HpkeCiphertext::new(1, vec![1; 32], vec![2; 700]).unwrap(),
        HpkeCiphertext::new(2, vec![3; 32], vec![4; 80]).unwrap(),
    )
}

/// Checks that every strict prefix and every one-byte extension of a valid encoding is refused.
fn truncations_and_extensions_fail<T: Codec + std::fmt::Debug>(valid: &[u8]) {
    T::from_bytes(valid).expect("the valid encoding decodes");
    for n in 0..valid.len() {
        assert!(
            T::from_bytes(&valid[..n]).is_err(),
            "{} prefix of {n} bytes decoded",
            T::NAME
        );
    }
    for b in [0u8, 0xff] {
        let mut ext = valid.to_vec();
        ext.push(b);
        assert!(
            T::from_bytes(&ext).is_err(),
            "{} with a trailing byte decoded",
            T::NAME
        );
    }
}

#[test]
fn binary_messages_round_trip_and_refuse_truncation_and_extension() {
    let r = sample_report();
    assert_eq!(Report::from_bytes(&r.to_bytes()).unwrap(), r);
    truncations_and_extensions_fail::<Report>(&r.to_bytes());

    let kp = HpkeKeypair::generate(5);
    assert_eq!(
        &HpkeConfig::from_bytes(&kp.config().to_bytes()).unwrap(),
        kp.config()
    );
    truncations_and_extensions_fail::<HpkeConfig>(&kp.config().to_bytes());
    truncations_and_extensions_fail::<HpkeKeypair>(&kp.to_bytes());

    let ct = HpkeCiphertext::new(3, vec![7; 32], vec![8; 17]).unwrap();
    assert_eq!(HpkeCiphertext::from_bytes(&ct.to_bytes()).unwrap(), ct);
    truncations_and_extensions_fail::<HpkeCiphertext>(&ct.to_bytes());

    let id = TaskId::random();
    truncations_and_extensions_fail::<TaskId>(&id.to_bytes());
    truncations_and_extensions_fail::<ReportId>(&ReportId::random().to_bytes());
    truncations_and_extensions_fail::<Time>(&Time::from_secs(7).to_bytes());
}

#[test]
fn onion_round_trip_and_refuse_truncation_and_extension() {
    let keys: Vec<_> = (0..2).map(|i| HpkeKeypair::generate(i + 1)).collect();
    let route = Route::new(
        keys.iter()
            .enumerate()
            .map(|(i, k)| Hop {
                name: format!("s{i}"),
                config: k.config().clone(),
            })
            .collect(),
        "leader",
    )
    .unwrap();
    let task = TaskId::random();
    let report = sample_report().to_bytes();
    let packet = onion::wrap(&task, 2_048, &route, &report).unwrap();
    let ring0 = Keyring::new(vec![keys[0].clone()]);
    let ring1 = Keyring::new(vec![keys[1].clone()]);
    let inner = onion::peel(&task, 2_048, &ring0, &packet).unwrap().payload;
    assert_eq!(
        onion::peel(&task, 2_048, &ring1, &inner).unwrap().payload,
        report
    );
    for n in [0, 1, 36, 37, 1_000, 2_047] {
        assert!(onion::peel(&task, 2_048, &ring0, &packet[..n]).is_err());
    }
    let mut ext = packet.clone();
    ext.push(0);
    assert!(onion::peel(&task, 2_048, &ring0, &ext).is_err());
}

/// One populated value of every hush.v1 message.
fn every_message() -> Vec<Box<dyn Fn() -> Result<(), String>>> {
    fn rt<M: Message + Default + PartialEq + std::fmt::Debug + 'static>(
        m: M,
    ) -> Box<dyn Fn() -> Result<(), String>> {
        Box::new(move || {
            let back = M::decode(m.encode_to_vec().as_slice()).map_err(|e| e.to_string())?;
            if back == m {
                Ok(())
            } else {
                Err(format!("{m:?} != {back:?}"))
            }
        })
    }
    let kp = HpkeKeypair::generate(1);
    let cfg = pb::HpkeConfig::from(kp.config());
    let ct = pb::HpkeCiphertext {
        config_id: 1,
        encapsulated_key: vec![1; 32].into(),
        payload: vec![2; 9].into(),
    };
    let interval = pb::Interval {
        start: 600,
        duration: 60,
    };
    let reasons = vec![pb::ReasonCount {
        reason: pb::RejectReason::Replay as i32,
        count: 3,
    }];
    let task = pb::TaskConfig {
        task_id: vec![1; 32].into(),
        tenant: "acme".into(),
        name: "n".into(),
        kind: pb::MeasurementKind::EventHistogram as i32,
        bucket_bounds_us: vec![1, 2, 3],
        contribution_bound: 4,
        clip_contributions: true,
        time_precision_s: 60,
        min_batch_size: 10,
        epsilon_per_collection_micro: 1,
        epsilon_budget_micro: 2,
        report_expiry_s: 3,
        packet_size: 4_096,
        collector_hpke_config: Some(cfg.clone()),
        alert_budget_percent: 70,
        retention_s: 5,
        count_epsilon_percent: 10,
        max_collections_per_batch: 1,
    };
    let estimate = pb::Estimate {
        value: 1.5,
        ci_low: 1.0,
        ci_high: 2.0,
    };
    let window = pb::WindowResult {
        task_id: vec![1; 32].into(),
        interval: Some(interval),
        noisy_counts: vec![-1, 2],
        bucket_bounds_us: vec![10],
        noise_stddev: 2.5,
        epsilon_micro: 1,
        p50_ms: Some(estimate),
        p95_ms: Some(estimate),
        p99_ms: Some(estimate),
        total: Some(estimate),
        ad_hoc: true,
        reports: Some(estimate),
        late_reports: Some(estimate),
        withheld: vec!["p99: too few reports".into()],
    };
    vec![
        rt(cfg.clone()),
        rt(pb::HpkeConfigList {
            configs: vec![cfg.clone(), cfg.clone()],
        }),
        rt(ct.clone()),
        rt(interval),
        rt(reasons[0]),
        rt(task.clone()),
        rt(pb::GetHpkeConfigsRequest {}),
        rt(pb::SubmitPacketsRequest {
            packets: vec![pb::Packet {
                task_id: vec![1; 32].into(),
                data: vec![0; 64].into(),
            }],
        }),
        rt(pb::SubmitPacketsResponse {
            accepted: 9,
            rejected: reasons.clone(),
        }),
        rt(pb::SubmitReportsRequest {
            reports: vec![vec![1, 2].into()],
        }),
        rt(pb::SubmitReportsResponse {
            accepted: 9,
            rejected: reasons.clone(),
        }),
        rt(pb::AggregationJobInitRequest {
            task_id: vec![1; 32].into(),
            job_id: vec![2; 16].into(),
            reports: vec![pb::ReportShare {
                report_id: vec![3; 16].into(),
                time: 60,
                public_share: vec![4; 64].into(),
                encrypted_input_share: Some(ct.clone()),
                leader_verifier_share: vec![5; 48].into(),
            }],
        }),
        rt(pb::AggregationJobResponse {
            outcomes: vec![
                pb::ReportOutcome {
                    report_id: vec![3; 16].into(),
                    result: Some(pb::report_outcome::Result::VerifierMessage(
                        vec![6; 32].into(),
                    )),
                },
                pb::ReportOutcome {
                    report_id: vec![4; 16].into(),
                    result: Some(pb::report_outcome::Result::Rejected(
                        pb::RejectReason::InvalidProof as i32,
                    )),
                },
            ],
        }),
        rt(pb::AggregateShareRequest {
            task_id: vec![1; 32].into(),
            collection_id: vec![7; 16].into(),
            interval: Some(interval),
            report_count: 100,
            checksum: vec![8; 32].into(),
            purpose: pb::BudgetPurpose::Alert as i32,
        }),
        rt(pb::AggregateShareResponse {
            encrypted_aggregate_share: Some(ct.clone()),
        }),
        rt(pb::CollectRequest {
            task_id: vec![1; 32].into(),
            interval: Some(interval),
            collection_id: vec![7; 16].into(),
            purpose: pb::BudgetPurpose::Routine as i32,
        }),
        rt(pb::CollectResponse {
            interval: Some(interval),
            leader_encrypted_share: Some(ct.clone()),
            helper_encrypted_share: Some(ct.clone()),
            epsilon_micro: 1_000_000,
            sensitivity: 2,
            budget_left_micro: 5,
            count_epsilon_micro: 100_000,
            count_sensitivity: 1,
        }),
        rt(pb::LateCountRequest {
            task_id: vec![1; 32].into(),
            interval: Some(interval),
        }),
        rt(pb::LateCountResponse {
            interval: Some(interval),
            noisy_late_reports: -3,
            epsilon_micro: 100_000,
            sensitivity: 1,
            budget_left_micro: 7,
        }),
        rt(pb::CreateTaskRequest {
            task: Some(task.clone()),
            vdaf_verify_key: vec![9; 32].into(),
            role: "leader".into(),
        }),
        rt(pb::CreateTaskResponse { created: true }),
        rt(pb::ListTasksRequest {
            tenant: "acme".into(),
        }),
        rt(pb::ListTasksResponse {
            tasks: vec![task.clone()],
        }),
        rt(pb::GetTaskStatsRequest {
            task_id: vec![1; 32].into(),
        }),
        rt(pb::TaskStats {
            task_id: vec![1; 32].into(),
            reports_accepted: 1,
            reports_aggregated: 2,
            reports_pending: 3,
            rejected: reasons.clone(),
            reports_late: 4,
        }),
        rt(pb::KeySet {
            epoch: 3,
            epoch_start: 1_800,
            epoch_s: 600,
            shufflers: vec![pb::NamedHpkeConfig {
                name: "shuffler-a".into(),
                config: Some(cfg.clone()),
            }],
            leader: Some(pb::NamedHpkeConfig {
                name: "leader".into(),
                config: Some(cfg.clone()),
            }),
            helper: Some(cfg.clone()),
        }),
        rt(pb::RotateHpkeKeyRequest {}),
        rt(pb::SetTenantTokenRequest {
            tenant: "acme".into(),
            token: "t".into(),
        }),
        rt(pb::SetTenantTokenResponse {}),
        rt(pb::ListWindowsRequest {
            task_id: vec![1; 32].into(),
            from: 60,
            to: 600,
            page_size: 10,
            page_token: "AAAA".into(),
        }),
        rt(pb::ListWindowsResponse {
            windows: vec![window.clone()],
            next_page_token: "AAAB".into(),
        }),
        rt(pb::GetWindowRequest {
            task_id: vec![1; 32].into(),
            window_start: 60,
        }),
        rt(pb::CollectAdHocRequest {
            task_id: vec![1; 32].into(),
            interval: Some(interval),
            purpose: pb::BudgetPurpose::Alert as i32,
        }),
        rt(window),
        rt(pb::ListAlertsRequest {
            task_id: vec![1; 32].into(),
            from: 0,
            to: 0,
            page_size: 0,
            page_token: String::new(),
        }),
        rt(pb::ListAlertsResponse {
            alerts: vec![pb::Alert {
                task_id: vec![1; 32].into(),
                window_start: 60,
                detector: "p95".into(),
                statistic: 4.2,
                threshold: 2.3,
                baseline: 120.0,
                observed: 135.0,
                explanation: "p95 rose".into(),
            }],
            next_page_token: String::new(),
        }),
    ]
}

#[test]
fn every_protobuf_message_round_trips() {
    for (i, check) in every_message().iter().enumerate() {
        check().unwrap_or_else(|e| panic!("message {i}: {e}"));
    }
}

#[test]
fn protobuf_task_config_round_trips_through_the_domain_type() {
    let kp = HpkeKeypair::generate(1);
    let text = format!(
        "tenant = \"acme\"\nkind = \"event_histogram\"\nbucket_bounds_us = [1000, 5000, 20000]\n\
         contribution_bound = 100\ncollector_hpke_config = \"{}\"\n",
        toml::Value::try_from(kp.config())
            .unwrap()
            .as_str()
            .unwrap()
    );
    let t: TaskConfig = toml::from_str(&text).unwrap();
    let p = pb::TaskConfig::decode(pb::TaskConfig::from(&t).encode_to_vec().as_slice()).unwrap();
    assert_eq!(TaskConfig::try_from(&p).unwrap(), t);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_binary_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..2_048)) {
        let _ = Report::from_bytes(&bytes);
        let _ = HpkeConfig::from_bytes(&bytes);
        let _ = HpkeCiphertext::from_bytes(&bytes);
        let _ = HpkeKeypair::from_bytes(&bytes);
        let _ = TaskId::from_bytes(&bytes);
        let _ = onion::packet_header(&bytes, bytes.len());
        let ring = Keyring::new(vec![HpkeKeypair::generate(bytes.first().copied().unwrap_or(0))]);
        prop_assert!(onion::peel(&TaskId::from([0; 32]), bytes.len(), &ring, &bytes).is_err());
    }

    #[test]
    fn truncated_or_extended_reports_are_errors(cut in 0usize..1_000, extra in proptest::collection::vec(any::<u8>(), 1..16)) {
        let valid = sample_report().to_bytes();
        let cut = cut % valid.len();
        prop_assert!(Report::from_bytes(&valid[..cut]).is_err());
        let mut ext = valid.clone();
        ext.extend_from_slice(&extra);
        prop_assert!(Report::from_bytes(&ext).is_err());
    }

    #[test]
    fn random_protobuf_never_panics_the_domain_conversions(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = pb::TaskConfig::decode(bytes.as_slice()) {
            let _ = TaskConfig::try_from(&m);
        }
        if let Ok(m) = pb::HpkeConfig::decode(bytes.as_slice()) {
            let _ = HpkeConfig::try_from(&m);
        }
        if let Ok(m) = pb::HpkeConfigList::decode(bytes.as_slice()) {
            let _ = Vec::<HpkeConfig>::try_from(&m);
        }
        if let Ok(m) = pb::HpkeCiphertext::decode(bytes.as_slice()) {
            let _ = HpkeCiphertext::try_from(&m);
        }
        if let Ok(m) = pb::Interval::decode(bytes.as_slice()) {
            let _ = Interval::try_from(&m);
        }
    }

    #[test]
    fn random_protobuf_task_configs_convert_or_fail_cleanly(
        bounds in proptest::collection::vec(any::<u64>(), 0..40),
        kind in 0i32..5,
        bound in any::<u64>(),
        precision in any::<u64>(),
        eps in any::<u64>(),
        budget in any::<u64>(),
        packet in any::<u32>(),
        pct in any::<u32>(),
    ) {
        let kp = HpkeKeypair::generate(1);
        let p = pb::TaskConfig {
            task_id: vec![1; 32].into(),
            tenant: "acme".into(),
            kind,
            bucket_bounds_us: bounds,
            contribution_bound: bound,
            time_precision_s: precision,
            min_batch_size: 1,
            epsilon_per_collection_micro: eps,
            epsilon_budget_micro: budget,
            report_expiry_s: 1,
            packet_size: packet,
            collector_hpke_config: Some(kp.config().into()),
            alert_budget_percent: pct,
            ..Default::default()
        };
        if let Ok(t) = TaskConfig::try_from(&p) {
            // Whatever converts, converts back to the same message.
            prop_assert_eq!(pb::TaskConfig::from(&t), p);
        }
    }

    #[test]
    fn id_text_forms_never_panic(s in ".{0,80}") {
        let _ = s.parse::<TaskId>();
        let _ = s.parse::<ReportId>();
    }
}
