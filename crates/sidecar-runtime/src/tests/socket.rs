//! A sidecar started before its geth: the loop runs a pass as soon as geth's
//! IPC socket accepts ([`Settings::geth_socket`]), not at its next retry.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use super::*;

/// When the loop's first pass fails (the watch lists nothing, so the first
/// pass waits 5 s for it) and the retries that follow: 5.0, 5.2, 5.6, 6.4,
/// 7.4, 8.4 s. geth's socket comes up between two retries, 0.4 s before the
/// next one.
const SOCKET_UP_AT: Duration = Duration::from_secs(8);

#[tokio::test(start_paused = true)]
async fn a_pass_runs_as_soon_as_geths_socket_accepts_not_at_the_next_retry() {
    let dir = std::env::temp_dir().join(format!("gps-socket-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("geth.ipc");
    let _ = std::fs::remove_file(&socket);

    let up = Arc::new(AtomicBool::new(false));
    let info: NodeInfo = serde_json::from_value(serde_json::json!({
        "id": enode(0).node_id().to_string(),
        "enode": format!("enode://{}@10.0.0.1:30303", KEYS[0]),
        "ports": {"discovery": 0, "listener": 30303},
    }))
    .expect("node info");
    let mut g = MockAdminApi::new();
    let geth_up = up.clone();
    g.expect_node_info().returning(move || {
        if geth_up.load(Ordering::SeqCst) {
            Ok(info.clone())
        } else {
            Err(geth_ipc::Error::Connect {
                endpoint: "/geth/geth.ipc".into(),
                reason: "no such file or directory".into(),
            })
        }
    });
    g.expect_connection_generation().returning(|| 1);
    g.expect_peers().returning(|| Ok(Vec::new()));
    g.expect_peer_events()
        .returning(|| Err(geth_ipc::Error::ConnectionLost));

    let registered_at = Arc::new(Mutex::new(None));
    let registered = Arc::new(tokio::sync::Notify::new());
    let mut reg = MockPeerRegistry::new();
    let empty = only("10", &[]);
    let read = empty.clone();
    reg.expect_snapshot().returning(move || Ok(read.clone()));
    let (at, done) = (registered_at.clone(), registered.clone());
    reg.expect_upsert().returning(move |_| {
        at.lock()
            .expect("lock")
            .get_or_insert(tokio::time::Instant::now());
        done.notify_one();
        Ok(empty.clone())
    });
    reg.expect_create().returning(|_| Ok(None));
    reg.expect_watch()
        .returning(|| futures::stream::pending().boxed());

    let mut s = settings(pod_ip());
    s.geth_socket = Some(socket.clone());
    let mut r = runner_with(g, reg, s, Arc::new(Metrics::new()));
    let began = tokio::time::Instant::now();
    let bring_up = async {
        tokio::time::sleep(SOCKET_UP_AT).await;
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        up.store(true, Ordering::SeqCst);
        (tokio::time::Instant::now(), listener)
    };
    let ((socket_up, _listener), ()) = tokio::join!(bring_up, r.event_loop(registered.notified()));
    let _ = std::fs::remove_dir_all(&dir);

    let registered_at = registered_at.lock().expect("lock").expect("registered");
    let waited = registered_at - socket_up;
    assert_eq!(socket_up - began, SOCKET_UP_AT);
    assert!(
        waited <= geth_ipc::reachable_poll(SOCKET_UP_AT) * 2,
        "the pass came {waited:?} after geth's socket accepted: the loop waited for its \
         retry timer instead of watching the socket"
    );
}
