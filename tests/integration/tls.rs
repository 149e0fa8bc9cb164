//! Mutual TLS on every operator link: a shuffler, the leader and the helper started with
//! certificates from one CA refuse a caller without a client certificate, with a certificate
//! from another CA, or speaking plaintext, on each link; HPKE configs go only to certificate
//! holders (key directories), never to a service's client; services' clients reach the first
//! shuffler with server-authenticated TLS; and reports travel the whole TLS cascade.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hush_aggregator::{Aggregator, AggregatorConfig, client};
use hush_client::{Endpoints, HushClient, KeySet, KeySource, RuntimeConfig};
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::collection_client::CollectionClient;
use hush_protocol::proto::v1::helper_aggregation_client::HelperAggregationClient;
use hush_protocol::proto::v1::hpke_keys_client::HpkeKeysClient;
use hush_protocol::proto::v1::leader_ingest_client::LeaderIngestClient;
use hush_protocol::proto::v1::shuffler_client::ShufflerClient;
use hush_protocol::{
    Clock, HpkeKeypair, MeasurementKind, MockClock, Role, TaskConfig, Time, VerifyKey,
};
use hush_server::tls::dev::{DevCa, Issued, loopback_hosts};
use hush_server::tls::{TlsFiles, server_auth_client};
use hush_shuffler::{ShufflerConfig, ShufflerNode};
use hush_tests::cluster::{ADMIN_TOKEN, PEER_TOKEN, secrets};
use hush_tests::task_params;
use tonic::transport::{Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};

/// Writes `issued` and the CA next to each other; returns the `[tls]` section text.
fn tls_section(dir: &Path, name: &str, ca: &DevCa, issued: &Issued) -> String {
    let files = TlsFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
        ca: dir.join("ca.pem"),
    };
    std::fs::write(&files.cert, &issued.cert_pem).unwrap();
    std::fs::write(&files.key, &issued.key_pem).unwrap();
    std::fs::write(&files.ca, ca.cert_pem()).unwrap();
    #[derive(serde::Serialize)]
    struct Section<'a> {
        tls: &'a TlsFiles,
    }
    toml::to_string(&Section { tls: &files }).unwrap()
}

struct TlsCluster {
    _dir: tempfile::TempDir,
    ca: DevCa,
    leader: Aggregator,
    helper: Aggregator,
    first: ShufflerNode,
    second: ShufflerNode,
}

impl TlsCluster {
    async fn start(clock: Arc<dyn Clock>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = DevCa::new("operators' test CA").unwrap();
        let tls =
            |name: &str| tls_section(d, name, &ca, &ca.issue(name, &loopback_hosts()).unwrap());
        let helper = Aggregator::start(
            Role::Helper,
            AggregatorConfig::from_toml(&format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ncache_mb = 16\n\
                 [peers]\nleader = [\"leader\"]\nkey_directories = [\"directory\"]\n{}",
                d.join("helper").display(),
                tls("helper")
            ))
            .unwrap(),
            secrets(),
            clock.clone(),
        )
        .await
        .unwrap();
        let leader = Aggregator::start(
            Role::Leader,
            AggregatorConfig::from_toml(&format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ncache_mb = 16\n\
                 [peers]\nshufflers = [\"shuffler-b\"]\ncollectors = [\"collector\"]\nkey_directories = [\"directory\"]\n\
                 [leader]\nhelper_url = \"https://{}\"\njob_size = 100\njob_poll_interval_ms = 20\n{}",
                d.join("leader").display(),
                helper.local_addr(),
                tls("leader")
            ))
            .unwrap(),
            secrets(),
            clock.clone(),
        )
        .await
        .unwrap();
        let shuffler = |name: &str, from: &str, next: (&str, &str, String)| {
            ShufflerConfig::from_toml(&format!(
                "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ncache_mb = 16\n\
                 ingest_from = \"{from}\"\n\
                 [peers]\nprevious = [\"shuffler-a\"]\nkey_directories = [\"directory\"]\n[mix]\nbatch_size = 100\nmin_batch_size = 1\nmax_wait_ms = 50\n\
                 [forward]\nretry_initial_ms = 20\nretry_max_ms = 200\n\
                 [[next_hop]]\nname = \"{}\"\nkind = \"{}\"\nurl = \"{}\"\n{}",
                d.join(name).display(),
                next.0,
                next.1,
                next.2,
                tls(name)
            ))
            .unwrap()
        };
        let second = ShufflerNode::start(
            shuffler(
                "shuffler-b",
                "shufflers",
                (
                    "leader",
                    "leader",
                    format!("https://{}", leader.local_addr()),
                ),
            ),
            ADMIN_TOKEN,
            clock.clone(),
        )
        .await
        .unwrap();
        let first = ShufflerNode::start(
            shuffler(
                "shuffler-a",
                "clients",
                (
                    "shuffler-b",
                    "shuffler",
                    format!("https://{}", second.local_addr()),
                ),
            ),
            ADMIN_TOKEN,
            clock,
        )
        .await
        .unwrap();
        Self {
            _dir: dir,
            ca,
            leader,
            helper,
            first,
            second,
        }
    }

