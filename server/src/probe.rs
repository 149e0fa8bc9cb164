//! How operators and their load balancers probe a hush server: the standard gRPC health protocol
//! (`grpc.health.v1.Health`, what Kubernetes probes and `grpc_health_probe` speak) with a status
//! per service, and gRPC reflection (`grpcurl list`) unless the operator turns it off.
//!
//! Every service a server runs is SERVING while it runs. It goes NOT_SERVING when the process
//! starts to drain (SIGTERM or a shutdown call: `[server] drain_grace_ms` of NOT_SERVING before
//! the listener stops, so a balancer can move traffic away) and while its store cannot be
//! written (see [`Probes::store_written`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The health status of one server's services.
#[derive(Clone, Debug)]
pub struct Probes {
    reporter: HealthReporter,
    services: Arc<[String]>,
    draining: Arc<AtomicBool>,
    store_ok: Arc<AtomicBool>,
}

/// The health service and, when enabled, the reflection service of a server.
pub struct ProbeServices<H, R> {
    /// `grpc.health.v1.Health`.
    pub health: H,
    /// `grpc.reflection.v1.ServerReflection`, unless turned off.
    pub reflection: Option<R>,
}

impl Probes {
    /// Probes for `services` (their full gRPC names, e.g. `hush.v1.Admin`), all SERVING, and the
    /// services that serve them: health, and reflection over hush's and the health protocol's
    /// descriptors when `reflection` is on.
    pub async fn new(
        services: &[&str],
        reflection: bool,
    ) -> Result<
        (
            Self,
            ProbeServices<
                tonic_health::pb::health_server::HealthServer<
                    impl tonic_health::pb::health_server::Health,
                >,
                tonic_reflection::server::v1::ServerReflectionServer<
                    impl tonic_reflection::server::v1::ServerReflection,
                >,
            >,
        ),
        crate::ServerError,
    > {
        let (reporter, health) = tonic_health::server::health_reporter();
        let probes = Self {
            reporter,
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            draining: Arc::new(AtomicBool::new(false)),
            store_ok: Arc::new(AtomicBool::new(true)),
        };
        probes.publish().await;
        let reflection = if reflection {
            let mut b = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(hush_protocol::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health")
                .with_service_name("grpc.reflection.v1.ServerReflection");
            for s in services {
                b = b.with_service_name(*s);
            }
            Some(b.build_v1().map_err(|e| {
                crate::ServerError::Config(format!("building the reflection service: {e}"))
            })?)
        } else {
            None
        };
        Ok((probes, ProbeServices { health, reflection }))
    }

    async fn publish(&self) {
        let serving =
            !self.draining.load(Ordering::Relaxed) && self.store_ok.load(Ordering::Relaxed);
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        // "" is the whole server, as probes that name no service ask.
        self.reporter.set_service_status("", status).await;
        for s in self.services.iter() {
            self.reporter.set_service_status(s, status).await;
        }
    }

    /// The process is draining: every service NOT_SERVING from now on.
    pub async fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.publish().await;
    }

    /// Whether the last write to the store succeeded: a store that cannot be written makes
    /// every service NOT_SERVING until a write succeeds again.
    pub async fn store_written(&self, ok: bool) {
        if self.store_ok.swap(ok, Ordering::Relaxed) != ok {
            if !ok {
                tracing::error!("the store cannot be written: reporting NOT_SERVING");
            }
            self.publish().await;
        }
    }

    /// Resolves once `shutdown` turns true, after reporting NOT_SERVING for `grace_ms` (`[server]
    /// drain_grace_ms`): the signal a server's listener stops on.
    pub fn drain_signal(
        &self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        grace_ms: u64,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let probes = self.clone();
        async move {
            let _ = shutdown.wait_for(|v| *v).await;
            probes.draining().await;
            tokio::time::sleep(std::time::Duration::from_millis(grace_ms)).await;
        }
    }

    /// Whether every service is SERVING now.
    pub fn serving(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.store_ok.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_store_write_or_a_drain_stops_serving() {
        let (probes, services) = Probes::new(&["hush.v1.Admin"], false).await.unwrap();
        assert!(services.reflection.is_none());
        assert!(probes.serving());
        probes.store_written(false).await;
        assert!(!probes.serving());
        probes.store_written(true).await;
        assert!(probes.serving());
        probes.draining().await;
        assert!(!probes.serving());
        // A store that recovers does not undo a drain.
        probes.store_written(true).await;
        assert!(!probes.serving());
    }
}
