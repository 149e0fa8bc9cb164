//! Throughput of one shuffler process (peel + store + shuffle + forward) beside the raw HPKE-open
//! rate measured in the same run.
//!
//! `cargo bench -p hush-cli --bench shuffler_node [-- N1 N2 ...]`
//!
//! * Raw: `onion::peel` of default-size (4,096-byte) packets, on one thread and on every core
//!   (rayon), with nothing else: the bound for a node that must open every packet. Measured
//!   before the first row and after each row; a row is compared with the mean of the
//!   measurements just before and just after it, so a host whose speed drifts during the run
//!   moves both sides of the ratio (the drift column says how far apart the two were).
//! * Shared: a real `hush shuffler` process with sled in a temp dir forwards to a minimal ingest
//!   server in this process that only counts. Four submitters send batches of 500. Two rates:
//!   *all-in*, from the first submission until the last packet has reached the next hop; and
//!   *steady*, from when 10% of the packets had reached the next hop until 90% had. The all-in
//!   rate includes the start (the first batch must fill before anything leaves) and the last
//!   batch, which leaves only when it fills or after `max_wait_ms` (200 ms here): latency the
//!   operator sets, which a node that runs on pays once, not per packet. Peak resident memory
//!   (VmHWM) of the shuffler is read from /proc.
//!
//! The goal is node ≥ 0.8 × the raw open rate on all cores, in the steady state. The CPU time
//! the shuffler and this process used in the steady window is printed per packet beside the raw
//! peel's, and the raw peel's share of the node's (CPU).
//!
//! `cargo test` runs this file too (`test = true` in cli/Cargo.toml): without the `--bench` flag
//! that `cargo bench` passes, it runs the same measurement path once on a tiny N and checks that
//! every report arrived, so the bench cannot rot.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hush_protocol::onion::{self, Hop, Route};
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::leader_ingest_server::{LeaderIngest, LeaderIngestServer};
use hush_protocol::{HpkeKeypair, Keyring, MeasurementKind, TaskConfig};
use hush_tests::mixnet::{provision_shuffler, submit_packets};
use hush_tests::process::{HushProcess, cpu_seconds_of, thread_cpu_seconds};
use hush_tests::task_params;
use rayon::prelude::*;

/// Concurrent submitters, as several clients or a previous hop's parallel slices would be.
const SUBMITTERS: usize = 4;

/// Bytes of a Histogram(32) report, about what the innermost layer carries.
const REPORT_BYTES: usize = 1_500;

fn wrap_all(task: &TaskConfig, route: &Route, n: usize) -> Vec<pb::Packet> {
    (0..n)
        .into_par_iter()
        .map(|i| pb::Packet {
            task_id: task.id().as_bytes().to_vec().into(),
            data: onion::wrap(
                &task.id(),
                task.packet_size(),
                route,
                &[(i % 251) as u8; REPORT_BYTES],
            )
            .unwrap()
            .into(),
        })
        .collect()
}

/// Packets wrapped once for one hop and its key; [`Raw::rates`] times the peels alone.
struct Raw {
    task: TaskConfig,
    ring: Keyring,
    packets: Vec<pb::Packet>,
}

impl Raw {
    fn new(task: &TaskConfig, n: usize) -> Self {
        let key = HpkeKeypair::generate(1);
        let route = Route::new(
            vec![Hop {
                name: "s".into(),
                config: key.config().clone(),
            }],
            "leader",
        )
        .unwrap();
        Self {
            task: task.clone(),
            packets: wrap_all(task, &route, n),
            ring: Keyring::new(vec![key]),
        }
    }