    fn trust(&self) -> ClientTlsConfig {
        server_auth_client(self.ca.cert_pem().as_bytes())
    }

    /// A client presenting a certificate of `issuer` (this cluster's CA or another) named
    /// "caller".
    fn with_cert_of(&self, issuer: &DevCa) -> ClientTlsConfig {
        self.named(issuer, "caller")
    }

    /// A client presenting a certificate of `issuer` named `name`.
    fn named(&self, issuer: &DevCa, name: &str) -> ClientTlsConfig {
        let issued = issuer.issue(name, &loopback_hosts()).unwrap();
        self.trust()
            .identity(Identity::from_pem(issued.cert_pem, issued.key_pem))
    }

    async fn shutdown(self) {
        self.first.shutdown().await.unwrap();
        self.second.shutdown().await.unwrap();
        self.leader.shutdown().await.unwrap();
        self.helper.shutdown().await.unwrap();
    }
}

fn https(addr: std::net::SocketAddr) -> String {
    format!("https://{addr}")
}

fn chan(url: &str, tls: Option<&ClientTlsConfig>) -> Channel {
    client::channel(url, tls).unwrap()
}

/// One call on an operator link, by the caller's channel.
type Call = fn(Channel) -> futures_like::BoxFuture<Result<(), tonic::Status>>;

mod futures_like {
    pub(super) type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
}

fn submit_packets(c: Channel) -> futures_like::BoxFuture<Result<(), tonic::Status>> {
    Box::pin(async move {
        ShufflerClient::new(c)
            .submit_packets(pb::SubmitPacketsRequest { packets: vec![] })
            .await
            .map(|_| ())
    })
}

fn submit_reports(c: Channel) -> futures_like::BoxFuture<Result<(), tonic::Status>> {
    Box::pin(async move {
        LeaderIngestClient::new(c)
            .submit_reports(pb::SubmitReportsRequest::default())
            .await
            .map(|_| ())
    })
}

fn init_job(c: Channel) -> futures_like::BoxFuture<Result<(), tonic::Status>> {
    Box::pin(async move {
        let mut req = Request::new(pb::AggregationJobInitRequest::default());
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {PEER_TOKEN}").parse().unwrap(),
        );
        HelperAggregationClient::new(c)
            .init_aggregation_job(req)
            .await
            .map(|_| ())
    })
}

fn get_keys(c: Channel) -> futures_like::BoxFuture<Result<(), tonic::Status>> {
    Box::pin(async move {
        HpkeKeysClient::new(c)
            .get_hpke_configs(pb::GetHpkeConfigsRequest {})
            .await
            .map(|_| ())
    })
}

