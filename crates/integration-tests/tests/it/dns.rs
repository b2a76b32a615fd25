//! Members published under DNS names, on the real test bed: every sidecar
//! resolves them in its own pod's network namespace (the hosts file `ip netns
//! exec` mounts there stands in for cluster DNS). A name resolving outside
//! MEMBER_CIDRS is refused before anything is sent to it; a name that does not
//! resolve removes nobody.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use geth_ipc::Host;
use integration_tests::{Mesh, NftTable, P2P_PORT, SIDECAR_HTTP_PORT, eventually, test_member};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::Value;

const MESH: Duration = Duration::from_secs(60);

fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// The problems node `i`'s sidecar lists at `/status` (`None` while it does
/// not answer).
async fn problems(m: &Mesh, i: usize) -> Option<Vec<String>> {
    let (code, body) = m.sidecars[i].as_ref()?.get("/status").await.ok()?;
    if code != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    Some(
        v["problems"]
            .as_array()?
            .iter()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect(),
    )
}

async fn passes(m: &Mesh, i: usize) -> f64 {
    m.metric(i, "geth_peer_sidecar_reconciles_total")
        .await
        .unwrap_or(0.0)
}

fn log_of(m: &mut Mesh, i: usize) -> String {
    let Some(sc) = m.sidecars[i].as_mut() else {
        return String::new();
    };
    std::fs::read_to_string(sc.proc_mut().log()).unwrap_or_default()
}

