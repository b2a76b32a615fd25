//! Every geth users run, in one mesh: the version matrix of `testbed/versions.env`
//! (the last v1.16 patch, the default, the current release, op-geth), one node
//! of each with the real sidecar binary, on one genesis.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use integration_tests::{Mesh, NodeSpec, eventually, ipc_call, testbed};
use serde_json::{Value, json};

/// Four different builds start together (each initialises its KZG library:
/// seconds of CPU on a 2-core machine), then the sidecars mesh them.
const MESH: Duration = Duration::from_secs(90);

/// The version a matrix build must report: `geth-v1.16.9` -> `v1.16.9`,
/// `op-geth-v1.101702.3` -> `v1.101702.3`.
fn version_of(build: &str) -> &str {
    build.rsplit_once('-').map_or(build, |(_, v)| v)
}

/// `web3_clientVersion` of node `i`, e.g. `Geth/v1.16.9-stable/linux-amd64/go1.26.8`.
async fn client_version(m: &Mesh, i: usize) -> String {
    ipc_call(m.net.node(i).ipc_path(), "web3_clientVersion", json!([]))
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

/// Remote node id -> (the client name that peer announced, the eth protocol
/// version agreed), from node `i`'s own `admin_peers`. The eth version is
/// `None` until the eth handshake (genesis, fork id) completed: geth lists a
/// peer from the RLPx handshake on, and drops it if the eth handshake fails.
async fn peers(m: &Mesh, i: usize) -> BTreeMap<String, (String, Option<u64>)> {
    let peers = ipc_call(m.net.node(i).ipc_path(), "admin_peers", json!([]))
        .await
        .unwrap_or_default();
    peers
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let id = p.get("id")?.as_str()?.to_owned();
            let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
            let eth = p.pointer("/protocols/eth/version").and_then(Value::as_u64);
            Some((id, (name.to_owned(), eth)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_of_every_geth_version_forms_one_full_mesh() {
    let matrix = testbed().geth_matrix.clone();
    assert_eq!(matrix.len(), 4, "the matrix: {matrix:?}");
    let mut m = Mesh::without_sidecars("versions", 0, &[]).await.unwrap();
    let all = m
        .add_nodes(matrix.iter().map(|g| NodeSpec::with_geth(g)).collect())
        .await
        .unwrap();

    // Each node runs the build it was given, and the builds are different
    // binaries: each reports its own version.
    let mut versions = BTreeMap::new();
    for (i, build) in matrix.iter().enumerate() {
        let v = client_version(&m, i).await;
        let want = format!("Geth/{}-", version_of(build));
        assert!(
            v.starts_with(&want),
            "node {i} ({build}) reports {v:?}, expected {want}..."
        );
        versions.insert(m.net.node(i).node_id(), v);
    }
    let distinct: BTreeSet<&String> = versions.values().collect();
    assert_eq!(distinct.len(), matrix.len(), "versions: {versions:?}");

    // One full mesh, on every geth's own admin_peers, and every member registered.
    m.wait_full_mesh(&all, MESH).await.unwrap();
    m.wait_registered(&all, MESH).await.unwrap();

    // Each geth is connected to the other three versions as what they are (the
    // client name each peer announced in its handshake is that peer's version)
    // and the eth handshake with each completed: same genesis, compatible fork
    // ids, a common eth protocol version.
    for i in all.iter().copied() {
        let own = m.net.node(i).node_id();
        let want: BTreeMap<String, String> = versions
            .iter()
            .filter(|(id, _)| **id != own)
            .map(|(id, v)| (id.clone(), v.clone()))
            .collect();
        let what = format!(
            "node {i} ({}) to run eth with every other version",
            matrix[i]
        );
        let got = eventually(&what, MESH, || async {
            let got = peers(&m, i).await;
            let names: BTreeMap<String, String> = got
                .iter()
                .map(|(id, (n, _))| (id.clone(), n.clone()))
                .collect();
            (names == want && got.values().all(|(_, eth)| eth.is_some())).then_some(got)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: admin_peers {:?}", m.net.node(i).name()));
        eprintln!("node {i} {}: {got:?}", versions[&own]);
    }
    // Still one full mesh after the eth handshakes (none dropped a peer).
    m.wait_full_mesh(&all, MESH).await.unwrap();

    // Meshing took no cuts: no sidecar called removePeer on any version.
    for i in all {
        let removed = m
            .metric(
                i,
                "geth_peer_sidecar_geth_actions_total{kind=\"remove_peer\"}",
            )
            .await;
        assert!(
            removed.unwrap_or(0.0) == 0.0,
            "sidecar {i} ({}) called removePeer: {removed:?}",
            matrix[i]
        );
    }
}