    /// Packets per second on one thread and on every core, and the CPU µs per packet of the
    /// one thread (its CPU time, which a host taking the core away does not inflate).
    fn rates(&self) -> (f64, f64, f64) {
        let (task, size) = (self.task.id(), self.task.packet_size());
        let n = self.packets.len() as f64;
        let (start, cpu) = (Instant::now(), thread_cpu_seconds());
        for p in &self.packets {
            std::hint::black_box(onion::peel(&task, size, &self.ring, &p.data).unwrap());
        }
        let one = n / start.elapsed().as_secs_f64();
        let cpu_us = (thread_cpu_seconds() - cpu) * 1e6 / n;
        let start = Instant::now();
        self.packets.par_iter().for_each(|p| {
            std::hint::black_box(onion::peel(&task, size, &self.ring, &p.data).unwrap());
        });
        let all = n / start.elapsed().as_secs_f64();
        (one, all, cpu_us)
    }
}

#[derive(Clone, Default)]
struct CountingSink(Arc<AtomicU64>);

#[tonic::async_trait]
impl LeaderIngest for CountingSink {
    async fn submit_reports(
        &self,
        request: tonic::Request<pb::SubmitReportsRequest>,
    ) -> Result<tonic::Response<pb::SubmitReportsResponse>, tonic::Status> {
        let n = request.into_inner().reports.len() as u64;
        self.0.fetch_add(n, Ordering::Relaxed);
        Ok(tonic::Response::new(pb::SubmitReportsResponse {
            accepted: n,
            rejected: vec![],
        }))
    }
}

