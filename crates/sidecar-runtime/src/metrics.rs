//! Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// A label naming an error kind or an action.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub(crate) kind: String,
}

/// Every metric the sidecar exports.
pub struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) members: Gauge,
    pub(crate) desired_peers: Gauge,
    pub(crate) connected_peers: Gauge,
    pub(crate) missing_peers: Gauge,
    pub(crate) unusable_peers: Gauge,
    pub(crate) reconciles: Counter,
    pub(crate) reconcile_errors: Family<KindLabel, Counter>,
    pub(crate) reconcile_duration: Histogram,
    pub(crate) registry_writes: Family<KindLabel, Counter>,
    pub(crate) registry_errors: Family<KindLabel, Counter>,
    pub(crate) geth_actions: Family<KindLabel, Counter>,
    pub(crate) geth_rpc_errors: Family<KindLabel, Counter>,
    pub(crate) geth_action_errors: Family<KindLabel, Counter>,
    pub(crate) geth_reconnects: Counter,
    pub(crate) last_sync: Gauge<f64, AtomicU64>,
    pub(crate) suspected_partition: Gauge,
    pub(crate) probes: Family<KindLabel, Counter>,
    pub(crate) peer_limit_suspected: Gauge,
    pub(crate) pod_evidence: Gauge,
    pub(crate) indirect_probes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered and at zero.
    pub fn new() -> Self {
        let mut m = Self {
            members: Gauge::default(),
            desired_peers: Gauge::default(),
            connected_peers: Gauge::default(),
            missing_peers: Gauge::default(),
            unusable_peers: Gauge::default(),
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            registry_writes: Family::default(),
            registry_errors: Family::default(),
            geth_actions: Family::default(),
            geth_rpc_errors: Family::default(),
            geth_action_errors: Family::default(),
            geth_reconnects: Counter::default(),
            last_sync: Gauge::default(),
            suspected_partition: Gauge::default(),
            probes: Family::default(),
            peer_limit_suspected: Gauge::default(),
            pod_evidence: Gauge::default(),
            indirect_probes: Counter::default(),
            registry: Registry::with_prefix("geth_peer_sidecar"),
        };
        // Error counters start at zero for every kind: a query or alert sees
        // the series before the first error, and rate() counts that error.
        let zero = |family: &Family<KindLabel, Counter>, kinds: &[&str]| {
            for k in kinds {
                // The child is created and stays; the guard is not needed.
                drop(family.get_or_create(&Self::kind(k)));
            }
        };
        zero(&m.reconcile_errors, &crate::error::PassError::KINDS);
        zero(&m.registry_errors, &peer_registry::Error::KINDS);
        zero(&m.geth_rpc_errors, &geth_ipc::Error::KINDS);
        m.registry.register(
            "members",
            "Members in the shared registry",
            m.members.clone(),
        );
        m.registry.register(
            "desired_peers",
            "Peers this geth should have (members but self, plus external peers)",
            m.desired_peers.clone(),
        );
        m.registry.register(
            "connected_peers",
            "Desired peers this geth is connected to (admin_peers)",
            m.connected_peers.clone(),
        );
        m.registry.register(
            "missing_peers",
            "Desired peers this geth is not connected to",
            m.missing_peers.clone(),
        );
        m.registry.register(
            "unusable_peers",
            "Peers that connect and are then dropped (network id, genesis or fork mismatch)",
            m.unusable_peers.clone(),
        );
        m.registry
            .register("reconciles", "Reconcile passes", m.reconciles.clone());
        m.registry.register(
            "reconcile_errors",
            "Reconcile passes that failed, by error kind",
            m.reconcile_errors.clone(),
        );
        m.registry.register(
            "reconcile_duration_seconds",
            "Duration of reconcile passes",
            m.reconcile_duration.clone(),
        );
        m.registry.register(
            "registry_writes",
            "Registry writes (create, upsert, remove)",
            m.registry_writes.clone(),
        );
        m.registry.register(
            "registry_errors",
            "Registry operations that failed, by kind (conflict retries exhausted, forbidden, unavailable...)",
            m.registry_errors.clone(),
        );
        m.registry.register(
            "geth_actions",
            "admin_* calls made to geth, by action",
            m.geth_actions.clone(),
        );
        m.registry.register(
            "geth_rpc_errors",
            "Failed geth RPC calls, by error kind",
            m.geth_rpc_errors.clone(),
        );
        m.registry.register(
            "geth_action_errors",
            "geth actions (add_peer, remove_peer, ...) that failed, by action; the pass goes on with the others",
            m.geth_action_errors.clone(),
        );
        m.registry.register(
            "geth_reconnects",
            "Times geth's connection was (re)established and every peer re-applied",
            m.geth_reconnects.clone(),
        );
        m.registry.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last reconcile pass that completed without error",
            m.last_sync.clone(),
        );
        m.registry.register(
            "suspected_partition",
            "1 while most members look unreachable from here, so nobody is removed",
            m.suspected_partition.clone(),
        );
        m.registry.register(
            "probes",
            "Liveness probes of unconnected members, by how they were answered (identity: the sidecar named the member; geth or sidecar: a TCP connect)",
            m.probes.clone(),
        );
        m.registry.register(
            "peer_limit_suspected",
            "1 while reachable members stay unconnected for a minute: geth's peer limits (maxpeers, maxpeers/3 outbound dials)",
            m.peer_limit_suspected.clone(),
        );
        m.registry.register(
            "pod_evidence",
            "1 while pod evidence is in use (READ_PODS on and the pod watch current); 0 while removals fall back to agreement between members",
            m.pod_evidence.clone(),
        );
        m.registry.register(
            "indirect_probes",
            "Other members' sidecars asked whether they reach a member unreachable from here (removal needs their agreement)",
            m.indirect_probes.clone(),
        );
        m
    }

    /// Successful geth admin calls of every kind (the simulation's activity count).
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn geth_actions_total(&self) -> u64 {
        [
            "add_peer",
            "remove_peer",
            "add_trusted_peer",
            "remove_trusted_peer",
        ]
        .iter()
        .map(|k| self.geth_actions.get_or_create(&Self::kind(k)).get())
        .sum()
    }

    pub(crate) fn kind(kind: &str) -> KindLabel {
        KindLabel {
            kind: kind.to_owned(),
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric_with_the_prefix() {
        let m = Metrics::new();
        m.geth_actions
            .get_or_create(&Metrics::kind("add_peer"))
            .inc();
        let text = m.encode();
        for name in [
            "geth_peer_sidecar_members",
            "geth_peer_sidecar_connected_peers",
            "geth_peer_sidecar_unusable_peers",
            "geth_peer_sidecar_reconcile_duration_seconds",
            "geth_peer_sidecar_geth_actions_total{kind=\"add_peer\"} 1",
            "geth_peer_sidecar_last_successful_sync_timestamp_seconds",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }

    #[test]
    fn error_counters_are_exported_at_zero_for_every_kind_before_any_error() {
        let text = Metrics::new().encode();
        for series in [
            "geth_peer_sidecar_reconcile_errors_total{kind=\"geth\"} 0",
            "geth_peer_sidecar_reconcile_errors_total{kind=\"registry\"} 0",
            "geth_peer_sidecar_registry_errors_total{kind=\"forbidden\"} 0",
            "geth_peer_sidecar_registry_errors_total{kind=\"unavailable\"} 0",
            "geth_peer_sidecar_geth_rpc_errors_total{kind=\"socket_missing\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }

    /// Every sample name the exposition can carry: gauges as named, counters
    /// with `_total`, histograms with `_bucket`, `_sum` and `_count`.
    /// (Families appear in the exposition once they have a child: each gets one.)
    fn exposed_series() -> std::collections::BTreeSet<String> {
        let m = Metrics::new();
        for family in [
            &m.reconcile_errors,
            &m.registry_writes,
            &m.registry_errors,
            &m.geth_actions,
            &m.geth_rpc_errors,
        ] {
            family.get_or_create(&Metrics::kind("any")).inc();
        }
        let text = m.encode();
        let mut names = std::collections::BTreeSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut words = line.split_whitespace().skip(2);
            let (name, kind) = (words.next().unwrap_or_default(), words.next());
            match kind {
                Some("counter") => {
                    names.insert(format!("{name}_total"));
                }
                Some("histogram") => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        }
        names
    }

    #[test]
    fn every_metric_the_grafana_dashboard_queries_is_exposed() {
        let dashboard: serde_json::Value = serde_json::from_str(include_str!(
            "../../../charts/geth-peer-sidecar/dashboards/geth-peer-sidecar.json"
        ))
        .unwrap();
        let exposed = exposed_series();
        let mut queries = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            let targets = panel["targets"].as_array().unwrap();
            assert!(
                !targets.is_empty(),
                "panel {} queries nothing",
                panel["title"]
            );
            queries.extend(
                targets
                    .iter()
                    .map(|t| t["expr"].as_str().unwrap().to_owned()),
            );
        }
        for v in dashboard["templating"]["list"].as_array().unwrap() {
            if let Some(q) = v["query"]["query"].as_str() {
                queries.push(q.to_owned());
            }
        }
        let mut used = std::collections::BTreeSet::new();
        for q in &queries {
            for (i, _) in q.match_indices("geth_peer_sidecar_") {
                let name: String = q[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exposed.contains(&name),
                    "the dashboard queries {name}, which /metrics does not expose ({q})"
                );
                used.insert(name);
            }
        }
        // The panels: members, connected/missing/unusable per pod,
        // reconcile errors, registry writes.
        for must in [
            "geth_peer_sidecar_members",
            "geth_peer_sidecar_connected_peers",
            "geth_peer_sidecar_missing_peers",
            "geth_peer_sidecar_unusable_peers",
            "geth_peer_sidecar_reconcile_errors_total",
            "geth_peer_sidecar_registry_writes_total",
        ] {
            assert!(used.contains(must), "the dashboard does not show {must}");
        }
    }

    #[test]
    fn readme_documents_every_metric() {
        let readme = include_str!("../../../docs/operations.md");
        let text = Metrics::new().encode();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap_or_default();
            let short = name.trim_start_matches("geth_peer_sidecar_");
            assert!(
                readme.contains(&format!("| `{short}")),
                "metric {name} is not in the README's metrics table"
            );
        }
    }
}
