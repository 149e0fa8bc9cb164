//! Operators probe every server with the standard protocols: `grpc.health.v1.Health` (SERVING
//! per service while up, NOT_SERVING while draining), gRPC reflection (unless turned off), and
//! the results service's `/healthz` and `/readyz`.

use std::sync::Arc;
use std::time::Duration;

use hush_protocol::SystemClock;
use hush_shuffler::{ShufflerConfig, ShufflerNode};
use hush_tests::cluster::{InProcessPair, url};
use hush_tests::mixnet::{Mix, RecordingLeader};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const ADMIN_TOKEN: &str = "admin-token-0123456789";

async fn status(url: &str, service: &str) -> Result<ServingStatus, tonic::Status> {
    let mut c = HealthClient::new(hush_aggregator::client::channel(url, None).unwrap());
    let r = c
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner();
    Ok(ServingStatus::try_from(r.status).unwrap())
}

async fn list_services(url: &str) -> Result<Vec<String>, tonic::Status> {
    let mut c = ServerReflectionClient::new(hush_aggregator::client::channel(url, None).unwrap());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream_once(req))
        .await?
        .into_inner();
    let first = stream
        .message()
        .await?
        .expect("the reflection service answers");
    match first.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            let mut names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
            names.sort();
            Ok(names)
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}

fn tokio_stream_once(
    req: ServerReflectionRequest,
) -> impl tonic::codegen::tokio_stream::Stream<Item = ServerReflectionRequest> {
    tonic::codegen::tokio_stream::iter(vec![req])
}

async fn shuffler(dir: &std::path::Path, sink: &RecordingLeader, server: &str) -> ShufflerNode {
    let text = hush_tests::mixnet::shuffler_config_text(
        "shuffler-a",
        dir,
        "127.0.0.1:0".parse().unwrap(),
        ("leader", "leader", &sink.url()),
        Mix {
            batch_size: 10,
            min_batch_size: 1,
            max_wait_ms: 50,
        },
        "",
    )
    .replace("cache_mb = 16\n", &format!("cache_mb = 16\n{server}"));
    ShufflerNode::start(
        ShufflerConfig::from_toml(&text).unwrap(),
        ADMIN_TOKEN,
        Arc::new(SystemClock),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shuffler_is_serving_lists_its_services_and_goes_not_serving_while_it_drains() {
    let sink = RecordingLeader::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = shuffler(dir.path(), &sink, "[server]\ndrain_grace_ms = 3000\n").await;
    let u = url(node.local_addr());
    for service in ["", "hush.v1.Shuffler", "hush.v1.Admin", "hush.v1.HpkeKeys"] {
        assert_eq!(
            status(&u, service).await.unwrap(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    // A service this server does not run is unknown to the health protocol.
    let e = status(&u, "hush.v1.LeaderIngest").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert_eq!(
        list_services(&u).await.unwrap(),
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "hush.v1.Admin",
            "hush.v1.HpkeKeys",
            "hush.v1.Shuffler",
        ]
    );

    // Draining: every service NOT_SERVING for the grace period, then the listener stops.
    let stopping = tokio::spawn(node.shutdown());
    let mut seen = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match status(&u, "hush.v1.Shuffler").await {
            Ok(ServingStatus::NotServing) => {
                seen = Some(status(&u, "").await.unwrap());
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("stopped answering before reporting NOT_SERVING: {e:?}"),
        }
    }
    assert_eq!(seen, Some(ServingStatus::NotServing));
    stopping.await.unwrap().unwrap();
    assert!(
        status(&u, "").await.is_err(),
        "still answering after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_can_be_turned_off_and_health_stays() {
    let sink = RecordingLeader::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = shuffler(dir.path(), &sink, "[server]\nreflection = false\n").await;
    let u = url(node.local_addr());
    assert_eq!(status(&u, "").await.unwrap(), ServingStatus::Serving);
    let e = list_services(&u).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_and_helper_report_their_own_services() {
    let pair = InProcessPair::start(Arc::new(SystemClock)).await;
    let (leader, helper) = (pair.leader_url(), pair.helper_url());
    for service in [
        "",
        "hush.v1.LeaderIngest",
        "hush.v1.Collection",
        "hush.v1.Admin",
    ] {
        assert_eq!(
            status(&leader, service).await.unwrap(),
            ServingStatus::Serving
        );
    }
    assert_eq!(
        status(&leader, "hush.v1.HelperAggregation")
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    for service in ["", "hush.v1.HelperAggregation", "hush.v1.HpkeKeys"] {
        assert_eq!(
            status(&helper, service).await.unwrap(),
            ServingStatus::Serving
        );
    }
    assert!(
        list_services(&helper)
            .await
            .unwrap()
            .contains(&"hush.v1.HelperAggregation".to_owned())
    );
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_results_service_answers_healthz_readyz_and_grpc_health() {
    use hush_collector::{ResultsConfig, ResultsSecrets, ResultsService};
    use hush_protocol::{HpkeKeypair, MeasurementKind, TaskConfig};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let task = TaskConfig::new(hush_tests::task_params(
        MeasurementKind::Counter,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    std::fs::write(d.join("task.toml"), toml::to_string(task.params()).unwrap()).unwrap();
    let config = ResultsConfig::from_toml(&format!(
        "tenant = \"acme\"\nlisten_grpc = \"127.0.0.1:0\"\nlisten_http = \"127.0.0.1:0\"\n\
         data_dir = \"{}\"\nleader_url = \"http://127.0.0.1:1\"\ntask_files = [\"{}\"]\n",
        d.join("data").display(),
        d.join("task.toml").display()
    ))
    .unwrap();
    let svc = ResultsService::start(
        config,
        ResultsSecrets {
            tenant_token: "acme-token-0123456789".into(),
            collector_key: HpkeKeypair::generate(1),
            api_token: None,
            read_token: "read-token-0123456789".into(),
        },
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    // No token needed: probes say nothing about the results.
    for path in ["/healthz", "/readyz"] {
        let (code, _) = hush_tests::http::request(svc.http_addr(), "GET", path, None, None).await;
        assert_eq!(code, 200, "{path}");
    }
    let g = url(svc.grpc_addr());
    for service in ["", "hush.v1.Results", "hush.v1.KeyDirectory"] {
        assert_eq!(status(&g, service).await.unwrap(), ServingStatus::Serving);
    }
    svc.shutdown().await.unwrap();
}
