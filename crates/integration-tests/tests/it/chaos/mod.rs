//! Chaos on the real test bed: broken paths between pods, a blocked probe
//! port, a reused IP (`paths`), pod RBAC revoked mid-run (`pods`), a fleet
//! switching registry layouts with one member's geth down (`layouts`), the
//! apiserver restarted and etcd's data wiped (`control_plane`). Since issue
//! 21 no single pod decides for the fleet: without pod evidence a member is
//! removed only when other members' sidecars agree it is unreachable. Every
//! test asserts on the apiserver (its audit log and a watch of the registry
//! as admin) and on geth's own view (`admin_peers`).

mod control_plane;
mod layouts;
mod paths;
mod pods;

use std::time::Duration;

use integration_tests::{Mesh, RegistryHistory, eventually};

pub(super) const MESH: Duration = Duration::from_secs(60);

fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// REMOVAL_CONFIRMATIONS as the sidecars get it: the product's default (2)
/// unless the test process's environment sets it (the sidecars inherit it),
/// e.g. `REMOVAL_CONFIRMATIONS=0` to see a test fail with the old behaviour.
fn confirmations() -> f64 {
    std::env::var("REMOVAL_CONFIRMATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0)
}

/// Fast liveness: a member unreachable for 6 s is a removal candidate.
const FAST: [(&str, &str); 3] = [
    ("DEAD_AFTER", "6s"),
    ("PROBE_INTERVAL", "1s"),
    ("REGISTRATION_GRACE", "2s"),
];

/// A full, registered mesh of `n` with the [`FAST`] settings, `layout`
/// (`configmap` or `leases`) and `extra` env.
async fn fast_mesh(name: &str, n: usize, layout: &str, extra: &[(&str, &str)]) -> Mesh {
    let mut env = FAST.to_vec();
    env.push(("REGISTRY_LAYOUT", layout));
    env.extend_from_slice(extra);
    let mut m = Mesh::without_sidecars(name, n, &env).await.unwrap();
    if layout == "leases" {
        m.cluster.grant_leases(&m.ns).await.unwrap();
    }
    m.start_sidecars_and_wait(MESH).await.unwrap();
    m
}

async fn indirect_probes(m: &Mesh, i: usize) -> f64 {
    m.metric(i, "geth_peer_sidecar_indirect_probes_total")
        .await
        .unwrap_or(0.0)
}

/// Waits until sidecars `askers` have each asked other members about a
/// suspect in two rounds since `from` (their counts then) — the product's
/// decision, made twice — or until a removal shows (the old behaviour, which
/// asks nobody).
async fn wait_asked_twice(m: &Mesh, history: &RegistryHistory, askers: &[usize], from: &[f64]) {
    let per_round = confirmations() + 1.0;
    eventually(
        &format!("sidecars {askers:?} to ask other members twice ({per_round} asked a round)"),
        Duration::from_secs(120),
        || async {
            if !history.removed().is_empty() {
                return Some(());
            }
            for (&i, &from) in askers.iter().zip(from) {
                if indirect_probes(m, i).await < from + 2.0 * per_round {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap();
}

/// Every pair of `members` linked in geth's `admin_peers`, except `except`.
async fn assert_linked_except(m: &Mesh, members: &[usize], except: (usize, usize)) {
    let ids = m.ids(members);
    for &i in members {
        let missing = m.missing_peers(i, &ids).await.expect("geth answers");
        let allowed: &[usize] = if i == except.0 {
            &[except.1]
        } else if i == except.1 {
            &[except.0]
        } else {
            &[]
        };
        let wrong: Vec<usize> = missing
            .into_iter()
            .filter(|j| !allowed.contains(j))
            .collect();
        assert!(
            wrong.is_empty(),
            "geth-{i} lost its link to {wrong:?} (only {except:?} is cut)"
        );
    }
}

fn log_has(m: &mut Mesh, i: usize, text: &str) -> bool {
    let Some(sc) = m.sidecars[i].as_mut() else {
        return false;
    };
    std::fs::read_to_string(sc.proc_mut().log())
        .unwrap_or_default()
        .contains(text)
}

/// The ConfigMap writes (update or patch) the sidecars' service account
/// made, from the audit log.
fn configmap_writes(m: &Mesh) -> usize {
    m.registry_writes()
        .iter()
        .filter(|w| w.starts_with("update configmaps/") || w.starts_with("patch configmaps/"))
        .count()
}

/// `admin_removePeer` calls node `i`'s sidecar made so far.
async fn remove_peer_calls(m: &Mesh, i: usize) -> f64 {
    m.metric(
        i,
        "geth_peer_sidecar_geth_actions_total{kind=\"remove_peer\"}",
    )
    .await
    .unwrap_or(0.0)
}

/// Every pair of `members` linked in geth's `admin_peers` right now.
async fn assert_linked(m: &Mesh, members: &[usize], when: &str) {
    let ids = m.ids(members);
    for &i in members {
        let missing = m.missing_peers(i, &ids).await.expect("geth answers");
        assert!(
            missing.is_empty(),
            "{when}: geth-{i} lost its link to {missing:?}"
        );
    }
}

/// Polls `done` every 200 ms for up to `timeout`, asserting at every poll
/// that every pair of `members` is still linked in geth's `admin_peers`;
/// returns how long `done` took.
async fn holding_the_mesh<F, Fut>(
    m: &Mesh,
    members: &[usize],
    what: &str,
    timeout: Duration,
    mut done: F,
) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        assert_linked(m, members, &format!("waiting for {what}")).await;
        if done().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: not within {timeout:?} (the mesh held meanwhile)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