async fn run_node(task: &TaskConfig, n: usize) -> NodeRun {
    let sink = CountingSink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = listener.local_addr().unwrap();
    let svc = LeaderIngestServer::new(sink.clone()).max_decoding_message_size(64 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = format!(
        "name = \"shuffler-a\"\nlisten = \"{any}\"\ndata_dir = \"{}\"\ncache_mb = 64\n\
         [mix]\nbatch_size = 1000\nmin_batch_size = 100\nmax_wait_ms = 200\n\
         [limits]\nmax_buffered_packets = 20000\nper_source_packets_per_s = 1000000\nper_source_burst = 1000000\n\
         [[next_hop]]\nname = \"leader\"\nkind = \"leader\"\nurl = \"http://{sink_addr}\"\n",
        dir.path().join("data").display()
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_hush"));
    // Loopback only: the bench measures peeling and mixing, not TLS.
    let args = [
        "shuffler",
        "--config",
        &path.display().to_string(),
        "--insecure",
    ]
    .map(String::from)
    .to_vec();
    let mut node = HushProcess::spawn(bin, &args, &dir.path().join("log"));
    provision_shuffler(&node.url(), task).await;
    let key = hush_aggregator::client::hpke_configs(&node.url(), None)
        .await
        .unwrap()[0]
        .clone();
    let route = Route::new(
        vec![Hop {
            name: "shuffler-a".into(),
            config: key,
        }],
        "leader",
    )
    .unwrap();
    let packets = wrap_all(task, &route, n);

    let node_pid = node.pid().expect("the shuffler is running");
    let cpu = move || (cpu_seconds_of(node_pid), cpu_seconds_of(std::process::id()));
    // Marks the time and CPU when 10% and when 90% of the packets have reached the next hop.
    let steady = {
        let count = sink.0.clone();
        tokio::spawn(async move {
            let mut marks = Vec::new();
            for want in [n / 10, n - n / 10] {
                loop {
                    // One load, the time at once after it, then the CPU: the mark's count and
                    // time belong together.
                    let seen = count.load(Ordering::Relaxed);
                    let at = Instant::now();
                    if seen as usize >= want.max(1) {
                        marks.push((at, cpu(), seen));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            (marks[0], marks[1])
        })
    };
    let cpu_before = cpu();
    let start = Instant::now();
    let submitters: Vec<_> = packets
        .chunks(n.div_ceil(SUBMITTERS))
        .map(|part| {
            let (part, url) = (part.to_vec(), node.url());
            tokio::spawn(async move { submit_packets(&url, &part, 500).await })
        })
        .collect();
    let mut accepted = 0;
    for s in submitters {
        accepted += s.await.unwrap().accepted;
    }
    assert_eq!(accepted as usize, n);
    while (sink.0.load(Ordering::Relaxed) as usize) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_in = n as f64 / start.elapsed().as_secs_f64();
    let cpu_after = cpu();
    let ((t10, cpu10, n10), (t90, cpu90, n90)) = steady.await.unwrap();
    let mem = node.peak_rss_mib();
    node.terminate();
    // The sink counts whole requests, so the window's packets are what it counted in between.
    // On a tiny N (under `cargo test`) one request can cross both marks: then the window is the
    // whole run, and the row says so.
    let steady = n90 > n10 && t90 > t10;
    let (rate, window_cpu, packets) = if steady {
        let packets = (n90 - n10) as f64;
        (packets / (t90 - t10).as_secs_f64(), (cpu10, cpu90), packets)
    } else {
        (all_in, (cpu_before, cpu_after), n as f64)
    };
    NodeRun {
        all_in,
        steady,
        rate,
        mem,
        node_us: (window_cpu.1.0 - window_cpu.0.0) * 1e6 / packets,
        bench_us: (window_cpu.1.1 - window_cpu.0.1) * 1e6 / packets,
    }
}

struct NodeRun {
    /// Packets per second from the first submission until the last packet arrived.
    all_in: f64,
    /// Whether `rate` is the steady one; false when one request crossed both marks.
    steady: bool,
    /// Packets per second between 10% and 90% arrived (or all-in, if not `steady`).
    rate: f64,
    mem: f64,
    /// CPU time per packet in the steady window, in µs: the shuffler, and this process (the
    /// submitters and the counting next hop).
    node_us: f64,
    bench_us: f64,
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = match (bench, sizes.is_empty()) {
        (true, true) => vec![20_000, 80_000],
        (true, false) => sizes,
        // Under `cargo test`: the measurement path on a tiny N.
        (false, _) => vec![300],
    };
    let raw_n = if bench { 5_000 } else { 100 };
    let task = TaskConfig::new(task_params(
        MeasurementKind::EventHistogram,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let raw = Raw::new(&task, raw_n);
    let (one, all, cpu_us) = raw.rates();
    println!("packet size {} bytes", task.packet_size());
    println!(
        "raw HPKE open (onion::peel): {one:.0} packets/s on one thread, {all:.0} packets/s on all cores"
    );
    println!("raw peel: {cpu_us:.1} µs of CPU per packet");
    println!(
        "each row against the raw rates measured just before and just after it (their mean; drift = \
         how far apart the all-core ones were); CPU = raw µs per packet / the node's CPU µs per packet"
    );
    println!(
        "{:>8} {:>13} {:>13} {:>10} {:>6} {:>14} {:>14} {:>14} {:>5} {:>12} {:>24}",
        "packets",
        "all-in pkt/s",
        "steady pkt/s",
        "raw all/s",
        "drift",
        "steady/raw 1",
        "all-in/raw all",
        "steady/raw all",
        "CPU",
        "peak RSS",
        "CPU µs/packet: node+bench"
    );
    let mut before = (one, all, cpu_us);
    for n in sizes {
        let r = rt.block_on(run_node(&task, n));
        let after = raw.rates();
        let mean = |a: f64, b: f64| (a + b) / 2.0;
        let (one, all) = (mean(before.0, after.0), mean(before.1, after.1));
        println!(
            "{n:>8} {:>13.0} {:>13.0} {:>10.0} {:>5.0}% {:>13.2}x {:>13.2}x {:>13.2}x {:>5.2} {:>8.1} MiB {:>12.0} = {:.0}+{:.0}",
            r.all_in,
            r.rate,
            all,
            (before.1 - after.1).abs() / all * 100.0,
            r.rate / one,
            r.all_in / all,
            r.rate / all,
            mean(before.2, after.2) / r.node_us,
            r.mem,
            r.node_us + r.bench_us,
            r.node_us,
            r.bench_us
        );
        if !r.steady {
            println!("         (one request crossed both marks: the steady columns are all-in)");
        }
        before = after;
    }
    println!(
        "raw after the runs: {:.0} packets/s on one thread, {:.0} on all cores",
        before.0, before.1
    );
}
