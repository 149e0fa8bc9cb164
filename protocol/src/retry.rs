//! The one retry policy of every hush sender — a client runtime uploading to the first shuffler,
//! a shuffler forwarding to the next hop, the leader driving a job at the helper: jittered
//! exponential backoff (backon's `ExponentialBuilder`), and a classification of the gRPC code
//! that failed the attempt.
//!
//! A **transient** failure (the peer is down, overloaded, timed out) is retried after the next
//! delay of the sequence: `initial`, doubling up to `max`, each with up to as much again of
//! random jitter so a fleet that failed together does not retry together. A **permanent** one
//! (wrong credentials, a certificate of another role, a request the peer will never take) is not
//! retried on that schedule: the sender holds what it could not deliver (dropping acknowledged
//! data is never the answer), waits the longest delay before trying again so that an operator's
//! fix takes effect without a restart, and the caller logs it at warn with [`what_to_fix`].
//!
//! Pure computation: the caller sleeps (and stops on shutdown).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tonic::Code;

/// Whether trying again can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The peer is down, overloaded or slow: try again soon.
    Transient,
    /// The peer refused what it will keep refusing until someone changes a configuration.
    Permanent,
}

/// How a failed call's gRPC `code` is treated.
pub fn classify(code: Code) -> Failure {
    match code {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented => Failure::Permanent,
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss => Failure::Transient,
    }
}

/// What an operator should check when a call keeps failing with `code`.
pub fn what_to_fix(code: Code) -> &'static str {
    match code {
        Code::Unauthenticated => {
            "the peer does not accept this sender's credentials: check the bearer token \
             (admin/peer token, tenant token) and that a client certificate is configured"
        }
        Code::PermissionDenied => {
            "the peer accepts the certificate but not for this service: check the peer's \
             [peers] names against this sender's certificate (hush certs issues one per role)"
        }
        Code::InvalidArgument | Code::OutOfRange => {
            "the peer refuses the request's contents: check that both sides run the same \
             protocol version and task configuration (packet size, route)"
        }
        Code::NotFound => {
            "the peer does not know the task: provision it there (hush task create) or fix the URL"
        }
        Code::AlreadyExists | Code::FailedPrecondition => {
            "the peer's state conflicts with the request: read the peer's log and message"
        }
        Code::Unimplemented => {
            "the URL points at a service of another kind or version: check the configured URL"
        }
        _ => "the peer is unavailable or overloaded: it is retried with backoff",
    }
}

/// Backoff settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First delay after a transient failure.
    pub initial: Duration,
    /// Longest delay (before jitter); also the wait after a permanent failure.
    pub max: Duration,
}

impl RetryPolicy {
    /// `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
        }
    }

    /// A fresh sequence of delays for one thing to deliver.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            policy: *self,
            inner: self.builder().build(),
        }
    }

    fn builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
    }
}

/// The delays of one delivery's attempts.
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    inner: ExponentialBackoff,
}

impl Backoff {
    /// How long to wait after an attempt failed with `code`, and whether the failure is
    /// permanent (the caller logs that at warn with [`what_to_fix`]).
    pub fn after(&mut self, code: Code) -> (Duration, Failure) {
        match classify(code) {
            Failure::Transient => (self.next_transient(), Failure::Transient),
            Failure::Permanent => (self.policy.max, Failure::Permanent),
        }
    }

    /// The next delay after a failure that is not a gRPC status (storage, a local error):
    /// treated as transient.
    pub fn next_transient(&mut self) -> Duration {
        self.inner.next().unwrap_or(self.policy.max)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.inner = self.policy.builder().build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_delays_grow_with_jitter_up_to_twice_the_max() {
        let p = RetryPolicy::new(Duration::from_millis(100), Duration::from_millis(800));
        let mut b = p.backoff();
        let d: Vec<Duration> = (0..8).map(|_| b.after(Code::Unavailable).0).collect();
        // Each delay is its step (100, 200, 400, 800, 800…) plus up to as much again.
        let steps = [100u64, 200, 400, 800, 800, 800, 800, 800];
        for (d, s) in d.iter().zip(steps) {
            let ms = d.as_millis() as u64;
            assert!((s..=2 * s).contains(&ms), "{ms} for step {s}");
        }
        // Not all equal to their step: jitter is on.
        assert!(d.iter().zip(steps).any(|(d, s)| d.as_millis() as u64 != s));
        b.reset();
        let first = b.after(Code::ResourceExhausted).0.as_millis() as u64;
        assert!((100..=200).contains(&first), "{first}");
    }

    #[test]
    fn permanent_failures_wait_the_longest_delay_and_say_what_to_fix() {
        let p = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut b = p.backoff();
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::NotFound,
        ] {
            assert_eq!(b.after(code), (Duration::from_secs(30), Failure::Permanent));
            assert!(
                !what_to_fix(code).contains("retried with backoff"),
                "{code:?}"
            );
        }
        for code in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Internal,
        ] {
            assert_eq!(classify(code), Failure::Transient, "{code:?}");
        }
        assert!(what_to_fix(Code::PermissionDenied).contains("[peers]"));
    }
}
