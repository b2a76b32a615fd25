//! GethClient over IPC against a scripted fake geth on a Unix socket in a tempdir:
//! out-of-order and coalesced/split responses, huge messages, garbage, reconnects,
//! subscriptions, timeouts, RPC errors and socket errors.

#![cfg(feature = "client")]
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use geth_ipc::{AdminApi, ClientOptions, Endpoint, Enode, Error, GethClient, PeerEventKind};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const KEY: &str = "6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0";

fn enode() -> Enode {
    format!("enode://{KEY}@127.0.0.1:30303").parse().unwrap()
}

fn node_id() -> String {
    enode().node_id().to_string()
}

fn node_info_json() -> Value {
    json!({
        "id": node_id(),
        "name": "Geth/v1.17.5-stable/linux-amd64/go1.24.2",
        "enode": format!("enode://{KEY}@127.0.0.1:30391?discport=0"),
        "enr": "enr:-abc",
        "ip": "127.0.0.1",
        "ports": {"discovery": 0, "listener": 30391},
        "listenAddr": "[::]:30391",
        "protocols": {"eth": {"network": 1337}}
    })
}

fn peer_json(name: &str) -> Value {
    json!({
        "enode": format!("enode://{KEY}@10.0.0.7:30303"),
        "id": node_id(),
        "name": name,
        "caps": ["eth/68"],
        "network": {"localAddress": "10.0.0.6:1", "remoteAddress": "10.0.0.7:30303",
                    "inbound": false, "trusted": false, "static": true},
        "protocols": {"eth": "handshake"}
    })
}

fn reply(req: &Value, result: Value) -> Vec<u8> {
    let mut v =
        serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": req["id"], "result": result})).unwrap();
    v.push(b'\n');
    v
}

fn fast() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
    }
}

/// What the fake does for one request.
enum Action {
    Send(Vec<u8>),
    Close,
}

/// A fake geth: for each request on connection number `conn`, `script` returns what
/// to do. Requests are decoded as a JSON stream, like geth does.
struct FakeGeth {
    _dir: tempfile::TempDir,
    path: PathBuf,
    connections: Arc<AtomicUsize>,
}

impl FakeGeth {
    fn start<F>(script: F) -> Self
    where
        F: Fn(usize, &Value) -> Vec<Action> + Send + Sync + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("geth.ipc");
        let listener = UnixListener::bind(&path).unwrap();
        let script = Arc::new(script);
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let script = script.clone();
                tokio::spawn(serve(stream, n, script));
            }
        });
        Self {
            _dir: dir,
            path,
            connections,
        }
    }

    fn client(&self, options: ClientOptions) -> GethClient {
        GethClient::new(Endpoint::Ipc(self.path.clone()), options)
    }
}

async fn serve<F>(mut stream: UnixStream, conn: usize, script: Arc<F>)
where
    F: Fn(usize, &Value) -> Vec<Action> + Send + Sync + 'static,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut requests = Vec::new();
        let consumed = {
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            loop {
                match it.next() {
                    Some(Ok(v)) => requests.push(v),
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => panic!("fake geth got bad JSON: {e}"),
                    None => break,
                }
            }
            it.byte_offset()
        };
        buf.drain(..consumed);
        for req in requests {
            for action in script(conn, &req) {
                match action {
                    Action::Send(bytes) => {
                        if stream.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Action::Close => return,
                }
            }
        }
    }
}

#[tokio::test]
async fn concurrent_calls_get_their_own_answers_when_geth_answers_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("geth.ipc");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        // Collect three requests, then answer in reverse order, all in one buffer
        // written in odd-sized pieces so messages are both split and coalesced.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let requests: Vec<Value> = loop {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
            let vals: Vec<Value> = serde_json::Deserializer::from_slice(&buf)
                .into_iter::<Value>()
                .filter_map(Result::ok)
                .collect();
            if vals.len() == 3 {
                break vals;
            }
        };
        let mut out = Vec::new();
        for req in requests.iter().rev() {
            let result = match req["method"].as_str().unwrap() {
                "admin_nodeInfo" => node_info_json(),
                "admin_peers" => json!([peer_json("a"), peer_json("b")]),
                "admin_addPeer" => {
                    assert_eq!(req["params"][0], enode().to_string());
                    json!(true)
                }
                m => panic!("unexpected {m}"),
            };
            out.extend(reply(req, result));
        }
        for piece in out.chunks(7) {
            stream.write_all(piece).await.unwrap();
            stream.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        // Keep the connection open until the client is done.
        let _ = stream.read(&mut chunk).await;
    });

    let client = GethClient::new(Endpoint::Ipc(path), ClientOptions::default());
    assert_eq!(client.connection_generation(), 0, "new() must not connect");
    let e = enode();
    let (info, peers, added) =
        tokio::join!(client.node_info(), client.peers(), client.add_peer(&e));
    let info = info.unwrap();
    assert_eq!(info.id, e.node_id());
    assert_eq!(info.listen_addr.as_deref(), Some("[::]:30391"));
    let peers = peers.unwrap();
    assert_eq!(
        peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(!peers[0].eth_ready());
    assert!(added.unwrap());
    assert_eq!(client.connection_generation(), 1);
}

