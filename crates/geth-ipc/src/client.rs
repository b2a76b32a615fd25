//! The [`AdminApi`] trait and [`GethClient`], its implementation over jsonrpsee.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use jsonrpsee::core::client::{
    Client, ClientBuilder, ClientT, Error as RpcClientError, SubscriptionClientT,
    SubscriptionCloseReason,
};
use jsonrpsee::core::params::ArrayParams;
use jsonrpsee::http_client::{HttpClient, HttpClientBuilder};
use jsonrpsee::ws_client::WsClientBuilder;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use crate::endpoint::Endpoint;
use crate::enode::Enode;
use crate::error::{Error, Result};
use crate::ipc::{self, IpcError};
use crate::types::{NodeInfo, PeerEvent, PeerInfo};

/// A stream of peer events; see [`AdminApi::peer_events`].
pub type PeerEventStream = BoxStream<'static, Result<PeerEvent>>;

/// geth's admin API, as the sidecar uses it. [`GethClient`] implements it; with the
/// `test-utils` feature, `MockAdminApi` is a mockall mock of it, whose expectations
/// return plain values (`mock.expect_peers().returning(|| Ok(vec![]))`).
// automock must come before async_trait, so the mock sees `async fn`s.
#[cfg_attr(any(test, feature = "test-utils"), mockall::automock)]
#[async_trait::async_trait]
pub trait AdminApi: Send + Sync {
    /// `admin_nodeInfo`: the local node.
    async fn node_info(&self) -> Result<NodeInfo>;
    /// `admin_peers`: the connected peers, sorted by id.
    async fn peers(&self) -> Result<Vec<PeerInfo>>;
    /// `admin_addPeer`: adds to the static set (ignored when the id is already there:
    /// call [`AdminApi::remove_peer`] first to change a node's address). `true` only
    /// means the URL parsed; confirm the connection with [`AdminApi::peers`].
    async fn add_peer(&self, enode: &Enode) -> Result<bool>;
    /// `admin_removePeer`: removes from the static set by id and disconnects.
    async fn remove_peer(&self, enode: &Enode) -> Result<bool>;
    /// `admin_addTrustedPeer`: marks the id trusted (bypasses maxpeers); does not dial.
    async fn add_trusted_peer(&self, enode: &Enode) -> Result<bool>;
    /// `admin_removeTrustedPeer`: unmarks the id; does not disconnect.
    async fn remove_trusted_peer(&self, enode: &Enode) -> Result<bool>;
    /// A stream of peer events (admin_subscribe ["peerEvents"]). Ends with an Err item
    /// (ConnectionLost) when the connection drops (e.g. geth restarted); the caller
    /// resubscribes.
    async fn peer_events(&self) -> Result<PeerEventStream>;
    /// Increments every time a new connection to geth is established (1 after the
    /// first). Lets a caller detect that geth restarted (its static peer set is gone).
    fn connection_generation(&self) -> u64;
}