fn collect(c: Channel) -> futures_like::BoxFuture<Result<(), tonic::Status>> {
    Box::pin(async move {
        CollectionClient::new(c)
            .collect(pb::CollectRequest::default())
            .await
            .map(|_| ())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_link_refuses_callers_without_the_right_certificate() {
    let clock: Arc<dyn Clock> = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let c = TlsCluster::start(clock).await;
    let rogue = DevCa::new("someone else's CA").unwrap();
    // (link, URL, call, the certificate name the link is configured for)
    let links: [(&str, String, Call, &str); 8] = [
        (
            "shuffler-a → shuffler-b",
            https(c.second.local_addr()),
            submit_packets,
            "shuffler-a",
        ),
        (
            "shuffler-b → leader",
            https(c.leader.local_addr()),
            submit_reports,
            "shuffler-b",
        ),
        (
            "leader → helper",
            https(c.helper.local_addr()),
            init_job,
            "leader",
        ),
        (
            "collector → leader",
            https(c.leader.local_addr()),
            collect,
            "collector",
        ),
        // HPKE configs: only key directories (certificate holders) may fetch them, so no
        // party can hand a service's client a key of its own.
        (
            "directory → leader",
            https(c.leader.local_addr()),
            get_keys,
            "directory",
        ),
        (
            "directory → helper",
            https(c.helper.local_addr()),
            get_keys,
            "directory",
        ),
        (
            "directory → shuffler-a",
            https(c.first.local_addr()),
            get_keys,
            "directory",
        ),
        (
            "directory → shuffler-b",
            https(c.second.local_addr()),
            get_keys,
            "directory",
        ),
    ];
    for (link, url, call, role) in links {
        // No client certificate: the TLS handshake succeeds (public services share the port),
        // and the service refuses before its handler runs.
        let e = call(chan(&url, Some(&c.trust()))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{link}: {e:?}");
        assert!(
            e.message().contains("client certificate"),
            "{link}: {}",
            e.message()
        );
        // A certificate from another CA: the server aborts the handshake with an UnknownCA
        // alert, which the caller sees as a transport error (or a closed connection when the
        // alert loses the race with its first request). No handler or interceptor answers.
        let e = call(chan(&url, Some(&c.with_cert_of(&rogue))))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{link}: {e:?}"
        );
        // Plaintext to a TLS port gets nowhere.
        let plain = url.replace("https://", "http://");
        let e = call(chan(&plain, None)).await.unwrap_err();
        assert_ne!(e.code(), Code::Ok, "{link}");
        assert!(
            !matches!(
                e.code(),
                Code::Unauthenticated | Code::InvalidArgument | Code::NotFound
            ),
            "{link}: plaintext reached a handler or interceptor: {e:?}"
        );
        // A valid certificate of this CA but of another role is refused before any handler.
        let e = call(chan(&url, Some(&c.with_cert_of(&c.ca))))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{link}: {e:?}");
        assert!(e.message().contains("caller"), "{link}: {}", e.message());
        // The right certificate gets through to the handler, which judges the (empty) request.
        let r = call(chan(&url, Some(&c.named(&c.ca, role)))).await;
        if let Err(e) = &r {
            assert_ne!(e.code(), Code::Unauthenticated, "{link}: {e:?}");
            assert_ne!(e.code(), Code::PermissionDenied, "{link}: {e:?}");
            assert_ne!(e.code(), Code::Unavailable, "{link}: {e:?}");
        }
    }
    // Each refusal at an aggregator is in its audit trail, which still verifies.
    let actions = async |a: &Aggregator| -> Vec<String> {
        let log = a.shared().store.audit();
        log.verify().await.unwrap();
        log.entries()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event.actor == "unauthenticated")
            .map(|e| {
                assert!(
                    e.event.outcome.contains("client certificate")
                        || e.event.outcome.contains("the certificate names caller"),
                    "{e}"
                );
                e.event.action
            })
            .collect()
    };
    // Each link's two refusals (no certificate, then another role's) are in the trail.
    assert_eq!(
        actions(&c.leader).await,
        [
            "ingest.call",
            "ingest.call",
            "collection.call",
            "collection.call",
            "keys.call",
            "keys.call"
        ]
    );
    assert_eq!(
        actions(&c.helper).await,
        [
            "aggregation.call",
            "aggregation.call",
            "keys.call",
            "keys.call"
        ]
    );
    // Clients of services need no certificate for the first shuffler's ingest, the only
    // operator service they use.
    submit_packets(chan(&https(c.first.local_addr()), Some(&c.trust())))
        .await
        .unwrap();
    // A client that does not trust the servers' CA cannot talk to them at all.
    let e = HpkeKeysClient::new(chan(
        &https(c.leader.local_addr()),
        Some(&server_auth_client(rogue.cert_pem().as_bytes())),
    ))
    .get_hpke_configs(pb::GetHpkeConfigsRequest {})
    .await
    .unwrap_err();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Unknown),
        "{e:?}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_travel_the_whole_tls_cascade_and_are_aggregated() {
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    let c = TlsCluster::start(clock.clone()).await;
    let tools = Some(c.trust());
    let task = TaskConfig::new(task_params(
        MeasurementKind::Counter,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    let key = VerifyKey::random();
    for (url, role) in [
        (https(c.leader.local_addr()), "leader"),
        (https(c.helper.local_addr()), "helper"),
    ] {
        client::admin(&url, ADMIN_TOKEN, tools.as_ref())
            .unwrap()
            .create_task(pb::CreateTaskRequest {
                task: Some((&task).into()),
                vdaf_verify_key: key.as_bytes().to_vec().into(),
                role: role.into(),
            })
            .await
            .unwrap();
    }
    for s in [&c.first, &c.second] {
        client::admin(&https(s.local_addr()), ADMIN_TOKEN, tools.as_ref())
            .unwrap()
            .create_task(pb::CreateTaskRequest {
                task: Some((&task).into()),
                vdaf_verify_key: Default::default(),
                role: "shuffler".into(),
            })
            .await
            .unwrap();
    }
    // The clients are deployed with a pinned key set (fetched once, with a certificate, as a
    // key directory does): they never ask any party for keys.
    let directory = c.named(&c.ca, "directory");
    let first_config = |addr| {
        let tls = directory.clone();
        async move {
            client::hpke_configs(&https(addr), Some(&tls))
                .await
                .unwrap()[0]
                .clone()
        }
    };
    let pinned = KeySet {
        epoch: 1,
        epoch_start: Time::from_secs(0),
        epoch_s: 86_400,
        shufflers: vec![
            (
                "shuffler-a".into(),
                first_config(c.first.local_addr()).await,
            ),
            (
                "shuffler-b".into(),
                first_config(c.second.local_addr()).await,
            ),
        ],
        leader: ("leader".into(), first_config(c.leader.local_addr()).await),
        helper: first_config(c.helper.local_addr()).await,
    };
    let endpoints = Endpoints {
        shuffler_url: https(c.first.local_addr()),
        keys: KeySource::Pinned(pinned),
        tls_ca: Some(c.ca.cert_pem().as_bytes().to_vec()),
    };
    let config = RuntimeConfig {
        tick: Duration::from_millis(20),
        max_jitter: Duration::from_millis(5),
        retry_initial: Duration::from_millis(20),
        ..RuntimeConfig::default()
    };
    let mut clients = Vec::new();
    for i in 0..20u64 {
        let client = HushClient::builder(endpoints.clone())
            .counter_task("errors", task.clone())
            .config(config.clone())
            .clock(clock.clone())
            .start()
            .await
            .unwrap();
        client.counter("errors").add(i % 3);
        clients.push(client);
    }
    mock.advance(60);
    for client in &clients {
        assert!(
            client.flush(Duration::from_secs(30)).await,
            "{:?}",
            client.stats()
        );
        assert_eq!(client.stats().accepted, 1);
    }
    let mut admin =
        client::admin(&https(c.leader.local_addr()), ADMIN_TOKEN, tools.as_ref()).unwrap();
    let start = std::time::Instant::now();
    loop {
        let s = admin
            .get_task_stats(pb::GetTaskStatsRequest {
                task_id: task.id().as_bytes().to_vec().into(),
            })
            .await
            .unwrap()
            .into_inner();
        if s.reports_aggregated == 20 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for client in clients {
        assert!(client.shutdown(Duration::from_secs(5)).await);
    }
    c.shutdown().await;
}

/// A results service (the tenant's key directory) whose `[tls] ca` trusts two operators' CAs.
/// Operator B, whose CA is in that bundle, runs a leader impostor with a certificate of its own
/// CA at the leader's address. Unpinned, the directory takes the impostor's key and would hand
/// it to every client (who would then seal the leader's share to operator B, which also holds
/// the helper's key: every report read). With `leader_ca` pinned to operator A's CA it refuses
/// the impostor and serves no key set; pinned, it still serves the real leader's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_directory_pinned_to_each_partys_ca_refuses_an_impostor_from_the_other_operator() {
    use hush_collector::{ResultsConfig, ResultsSecrets, ResultsService};
    let clock: Arc<dyn Clock> = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let c = TlsCluster::start(clock.clone()).await;
    let operator_b = DevCa::new("operator B's CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let both = format!("{}{}", c.ca.cert_pem(), operator_b.cert_pem());
    let a_ca = d.join("operator-a-ca.pem");
    std::fs::write(&a_ca, c.ca.cert_pem()).unwrap();
    // The impostor: a real leader, with a certificate of operator B's CA named "leader".
    let impostor_tls = tls_section(
        d,
        "impostor",
        &operator_b,
        &operator_b.issue("leader", &loopback_hosts()).unwrap(),
    );
    std::fs::write(d.join("ca.pem"), &both).unwrap();
    let impostor = Aggregator::start(
        Role::Leader,
        AggregatorConfig::from_toml(&format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ncache_mb = 16\n\
             [peers]\nshufflers = [\"shuffler-b\"]\ncollectors = [\"directory\"]\n\
             key_directories = [\"directory\"]\n\
             [leader]\nhelper_url = \"https://{}\"\n{impostor_tls}",
            d.join("impostor-data").display(),
            c.helper.local_addr(),
        ))
        .unwrap(),
        secrets(),
        clock.clone(),
    )
    .await
    .unwrap();
    // The tenant's certificate comes from operator A; it trusts both operators.
    let directory = tls_section(
        d,
        "directory",
        &c.ca,
        &c.ca.issue("directory", &loopback_hosts()).unwrap(),
    );
    std::fs::write(d.join("ca.pem"), &both).unwrap();
    let collector = HpkeKeypair::generate(1);
    let task = TaskConfig::new(task_params(MeasurementKind::Counter, &collector)).unwrap();
    let task_file = d.join("task.toml");
    std::fs::write(&task_file, toml::to_string(task.params()).unwrap()).unwrap();
    let start = |leader: std::net::SocketAddr, leader_ca: Option<&Path>, n: usize| {
        let pin = leader_ca
            .map(|p| format!("leader_ca = {:?}\n", p.display().to_string()))
            .unwrap_or_default();
        let config = ResultsConfig::from_toml(&format!(
            "tenant = \"acme\"\nlisten_grpc = \"127.0.0.1:0\"\nlisten_http = \"127.0.0.1:0\"\n\
             data_dir = \"{}\"\nleader_url = \"https://{leader}\"\n{pin}task_files = [{:?}]\n\
             {directory}\n\
             [cascade]\nshufflers = [\
             {{ name = \"shuffler-a\", url = \"https://{}\", max_wait_ms = 50 }}, \
             {{ name = \"shuffler-b\", url = \"https://{}\", max_wait_ms = 50 }}]\n\
             helper_url = \"https://{}\"\n",
            d.join(format!("results-{n}")).display(),
            task_file.display().to_string(),
            c.first.local_addr(),
            c.second.local_addr(),
            c.helper.local_addr(),
        ))
        .unwrap();
        let clock = clock.clone();
        async move {
            ResultsService::start(
                config,
                ResultsSecrets {
                    tenant_token: "t".into(),
                    collector_key: HpkeKeypair::generate(1),
                    api_token: None,
                    read_token: "r".into(),
                },
                clock,
            )
            .await
            .unwrap()
        }
    };
    // The key set a service's client gets, waiting up to `wait` for one.
    let key_set = |svc: &ResultsService, wait: Duration| {
        let url = format!("https://{}", svc.grpc_addr());
        let ca = c.ca.cert_pem().as_bytes().to_vec();
        async move {
            let begun = std::time::Instant::now();
            loop {
                let got = hush_client::fetch_key_set(&url, Some(&ca), Duration::from_secs(5)).await;
                if got.is_ok() || begun.elapsed() > wait {
                    return got.ok();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let issued = c.ca.issue("directory", &loopback_hosts()).unwrap();
    let trusting_both = server_auth_client(both.as_bytes())
        .identity(Identity::from_pem(issued.cert_pem, issued.key_pem));
    let key_of = |addr: std::net::SocketAddr| {
        let tls = trusting_both.clone();
        async move {
            client::hpke_configs(&https(addr), Some(&tls))
                .await
                .unwrap()[0]
                .clone()
        }
    };
    let impostor_key = key_of(impostor.local_addr()).await;

    // Unpinned: the impostor's key is what every client would seal the leader's share to.
    let open = start(impostor.local_addr(), None, 0).await;
    let set = key_set(&open, Duration::from_secs(20))
        .await
        .expect("a key set");
    assert_eq!(set.leader.1, impostor_key);
    open.shutdown().await.unwrap();

    // Pinned to operator A's CA: the impostor's certificate is refused, no key set is served.
    let pinned = start(impostor.local_addr(), Some(&a_ca), 1).await;
    assert!(
        key_set(&pinned, Duration::from_secs(3)).await.is_none(),
        "a pinned directory served a key set from an impostor"
    );
    pinned.shutdown().await.unwrap();

    // Pinned, against the real leader: its key is served.
    let real = start(c.leader.local_addr(), Some(&a_ca), 2).await;
    let set = key_set(&real, Duration::from_secs(20))
        .await
        .expect("a key set");
    assert_eq!(set.leader.1, key_of(c.leader.local_addr()).await);
    assert_ne!(set.leader.1, impostor_key);
    real.shutdown().await.unwrap();
    impostor.shutdown().await.unwrap();
    c.shutdown().await;
}