#[tokio::test]
async fn a_huge_answer_arrives_whole() {
    let fake = FakeGeth::start(|_, req| {
        // ~20 MB: 2000 peers with 10 kB names.
        let peers: Vec<Value> = (0..2000)
            .map(|i| peer_json(&format!("{i}-{}", "n".repeat(10_000))))
            .collect();
        vec![Action::Send(reply(req, Value::Array(peers)))]
    });
    let client = fake.client(ClientOptions {
        request_timeout: Duration::from_secs(30),
        ..ClientOptions::default()
    });
    let peers = client.peers().await.unwrap();
    assert_eq!(peers.len(), 2000);
    assert!(peers[1999].name.starts_with("1999-nnn"));
}

#[tokio::test]
async fn garbage_gives_an_error_and_the_next_call_reconnects() {
    let fake = FakeGeth::start(|conn, req| {
        if conn == 1 {
            vec![Action::Send(b"this is not json\n".to_vec())]
        } else {
            vec![Action::Send(reply(req, node_info_json()))]
        }
    });
    let client = fake.client(fast());
    let err = client.node_info().await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidResponse { .. } | Error::ConnectionLost),
        "{err:?}"
    );
    assert!(err.to_string().contains("garbage"), "{err}");
    let info = client.node_info().await.unwrap();
    assert_eq!(info.id, enode().node_id());
    assert_eq!(client.connection_generation(), 2);
    assert_eq!(fake.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn geth_restart_is_transparent_to_the_next_call_and_bumps_the_generation() {
    let fake = FakeGeth::start(|_, req| {
        // Every connection answers once, then closes (like geth stopping).
        vec![Action::Send(reply(req, node_info_json())), Action::Close]
    });
    let client = fake.client(fast());
    client.node_info().await.unwrap();
    assert_eq!(client.connection_generation(), 1);
    // Straight away, whether or not the client has noticed the close yet.
    client.node_info().await.unwrap();
    assert_eq!(client.connection_generation(), 2);
    // Clones share the connection and the generation.
    let clone = client.clone();
    assert_eq!(clone.connection_generation(), 2);
}

#[tokio::test]
async fn a_call_whose_connection_dies_is_retried_once_on_a_fresh_connection() {
    let fake = FakeGeth::start(|conn, req| {
        if conn == 1 {
            vec![Action::Close]
        } else {
            vec![Action::Send(reply(req, json!([])))]
        }
    });
    let client = fake.client(fast());
    assert!(client.peers().await.unwrap().is_empty());
    assert_eq!(client.connection_generation(), 2);
}

#[tokio::test]
async fn a_call_is_connection_lost_when_the_retry_dies_too() {
    let fake = FakeGeth::start(|_, _| vec![Action::Close]);
    let client = fake.client(fast());
    let err = client.peers().await.unwrap_err();
    assert!(matches!(err, Error::ConnectionLost), "{err:?}");
    assert_eq!(err.kind(), "connection_lost");
    assert_eq!(client.connection_generation(), 2, "exactly one retry");
}

#[tokio::test]
async fn peer_events_stream_then_connection_lost() {
    let fake = FakeGeth::start(|_, req| {
        assert_eq!(req["method"], "admin_subscribe");
        assert_eq!(req["params"], json!(["peerEvents"]));
        let note = |result: Value| {
            let mut v = serde_json::to_vec(&json!({
                "jsonrpc": "2.0", "method": "admin_subscription",
                "params": {"subscription": "0xcd0c3e8af590364c09d0fa6a1210faf5", "result": result}
            }))
            .unwrap();
            v.push(b'\n');
            Action::Send(v)
        };
        vec![
            Action::Send(reply(req, json!("0xcd0c3e8af590364c09d0fa6a1210faf5"))),
            note(
                json!({"type": "add", "peer": node_id(), "local": "127.0.0.1:30391", "remote": "127.0.0.1:40000"}),
            ),
            note(json!({"type": "drop", "peer": node_id(), "error": "genesis mismatch"})),
            note(json!({"type": "add"})),
            Action::Close,
        ]
    });
    let client = fake.client(fast());
    let mut events = client.peer_events().await.unwrap();
    let add = events.next().await.unwrap().unwrap();
    assert_eq!(add.kind, PeerEventKind::Add);
    assert_eq!(add.peer, enode().node_id());
    let drop = events.next().await.unwrap().unwrap();
    assert_eq!(drop.kind, PeerEventKind::Drop);
    assert_eq!(drop.error.as_deref(), Some("genesis mismatch"));
    let bad = events.next().await.unwrap().unwrap_err();
    assert_eq!(bad.kind(), "invalid_response");
    let end = events.next().await.unwrap().unwrap_err();
    assert!(matches!(end, Error::ConnectionLost), "{end:?}");
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn a_silent_geth_times_out_naming_the_method() {
    let fake = FakeGeth::start(|_, _| Vec::new());
    let client = fake.client(ClientOptions {
        request_timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    });
    let started = std::time::Instant::now();
    let err = client.peers().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    match &err {
        Error::Timeout { method, after } => {
            assert_eq!(method, "admin_peers");
            assert_eq!(*after, Duration::from_millis(200));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("admin_peers"));
}

#[tokio::test]
async fn a_late_answer_after_a_timeout_does_not_break_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("geth.ipc");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut read, write) = stream.into_split();
        let write = Arc::new(tokio::sync::Mutex::new(write));
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = read.read(&mut chunk).await.unwrap();
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            let mut reqs = Vec::new();
            while let Some(Ok(v)) = it.next() {
                reqs.push(v);
            }
            let used = it.byte_offset();
            buf.drain(..used);
            for req in reqs {
                let write = write.clone();
                tokio::spawn(async move {
                    // admin_peers answers late, after the client gave up.
                    let (delay, result) = if req["method"] == "admin_peers" {
                        (400, json!([]))
                    } else {
                        (0, node_info_json())
                    };
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let _ = write.lock().await.write_all(&reply(&req, result)).await;
                });
            }
        }
    });
    let client = GethClient::new(
        Endpoint::Ipc(path),
        ClientOptions {
            request_timeout: Duration::from_millis(200),
            ..ClientOptions::default()
        },
    );
    let err = client.peers().await.unwrap_err();
    assert_eq!(err.kind(), "timeout");
    tokio::time::sleep(Duration::from_millis(400)).await; // the late answer arrives
    client.node_info().await.unwrap();
    client.node_info().await.unwrap();
    assert_eq!(
        client.connection_generation(),
        1,
        "the late answer must not kill the connection"
    );
}