/// Time limits for [`GethClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// Limit for one call, from sending the request to the answer (default 10 s).
    pub request_timeout: Duration,
    /// Limit for establishing a connection (default 5 s).
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The largest HTTP/WS response accepted (geth's own limit is 25 MB).
const MAX_RESPONSE: u32 = 64 * 1024 * 1024;

/// One live connection. `Client` is jsonrpsee's async client (IPC and WS).
#[derive(Clone)]
enum Conn {
    Rpc(Arc<Client>),
    Http(Arc<HttpClient>),
}

impl Conn {
    fn is_alive(&self) -> bool {
        match self {
            Conn::Rpc(c) => c.is_connected(),
            Conn::Http(_) => true,
        }
    }

    fn same(&self, other: &Conn) -> bool {
        match (self, other) {
            (Conn::Rpc(a), Conn::Rpc(b)) => Arc::ptr_eq(a, b),
            (Conn::Http(a), Conn::Http(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

struct Inner {
    endpoint: Endpoint,
    options: ClientOptions,
    conn: Mutex<Option<Conn>>,
    generation: AtomicU64,
    /// HTTP only: no call has reached geth since the start or the last failure to
    /// reach it; the next successful call counts as a new connection.
    http_down: AtomicBool,
}

/// A client of geth's admin API over IPC, HTTP or WebSocket.
///
/// Cheap to clone (an `Arc` inside); clones share the connection. The connection
/// is opened by the first call and re-opened transparently by the call after one
/// that found it broken (geth restarted), which increments
/// [`AdminApi::connection_generation`]. Every call is bounded by
/// [`ClientOptions::request_timeout`].
///
/// Over HTTP there is no persistent connection: the generation increments at the
/// first call that reaches geth and at the first one after a call failed to reach
/// it, and [`AdminApi::peer_events`] is not supported.
#[derive(Clone)]
pub struct GethClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for GethClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GethClient")
            .field("endpoint", &self.inner.endpoint)
            .field("options", &self.inner.options)
            .field("generation", &self.connection_generation())
            .finish_non_exhaustive()
    }
}

impl GethClient {
    /// Does not connect: the first call connects (so a sidecar can start before
    /// geth's socket exists).
    pub fn new(endpoint: Endpoint, options: ClientOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                endpoint,
                options,
                conn: Mutex::new(None),
                generation: AtomicU64::new(0),
                http_down: AtomicBool::new(true),
            }),
        }
    }

    /// Connects now and fails fast with a clear error.
    ///
    /// Besides opening the connection this calls `admin_nodeInfo` once, so an HTTP or
    /// WS endpoint without the `admin` API is reported here, not at the first use.
    pub async fn connect(endpoint: Endpoint, options: ClientOptions) -> Result<Self> {
        let client = Self::new(endpoint, options);
        client.node_info().await?;
        Ok(client)
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// The time limits in force.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// The timeout given to jsonrpsee: a little longer than ours, so that ours (with
    /// the method name in the error) fires first.
    fn inner_timeout(&self) -> Duration {
        self.inner
            .options
            .request_timeout
            .saturating_add(Duration::from_secs(1))
    }

    /// The current connection, opening one if there is none or it broke.
    async fn conn(&self) -> Result<Conn> {
        let mut guard = self.inner.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.is_alive() {
                return Ok(c.clone());
            }
            tracing::debug!(endpoint = %self.inner.endpoint, "connection to geth closed; reconnecting");
        }
        *guard = None;
        let after = self.inner.options.connect_timeout;
        let conn = match tokio::time::timeout(after, self.open()).await {
            Ok(res) => res?,
            Err(_) => {
                return Err(Error::Timeout {
                    method: "connect".into(),
                    after,
                });
            }
        };
        if let Conn::Rpc(_) = conn {
            self.bump_generation();
        }
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn open(&self) -> Result<Conn> {
        let endpoint = &self.inner.endpoint;
        let connect_err = |e: RpcClientError| Error::Connect {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        };
        match endpoint {
            Endpoint::Ipc(path) => {
                let (sender, receiver) = ipc::connect(path)
                    .await
                    .map_err(|e| Error::from_ipc_connect(path, &e))?;
                let client = ClientBuilder::default()
                    .request_timeout(self.inner_timeout())
                    .build_with_tokio(sender, receiver);
                Ok(Conn::Rpc(Arc::new(client)))
            }
            Endpoint::Ws(url) => {
                let client = WsClientBuilder::default()
                    .request_timeout(self.inner_timeout())
                    .connection_timeout(self.inner.options.connect_timeout)
                    .max_response_size(MAX_RESPONSE)
                    .build(url)
                    .await
                    .map_err(connect_err)?;
                Ok(Conn::Rpc(Arc::new(client)))
            }
            Endpoint::Http(url) => {
                let client = HttpClientBuilder::default()
                    .request_timeout(self.inner_timeout())
                    .connect_timeout(self.inner.options.connect_timeout)
                    .max_response_size(MAX_RESPONSE)
                    .build(url)
                    .map_err(connect_err)?;
                Ok(Conn::Http(Arc::new(client)))
            }
        }
    }

    fn bump_generation(&self) {
        let generation = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::debug!(endpoint = %self.inner.endpoint, generation, "connected to geth");
    }

    /// Forgets `conn` if it is still the current connection, so the next call
    /// reconnects.
    async fn invalidate(&self, conn: &Conn) {
        let mut guard = self.inner.conn.lock().await;
        if guard.as_ref().is_some_and(|c| c.same(conn)) {
            tracing::debug!(endpoint = %self.inner.endpoint, "dropping broken connection to geth");
            *guard = None;
        }
    }

    /// Maps a jsonrpsee error; forgets the connection when it is broken.
    async fn fail(&self, method: &str, conn: &Conn, err: RpcClientError) -> Error {
        let mapped = map_rpc_error(
            method,
            &self.inner.endpoint,
            self.inner.options.request_timeout,
            err,
        );
        let broken = matches!(mapped, Error::ConnectionLost | Error::Connect { .. });
        match conn {
            Conn::Http(_) if broken => self.inner.http_down.store(true, Ordering::SeqCst),
            Conn::Http(_) => {}
            Conn::Rpc(_) if broken || !conn.is_alive() => self.invalidate(conn).await,
            Conn::Rpc(_) => {}
        }
        mapped
    }

    fn timeout_error(&self, method: &str) -> Error {
        Error::Timeout {
            method: method.to_owned(),
            after: self.inner.options.request_timeout,
        }
    }

    /// One call; if the reused connection turns out to be dead (geth restarted
    /// and the client had not noticed the close yet), once more on a fresh one.
    /// Every admin call is idempotent, so the retry is safe.
    async fn call<R: DeserializeOwned>(&self, method: &str, params: ArrayParams) -> Result<R> {
        match self.call_once(method, params.clone()).await {
            Err(Error::ConnectionLost) => self.call_once(method, params).await,
            other => other,
        }
    }

    async fn call_once<R: DeserializeOwned>(&self, method: &str, params: ArrayParams) -> Result<R> {
        let conn = self.conn().await?;
        let fut = async {
            match &conn {
                Conn::Rpc(c) => c.request::<R, _>(method, params).await,
                Conn::Http(c) => c.request::<R, _>(method, params).await,
            }
        };
        match tokio::time::timeout(self.inner.options.request_timeout, fut).await {
            Ok(Ok(r)) => {
                if let Conn::Http(_) = conn
                    && self.inner.http_down.swap(false, Ordering::SeqCst)
                {
                    self.bump_generation();
                }
                Ok(r)
            }
            Ok(Err(e)) => Err(self.fail(method, &conn, e).await),
            Err(_) => Err(self.timeout_error(method)),
        }
    }

    async fn enode_call(&self, method: &str, enode: &Enode) -> Result<bool> {
        self.call(method, params(&enode.to_string(), method)?).await
    }
}

fn params(arg: &str, method: &str) -> Result<ArrayParams> {
    let mut p = ArrayParams::new();
    p.insert(arg).map_err(|e| Error::InvalidResponse {
        method: method.to_owned(),
        reason: format!("cannot encode the parameters: {e}"),
    })?;
    Ok(p)
}

/// Maps jsonrpsee's error for `method` to ours.
fn map_rpc_error(method: &str, endpoint: &Endpoint, after: Duration, err: RpcClientError) -> Error {
    match err {
        RpcClientError::Call(obj) => Error::Rpc {
            code: obj.code(),
            message: obj.message().to_owned(),
        },
        RpcClientError::ParseError(e) => Error::InvalidResponse {
            method: method.to_owned(),
            reason: e.to_string(),
        },
        RpcClientError::RequestTimeout => Error::Timeout {
            method: method.to_owned(),
            after,
        },
        RpcClientError::RestartNeeded(cause) => match framing_error(&cause) {
            Some(reason) => Error::InvalidResponse {
                method: method.to_owned(),
                reason,
            },
            None => Error::ConnectionLost,
        },
        RpcClientError::Transport(e) => match endpoint {
            Endpoint::Http(url) => Error::Connect {
                endpoint: url.clone(),
                reason: error_chain(&*e),
            },
            _ => match e.downcast_ref::<IpcError>() {
                Some(IpcError::Framing(f)) => Error::InvalidResponse {
                    method: method.to_owned(),
                    reason: f.to_string(),
                },
                _ => Error::ConnectionLost,
            },
        },
        RpcClientError::ServiceDisconnect => Error::ConnectionLost,
        other => Error::InvalidResponse {
            method: method.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// The framing error that killed an IPC connection, if that is what happened.
fn framing_error(cause: &RpcClientError) -> Option<String> {
    match cause {
        RpcClientError::Transport(e) => match e.downcast_ref::<IpcError>() {
            Some(IpcError::Framing(f)) => Some(format!(
                "{f} (the connection was closed; the next call reconnects)"
            )),
            _ => None,
        },
        RpcClientError::RestartNeeded(inner) => framing_error(inner),
        _ => None,
    }
}

/// An error and its sources, `: `-separated (hyper hides the useful part in sources).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}

#[async_trait::async_trait]
impl AdminApi for GethClient {
    async fn node_info(&self) -> Result<NodeInfo> {
        self.call("admin_nodeInfo", ArrayParams::new()).await
    }

    async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.call("admin_peers", ArrayParams::new()).await
    }

    async fn add_peer(&self, enode: &Enode) -> Result<bool> {
        self.enode_call("admin_addPeer", enode).await
    }

    async fn remove_peer(&self, enode: &Enode) -> Result<bool> {
        self.enode_call("admin_removePeer", enode).await
    }

    async fn add_trusted_peer(&self, enode: &Enode) -> Result<bool> {
        self.enode_call("admin_addTrustedPeer", enode).await
    }

    async fn remove_trusted_peer(&self, enode: &Enode) -> Result<bool> {
        self.enode_call("admin_removeTrustedPeer", enode).await
    }

    async fn peer_events(&self) -> Result<PeerEventStream> {
        const METHOD: &str = "admin_subscribe";
        if !self.inner.endpoint.supports_subscriptions() {
            return Err(Error::Unsupported {
                what: "peer_events (admin_subscribe)",
                endpoint: self.inner.endpoint.to_string(),
                hint: "HTTP has no subscriptions: use the IPC socket or a ws:// endpoint, \
                       or poll admin_peers",
            });
        }
        let conn = self.conn().await?;
        let Conn::Rpc(client) = &conn else {
            return Err(Error::ConnectionLost);
        };
        let sub = client.subscribe::<serde_json::Value, _>(
            METHOD,
            params("peerEvents", METHOD)?,
            "admin_unsubscribe",
        );
        let sub = match tokio::time::timeout(self.inner.options.request_timeout, sub).await {
            Ok(Ok(sub)) => sub,
            Ok(Err(e)) => return Err(self.fail(METHOD, &conn, e).await),
            Err(_) => return Err(self.timeout_error(METHOD)),
        };
        // The stream keeps the client alive: dropping the last `Client` would stop
        // its background task and with it the subscription.
        let state = Some((sub, Arc::clone(client)));
        let stream = futures::stream::unfold(state, |state| async move {
            let (mut sub, client) = state?;
            match sub.next().await {
                Some(Ok(value)) => {
                    let item = serde_json::from_value::<PeerEvent>(value).map_err(|e| {
                        Error::InvalidResponse {
                            method: "admin_subscription".into(),
                            reason: format!("peer event: {e}"),
                        }
                    });
                    Some((item, Some((sub, client))))
                }
                Some(Err(e)) => {
                    let item = Err(Error::InvalidResponse {
                        method: "admin_subscription".into(),
                        reason: format!("peer event: {e}"),
                    });
                    Some((item, Some((sub, client))))
                }
                None => {
                    let err = match sub.close_reason() {
                        Some(SubscriptionCloseReason::Lagged) => Error::SubscriptionLagged,
                        _ => Error::ConnectionLost,
                    };
                    Some((Err(err), None))
                }
            }
        });
        Ok(stream.boxed())
    }

    fn connection_generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }
}