/// Writes member record `member.<pod>` as the sidecars' service account (what
/// any pod holding that token can do), with its enode at DNS name `name`.
async fn put_dns_member(m: &Mesh, pod: &str, seed: u32, name: &str, ip: Ipv4Addr) -> String {
    let mut record = test_member(pod, seed);
    record.enode = record.enode.with_host(Host::Dns(name.to_owned()));
    record.pod_ip = Some(ip.to_string());
    let cms: Api<ConfigMap> = Api::namespaced(m.ns.client.clone(), &m.ns.name);
    let patch = serde_json::json!({ "data": {
        format!("member.{pod}"): serde_json::to_string(&record).unwrap()
    }});
    cms.patch(
        integration_tests::CONFIGMAP,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .unwrap();
    record.node_id.to_string()
}

/// A ghost member whose DNS name resolves (in every pod's namespace) to an
/// address outside MEMBER_CIDRS, routed out of every pod so that a dial or a
/// probe would leave it and be counted. Next to it a control member whose
/// name resolves inside MEMBER_CIDRS (an address nobody holds): its dials and
/// probes show the sidecars did their passes and probe rounds meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_dns_name_resolves_outside_member_cidrs_is_refused_before_any_dial_or_probe()
{
    Box::pin(refused_outside_member_cidrs()).await;
}

async fn refused_outside_member_cidrs() {
    let n = 3;
    let mut m = Mesh::without_sidecars("dns-refused", n, &[("PROBE_INTERVAL", "1s")])
        .await
        .unwrap();
    let bridge = m.net.bridge().clone();
    // The pods' network is the bridge's /24: every pod address is in it.
    let cidrs = format!("{}/24", bridge.ip(0));
    m.env.push(("MEMBER_CIDRS".into(), cidrs.clone()));
    let [a, b, c, _] = bridge.ip(0).octets();
    // Outside 10.244.0.0/16 and 100.64.0.0/10 (every test bridge's range).
    let ghost_ip = Ipv4Addr::new(172, 31, c, 77);
    let control_ip = Ipv4Addr::new(a, b, c, 250);
    let ghost_name = format!("ghost.geth.{}.svc.cluster.local", m.ns.name);
    let control_name = format!("control.geth.{}.svc.cluster.local", m.ns.name);
    let mut ghost_counters: Vec<NftTable> = Vec::new();
    let mut control_counters: Vec<NftTable> = Vec::new();
    for node in m.net.nodes() {
        let ns = node.netns();
        ns.write_hosts(&[
            (ghost_ip, ghost_name.clone()),
            (control_ip, control_name.clone()),
        ])
        .unwrap();
        ns.route_on_link(ghost_ip).unwrap();
        ghost_counters.push(ns.count_outbound_to(ghost_ip, &[]).unwrap());
        control_counters.push(
            ns.count_outbound_to(control_ip, &[P2P_PORT, SIDECAR_HTTP_PORT])
                .unwrap(),
        );
    }
    // The counters read 0 (and are listed) before anything happens.
    for t in ghost_counters.iter().chain(&control_counters) {
        assert_eq!(t.packets(" counter"), Some(0), "{}", t.list());
    }
    for i in 0..n {
        m.start_sidecar(i).unwrap();
    }
    m.wait_full_mesh(&all(n), MESH).await.unwrap();
    m.wait_registered(&all(n), MESH).await.unwrap();

    let ghost_id = put_dns_member(&m, "ghost", 77, &ghost_name, ghost_ip).await;
    put_dns_member(&m, "control", 78, &control_name, control_ip).await;
    let start = tokio::time::Instant::now();

    // Every pod's geth dialled and its sidecar probed the control member,
    // which the same passes resolved with the ghost.
    let geth_dial = format!("tcp dport {P2P_PORT} counter");
    let probe = format!("tcp dport {SIDECAR_HTTP_PORT} counter");
    eventually(
        "every pod to dial and probe member.control",
        MESH,
        || async {
            for t in &control_counters {
                if t.packets(&geth_dial)? == 0 || t.packets(&probe)? == 0 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap();
    let control_seen = start.elapsed();
    // Then more: three passes on every sidecar and two more probes of the
    // control member from every pod (probe rounds go on, 1 s apart).
    let mut from = Vec::new();
    for (i, t) in control_counters.iter().enumerate() {
        from.push((passes(&m, i).await, t.packets(&probe).unwrap()));
    }
    eventually(
        "three more passes and two more probe rounds on every sidecar",
        MESH,
        || async {
            for (i, &(passed, probed)) in from.iter().enumerate() {
                if passes(&m, i).await < passed + 3.0
                    || control_counters[i].packets(&probe)? < probed + 2
                {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap();

    // Nothing ever left any pod for the ghost's address.
    for (i, t) in ghost_counters.iter().enumerate() {
        assert_eq!(
            t.packets(&format!("ip daddr {ghost_ip} counter")),
            Some(0),
            "geth-{i}'s pod sent packets to the refused member's address: {}",
            t.list()
        );
    }
    // Every sidecar reports the ghost's key.
    eventually("every sidecar to report member.ghost", MESH, || async {
        for i in 0..n {
            let p = problems(&m, i).await?;
            if !p
                .iter()
                .any(|p| p.contains("member.ghost") && p.contains("outside MEMBER_CIDRS"))
            {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap();
    let ids: BTreeSet<String> = [ghost_id.clone()].into();
    for i in 0..n {
        let peers = m.net.node(i).peer_ids().await.unwrap();
        assert!(
            !peers.iter().any(|p| ids.contains(p)),
            "geth-{i} is connected to the ghost: {peers:?}"
        );
        let p = problems(&m, i).await.unwrap();
        let ghost: Vec<&String> = p.iter().filter(|p| p.contains("member.ghost")).collect();
        assert!(
            ghost.len() == 1 && ghost[0].contains(&ghost_ip.to_string()),
            "geth-{i}'s /status names member.ghost once, with its address: {p:?}"
        );
        let log = log_of(&mut m, i);
        assert!(
            log.lines()
                .any(|l| l.contains("configuration or registry problem")
                    && l.contains("member.ghost")),
            "geth-{i}'s sidecar logs the ghost as a problem"
        );
    }
    // The real members are untouched.
    let ids = m.ids(&all(n));
    for i in 0..n {
        assert_eq!(
            m.missing_peers(i, &ids).await,
            Some(vec![]),
            "geth-{i} lost a real member"
        );
    }
    assert!(
        m.registry_data().await.contains_key("member.ghost"),
        "the refused record is left for the operator"
    );
    eprintln!(
        "member.control dialled and probed from every pod {control_seen:?} after the records \
         were written; control dials/probes per pod at the end: {:?}",
        control_counters
            .iter()
            .map(|t| (t.packets(&geth_dial), t.packets(&probe)))
            .collect::<Vec<_>>()
    );
}

const DEAD_AFTER: Duration = Duration::from_secs(6);

/// Members advertise DNS names; one pod's DNS then answers nothing for any of
/// them (its hosts file emptied) for well past DEAD_AFTER.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_outage_with_advertise_dns_removes_nobody() {
    Box::pin(dns_outage()).await;
}

async fn dns_outage() {
    let n = 3;
    let dark = 0;
    let env = [
        ("ADVERTISE", "dns"),
        (
            "DNS_TEMPLATE",
            "{pod}.{service}.{namespace}.svc.cluster.local",
        ),
        ("SERVICE_NAME", "geth"),
        ("DEAD_AFTER", "6s"),
        ("PROBE_INTERVAL", "1s"),
        ("REGISTRATION_GRACE", "2s"),
        ("RESYNC_INTERVAL", "1s"),
    ];
    let mut m = Mesh::without_sidecars("dns-outage", n, &env).await.unwrap();
    m.write_hosts().unwrap();
    for i in 0..n {
        m.start_sidecar(i).unwrap();
    }
    m.wait_full_mesh(&all(n), MESH).await.unwrap();
    m.wait_registered(&all(n), MESH).await.unwrap();
    let history = m.registry_history().await.unwrap();
    let writes_before = m.registry_writes().len();

    // The outage: geth-0's pod resolves no member name.
    m.net.node(dark).netns().write_hosts(&[]).unwrap();
    let others: Vec<usize> = (0..n).filter(|&i| i != dark).collect();
    eventually(
        "geth-0's sidecar to report every other member unresolved",
        MESH,
        || async {
            let p = problems(&m, dark).await?;
            others
                .iter()
                .all(|&j| {
                    p.iter().any(|p| {
                        p.contains(&format!("member.geth-{j} "))
                            && p.contains("a DNS name not resolved")
                    })
                })
                .then_some(())
        },
    )
    .await
    .unwrap();
    let noticed = tokio::time::Instant::now();
    let from = passes(&m, dark).await;
    // Past DEAD_AFTER twice over, by geth-0's own passes (one a second).
    let wanted = 2.0 * DEAD_AFTER.as_secs_f64() + 2.0;
    eventually(
        "geth-0's sidecar to pass through twice DEAD_AFTER of outage",
        MESH,
        || async {
            (noticed.elapsed() >= 2 * DEAD_AFTER && passes(&m, dark).await >= from + wanted)
                .then_some(())
        },
    )
    .await
    .unwrap();
    let window = noticed.elapsed();
    m.assert_nothing_removed(&history, writes_before);
    let ids = m.ids(&others);
    for &i in &others {
        assert_eq!(
            m.missing_peers(i, &ids).await,
            Some(vec![]),
            "geth-{i} lost its link to another member during geth-0's DNS outage"
        );
    }
    let dark_peers = m.missing_peers(dark, &m.ids(&all(n))).await;
    let p = problems(&m, dark).await.unwrap_or_default();
    let remove_peers = m
        .metric(
            dark,
            "geth_peer_sidecar_geth_actions_total{kind=\"remove_peer\"}",
        )
        .await;
    assert_eq!(
        m.registered_pods().await.len(),
        n,
        "every member still registered"
    );

    // DNS back: the mesh is whole again, still nobody removed.
    m.write_hosts().unwrap();
    m.wait_full_mesh(&all(n), Duration::from_secs(90))
        .await
        .unwrap();
    eventually("geth-0's problems to clear", MESH, || async {
        let p = problems(&m, dark).await?;
        (!p.iter().any(|p| p.contains("not resolved"))).then_some(())
    })
    .await
    .unwrap();
    m.wait_registered(&all(n), MESH).await.unwrap();
    m.assert_nothing_removed(&history, writes_before);
    eprintln!(
        "outage noticed, then {window:?} of it; geth-0 missing peers at its end: {dark_peers:?}, \
         removePeer calls: {remove_peers:?}; its problems then: {p:?}; registry versions seen: {}",
        history.changes()
    );
}