#[tokio::test]
async fn rpc_errors_come_back_with_geths_code_and_message() {
    let fake = FakeGeth::start(|_, req| {
        let mut v = serde_json::to_vec(&json!({
            "jsonrpc": "2.0", "id": req["id"],
            "error": {"code": -32000, "message": "invalid enode: missing port"}
        }))
        .unwrap();
        v.push(b'\n');
        vec![Action::Send(v)]
    });
    let client = fake.client(fast());
    let err = client.add_trusted_peer(&enode()).await.unwrap_err();
    match &err {
        Error::Rpc { code, message } => {
            assert_eq!(*code, -32000);
            assert_eq!(message, "invalid enode: missing port");
        }
        other => panic!("{other:?}"),
    }
    // An RPC error does not drop the connection.
    let _ = client.remove_trusted_peer(&enode()).await;
    assert_eq!(client.connection_generation(), 1);
}

#[tokio::test]
async fn a_wrongly_shaped_answer_is_invalid_response() {
    let fake = FakeGeth::start(|_, req| vec![Action::Send(reply(req, json!({"id": 5})))]);
    let client = fake.client(fast());
    let err = client.peers().await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidResponse { method, .. } if method == "admin_peers"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_missing_socket_names_the_path_and_connect_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope").join("geth.ipc");
    let client = GethClient::new(Endpoint::Ipc(path.clone()), fast());
    let err = client.node_info().await.unwrap_err();
    assert!(
        matches!(&err, Error::SocketMissing { path: p } if *p == path),
        "{err:?}"
    );
    assert!(err.to_string().contains(&path.display().to_string()));
    assert_eq!(client.connection_generation(), 0);
    let err = GethClient::connect(Endpoint::Ipc(path), fast())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "socket_missing");
}

#[tokio::test]
async fn a_stale_socket_file_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("geth.ipc");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let err = GethClient::new(Endpoint::Ipc(path.clone()), fast())
        .peers()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "connect", "{err:?}");
    assert!(err.to_string().contains("stale socket"), "{err}");
}

