//! gRPC clients for operators' tools: the admin API and HPKE config discovery.

use hush_protocol::HpkeConfig;
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::admin_client::AdminClient;
use hush_protocol::proto::v1::hpke_keys_client::HpkeKeysClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::error::{Error, Result};
use hush_protocol::link::AddBearer;

/// An admin client that sends the admin bearer token.
pub type Admin = AdminClient<InterceptedService<Channel, AddBearer>>;

/// A channel to `url`, connected lazily: `https://host:port` with `tls` (see
/// [`hush_protocol::link`]), `http://host:port` without.
pub fn channel(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel> {
    Ok(hush_protocol::link::channel(url, tls, "URL")?)
}

/// An admin client for the aggregator at `url`.
pub fn admin(url: &str, token: &str, tls: Option<&ClientTlsConfig>) -> Result<Admin> {
    let auth = AddBearer::new(token).map_err(|e| Error::config(e.message().to_owned()))?;
    Ok(AdminClient::with_interceptor(channel(url, tls)?, auth))
}

/// Fetches the HPKE configs a shuffler or aggregator publishes, current first.
pub async fn hpke_configs(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Vec<HpkeConfig>> {
    let mut c = HpkeKeysClient::new(channel(url, tls)?);
    let list = c
        .get_hpke_configs(pb::GetHpkeConfigsRequest {})
        .await?
        .into_inner();
    Vec::<HpkeConfig>::try_from(&list).map_err(|e| Error::InvalidRequest(e.to_string()))
}
