//! Where the client's keys come from: the channel to a server it trusts, fetching its tenant's
//! key set from the key directory, and the rule for taking a fresh set over the one it holds.

use std::time::Duration;

use hush_protocol::directory::KeySet;
use hush_protocol::link as tls;
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::key_directory_client::KeyDirectoryClient;
use tonic::transport::Channel;

use super::{Inner, RuntimeError};

pub(super) fn channel(
    url: &str,
    ca: Option<&[u8]>,
    timeout: Duration,
) -> Result<Channel, RuntimeError> {
    let tls = ca.map(tls::server_auth_client);
    Ok(tls::endpoint(url, tls.as_ref(), "endpoint")
        .map_err(|e| RuntimeError::Url {
            url: url.into(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Fetches the current key set from the key directory at `url`.
pub async fn fetch_key_set(
    url: &str,
    ca: Option<&[u8]>,
    timeout: Duration,
) -> Result<KeySet, RuntimeError> {
    let err = |status: String| RuntimeError::Keys {
        url: url.into(),
        status,
    };
    let set = KeyDirectoryClient::new(channel(url, ca, timeout)?)
        .get_key_set(pb::GetKeySetRequest {})
        .await
        .map_err(|s| err(s.message().to_owned()))?
        .into_inner();
    KeySet::try_from(&set).map_err(|e| err(e.to_string()))
}

/// Whether a client holding `cur` takes `fresh` from the directory at `now`: not a set of an
/// epoch that has not begun (beyond one epoch of clock skew), and not an ended epoch's set in
/// place of a current one. A directory can move clients forward, never pin them to a far-future
/// set or roll them back.
pub(super) fn should_adopt(cur: Option<&KeySet>, fresh: &KeySet, now: u64) -> bool {
    if fresh.epoch_start.as_secs() > now.saturating_add(fresh.epoch_s) {
        return false;
    }
    let ended = |k: &KeySet| k.epoch_start.as_secs().saturating_add(k.epoch_s) <= now;
    match cur {
        Some(c) if c == fresh => false,
        Some(c) if ended(fresh) && !ended(c) => false,
        _ => true,
    }
}

/// Takes a key set from the directory if [`should_adopt`] says so.
pub(super) fn adopt(inner: &Inner, fresh: KeySet) {
    let now = inner.clock.now().as_secs();
    let mut cur = inner.keys.write().unwrap_or_else(|p| p.into_inner());
    if should_adopt(cur.as_ref(), &fresh, now) {
        tracing::debug!(epoch = fresh.epoch, digest = %fresh.short_digest(), "using a new key set");
        *cur = Some(fresh);
    } else if cur.as_ref() != Some(&fresh) {
        tracing::warn!(
            offered = fresh.epoch,
            epoch_start = fresh.epoch_start.as_secs(),
            now,
            "the key directory offered a key set of an ended or a future epoch; keeping the current one"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hush_protocol::{HpkeKeypair, Time};

    fn set(epoch: u64) -> KeySet {
        KeySet {
            epoch,
            epoch_start: Time::from_secs(epoch * 600),
            epoch_s: 600,
            shufflers: vec![("a".into(), HpkeKeypair::generate(1).config().clone())],
            leader: ("leader".into(), HpkeKeypair::generate(2).config().clone()),
            helper: HpkeKeypair::generate(3).config().clone(),
        }
    }

    #[test]
    fn a_directory_moves_clients_forward_never_back_or_to_the_far_future() {
        let now = 10 * 600 + 5;
        let current = set(10);
        assert!(should_adopt(None, &current, now));
        assert!(!should_adopt(Some(&current), &current, now));
        // The next epoch (even a little early, within one epoch of skew).
        assert!(should_adopt(Some(&current), &set(11), now));
        // A rollback to an ended epoch, or a set from far ahead, is refused.
        assert!(!should_adopt(Some(&current), &set(9), now));
        assert!(!should_adopt(Some(&current), &set(12), now));
        assert!(!should_adopt(None, &set(u64::MAX / 600), now));
        // Another epoch length (the directory's key_epoch_s changed): the current set of it is
        // taken although its epoch number is smaller.
        let mut longer = set(0);
        longer.epoch = 1;
        longer.epoch_start = Time::from_secs(6_000);
        longer.epoch_s = 6_000;
        assert!(should_adopt(Some(&current), &longer, now));
        // With nothing current, even a stale set beats none (the parties keep old keys a while).
        assert!(should_adopt(None, &set(9), now));
    }
}