/// geth creates its socket 0600. Root bypasses file permissions, so when the tests
/// run as root (as in CI containers) connecting succeeds and only the error mapping
/// can be checked (see `Error::from_ipc_connect` and the unit test in error.rs).
#[tokio::test]
async fn a_socket_without_permission_names_the_path_and_the_uid_rule() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let fake = FakeGeth::start(|_, req| vec![Action::Send(reply(req, node_info_json()))]);
    std::fs::set_permissions(&fake.path, std::fs::Permissions::from_mode(0o000)).unwrap();
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    let result = fake.client(fast()).node_info().await;
    if euid == 0 {
        assert!(result.is_ok(), "root ignores the socket's mode: {result:?}");
        let err = Error::from_ipc_connect(
            &fake.path,
            &std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(err.to_string().contains(&fake.path.display().to_string()));
        assert!(err.to_string().contains("0600"));
    } else {
        let err = result.unwrap_err();
        assert!(
            matches!(&err, Error::PermissionDenied { path } if *path == fake.path),
            "{err:?}"
        );
        assert!(err.to_string().contains("0600"));
    }
}

#[tokio::test]
async fn peer_events_over_http_is_a_clear_error() {
    let client = GethClient::new(
        "http://127.0.0.1:9".parse().unwrap(),
        ClientOptions::default(),
    );
    let err = match client.peer_events().await {
        Err(e) => e,
        Ok(_) => panic!("HTTP cannot subscribe"),
    };
    assert_eq!(err.kind(), "unsupported");
    assert!(
        err.to_string().contains("HTTP has no subscriptions"),
        "{err}"
    );
}

#[tokio::test]
async fn http_to_a_closed_port_is_a_connect_error() {
    // Bind then drop to get a port that nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = GethClient::new(format!("http://127.0.0.1:{port}").parse().unwrap(), fast());
    let err = client.node_info().await.unwrap_err();
    assert_eq!(err.kind(), "connect", "{err:?}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

#[cfg(feature = "test-utils")]
#[tokio::test]
async fn the_mock_implements_admin_api() {
    let mut mock = geth_ipc::MockAdminApi::new();
    mock.expect_add_peer().returning(|_| Ok(true));
    mock.expect_connection_generation().return_const(3u64);
    let api: &dyn AdminApi = &mock;
    assert!(api.add_peer(&enode()).await.unwrap());
    assert_eq!(api.connection_generation(), 3);
}

#[tokio::test]
async fn a_refused_websocket_connection_names_the_cause() {
    // Unlike kube's "client error (Connect)", geth-ipc's connection errors already
    // carry their root cause (HTTP through `error_chain`, WS in jsonrpsee's own
    // message, IPC in dedicated variants): this keeps it so.
    // Port 1 on loopback: nothing listens, the kernel refuses at once.
    let client = GethClient::new(
        Endpoint::Ws("ws://127.0.0.1:1".into()),
        ClientOptions::default(),
    );
    let err = client.node_info().await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.kind(), "connect", "{msg}");
    assert!(
        msg.to_ascii_lowercase().contains("connection refused"),
        "{msg}"
    );
}

/// Five minutes into an outage (polls once a second by then), geth binds
/// its socket 300 ms into the wait, in a data directory that exists from the
/// start (`watched`) or that it creates then: how long the wait took.
async fn socket_seen_after(name: &str, watched: bool) -> Duration {
    let base = std::env::temp_dir().join(format!("gps-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let dir = base.join("datadir");
    if watched {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let path = dir.join("geth.ipc");
    let down_since = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(300)).await;
    let now = tokio::time::Instant::now();
    let watch = geth_ipc::socket_accepts_again(&path, down_since);
    let bind = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::create_dir_all(&dir).unwrap();
        UnixListener::bind(&path).unwrap()
    };
    let ((), _listener) = tokio::join!(watch, bind);
    let seen_after = now.elapsed();
    let _ = std::fs::remove_dir_all(&base);
    seen_after
}

/// Where the socket's directory cannot be watched (here: it does not exist
/// yet, as before geth creates its data directory), the socket watch polls,
/// and less often the longer geth has been down: after five minutes down, a
/// socket that starts accepting is seen at the next 1 s try, not within
/// 10 ms (a hundred connects a second for as long as geth stays down).
#[tokio::test(start_paused = true)]
async fn the_socket_watch_of_a_geth_down_for_long_tries_once_a_second() {
    let seen_after = socket_seen_after("reachable", false).await;
    assert_eq!(
        seen_after,
        geth_ipc::REACHABLE_POLL_MAX,
        "seen after {seen_after:?}"
    );
}

/// With the socket's directory watched, geth creating its socket wakes the
/// wait: a socket bound 300 ms into the wait is seen at 300 ms, not at the
/// next try.
#[tokio::test(start_paused = true)]
async fn the_socket_watch_sees_a_socket_created_in_its_watched_directory_at_once() {
    let seen_after = socket_seen_after("inotify", true).await;
    assert!(
        seen_after < geth_ipc::REACHABLE_POLL_MAX,
        "seen after {seen_after:?}: the wait slept until its next try instead of \
         being woken by the socket's creation"
    );
}
