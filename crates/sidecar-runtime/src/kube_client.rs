//! A Kubernetes client that speaks HTTP/2 to the apiserver.
//!
//! kube's stock client speaks HTTP/1.1 only: every request in flight holds a
//! connection of its own. The sidecar keeps two watches open (the registry,
//! the pods), so each write opened a third TLS connection, and a pod's first
//! registration waited on that handshake (30–40 ms on a busy node, on the
//! path to its first links). Over HTTP/2 (offered by ALPN, as kubectl and
//! client-go do) the watches and the writes share one connection. The stack
//! is kube's own otherwise: its retry of 429/503/504 (when
//! `Config::default_retry`), its TLS settings (CA file re-read on rotation,
//! client certificates, `tls-server-name`), authentication (bound tokens
//! refreshed from disk, exec plugins), base URI and extra headers. With a
//! proxy or a `tls-server-name` configured, kube's stock client is used.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt as _;
use tower::ServiceBuilder;

/// How often an idle HTTP/2 connection is pinged, and how long an answer may
/// take: a connection that died without a FIN (a node gone) fails every
/// watch and request on it within 50 s, and they reconnect.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A client for `config` that negotiates HTTP/2 (falling back to HTTP/1.1
/// where the server does not offer it).
///
/// ```no_run
/// # async fn doc() -> Result<(), kube::Error> {
/// let config = kube::Config::infer().await.expect("a kubeconfig or a service account");
/// let client = sidecar_runtime::kube_client(config)?;
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
pub fn kube_client(config: kube::Config) -> Result<kube::Client, kube::Error> {
    if config.proxy_url.is_some() || config.tls_server_name.is_some() {
        return kube::Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    let client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .http2_keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .build(connector);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(client);
    Ok(kube::Client::new(service, config.default_namespace))
}
