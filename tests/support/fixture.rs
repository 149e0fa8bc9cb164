//! A task with real keys for every party, without servers.
//!
//! [`Fixture`] provisions one task with real keys: two aggregators, a cascade of shufflers and a
//! collector, plus the client's report path for it. Its helpers run the real protocol code in
//! process (peeling, opening, Prio3 verification between the two aggregators); tests that need
//! servers start them on top of the same fixture.

use hush_client::ClientTask;
use hush_protocol::onion::{self, Hop, NextHop, OnionError, Route};
use hush_protocol::task::log_spaced_bounds;
use hush_protocol::vdaf::{OutputShare, VdafError};
use hush_protocol::{
    Codec, Epsilon, HpkeKeypair, Keyring, MeasurementKind, Report, Role, TaskConfig, TaskId,
    TaskParams, VerifyKey,
};

/// One task with every party's keys.
#[derive(Debug)]
pub struct Fixture {
    /// The task.
    pub task: TaskConfig,
    /// The leader's keys.
    pub leader_keys: Keyring,
    /// The helper's keys.
    pub helper_keys: Keyring,
    /// Each shuffler's keys, in route order.
    pub shuffler_keys: Vec<Keyring>,
    /// The collector's key pair.
    pub collector_key: HpkeKeypair,
    /// The Prio3 verification key the aggregators share.
    pub verify_key: VerifyKey,
    /// The client's report path.
    pub client: ClientTask,
}

/// Task parameters used by the tests: 32 log-spaced buckets from 1 ms to 10 s.
pub fn task_params(kind: MeasurementKind, collector: &HpkeKeypair) -> TaskParams {
    TaskParams {
        task_id: TaskId::random(),
        tenant: "acme".into(),
        name: format!("test {kind:?}"),
        kind,
        bucket_bounds_us: if kind == MeasurementKind::Counter {
            vec![]
        } else {
            log_spaced_bounds(1_000, 10_000_000, 32)
        },
        contribution_bound: 20,
        clip_contributions: false,
        time_precision_s: 60,
        min_batch_size: 10,
        epsilon_per_collection: Epsilon::from_micros(1_000_000),
        epsilon_budget: Epsilon::from_micros(10_000_000),
        report_expiry_s: 3_600,
        packet_size: 4_096,
        collector_hpke_config: collector.config().clone(),
        alert_budget_percent: 70,
        retention_s: 86_400,
        count_epsilon_percent: 10,
        max_collections_per_batch: 0,
    }
}

/// A copy of `task` under a fresh id for another `tenant`.
pub fn for_tenant(task: &TaskConfig, tenant: &str) -> TaskConfig {
    let mut p = task.params().clone();
    p.task_id = TaskId::random();
    p.tenant = tenant.into();
    TaskConfig::new(p).expect("a valid task")
}

impl Fixture {
    /// A task of `kind` routed through `shufflers` shufflers.
    pub fn new(kind: MeasurementKind, shufflers: usize) -> Self {
        let collector_key = HpkeKeypair::generate(1);
        let task = TaskConfig::new(task_params(kind, &collector_key)).expect("valid test task");
        Self::with_task(task, collector_key, shufflers)
    }

    /// A fixture around a given task.
    pub fn with_task(task: TaskConfig, collector_key: HpkeKeypair, shufflers: usize) -> Self {
        let leader = HpkeKeypair::generate(1);
        let helper = HpkeKeypair::generate(1);
        let shuffler_keys: Vec<Keyring> = (0..shufflers)
            .map(|i| Keyring::new(vec![HpkeKeypair::generate(10 + i as u8)]))
            .collect();
        let hops = shuffler_keys
            .iter()
            .enumerate()
            .map(|(i, k)| Hop {
                name: format!("shuffler-{i}"),
                config: k.keys()[0].config().clone(),
            })
            .collect();
        let route = Route::new(hops, "leader").expect("valid route");
        let client = ClientTask::new(
            task.clone(),
            leader.config().clone(),
            helper.config().clone(),
            route,
        )
        .expect("report fits the packet");
        Self {
            task,
            leader_keys: Keyring::new(vec![leader]),
            helper_keys: Keyring::new(vec![helper]),
            shuffler_keys,
            collector_key,
            verify_key: VerifyKey::random(),
            client,
        }
    }

    /// Peels every layer of `packet` as the shufflers would, checking each hop's next-hop name,
    /// and returns the report bytes the leader receives.
    pub fn peel_all(&self, packet: &[u8]) -> Result<Vec<u8>, OnionError> {
        let mut p = packet.to_vec();
        let n = self.shuffler_keys.len();
        for (i, keys) in self.shuffler_keys.iter().enumerate() {
            let peeled = onion::peel(&self.task.id(), self.task.packet_size(), keys, &p)?;
            let expect = if i + 1 < n {
                NextHop::Shuffler(format!("shuffler-{}", i + 1))
            } else {
                NextHop::Leader("leader".into())
            };
            assert_eq!(peeled.next_hop, expect, "hop {i} names the wrong next hop");
            p = peeled.payload;
        }
        Ok(p)
    }

    /// Runs both aggregators' side of Prio3 verification for one report, in process, with their
    /// own keys: open, `verify_init` at each, the helper combines the verifier shares, both
    /// finish.
    pub fn verify(&self, report: &Report) -> Result<(OutputShare, OutputShare), Failure> {
        let vdaf = self.client.vdaf();
        let leader_share = report
            .open_share(Role::Leader, &self.leader_keys)
            .map_err(|_| Failure::Decrypt)?;
        let helper_share = report
            .open_share(Role::Helper, &self.helper_keys)
            .map_err(|_| Failure::Decrypt)?;
        let (ls, lv) = vdaf
            .verify_init(
                &self.verify_key,
                Role::Leader,
                report.report_id(),
                report.public_share(),
                &leader_share,
            )
            .map_err(Failure::Vdaf)?;
        let (hs, hv) = vdaf
            .verify_init(
                &self.verify_key,
                Role::Helper,
                report.report_id(),
                report.public_share(),
                &helper_share,
            )
            .map_err(Failure::Vdaf)?;
        let msg = vdaf
            .verifier_message(&hs, &lv, &hv)
            .map_err(Failure::Vdaf)?;
        let l = vdaf.verify_finish(ls, &msg).map_err(Failure::Vdaf)?;
        let h = vdaf.verify_finish(hs, &msg).map_err(Failure::Vdaf)?;
        Ok((l, h))
    }

    /// Decodes the report bytes the leader received.
    pub fn decode_report(&self, bytes: &[u8]) -> Report {
        Report::from_bytes(bytes).expect("report decodes")
    }
}

/// Why in-process verification refused a report.
#[derive(Debug)]
pub enum Failure {
    /// An input share did not open.
    Decrypt,
    /// Prio3 refused it.
    Vdaf(VdafError),
}

/// A key set of fresh keys for one shuffler, the leader and the helper, as a client pins it: for
/// client tests that never upload (nothing holds the private keys).
pub fn pinned_key_set() -> hush_protocol::directory::KeySet {
    let key = |id| HpkeKeypair::generate(id).config().clone();
    hush_protocol::directory::KeySet {
        epoch: 1,
        epoch_start: hush_protocol::Time::from_secs(0),
        epoch_s: 86_400,
        shufflers: vec![("shuffler-a".into(), key(1))],
        leader: ("leader".into(), key(2)),
        helper: key(3),
    }
}

/// An address nothing listens on (bound, then released).
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
