//! What a pass reports: /status, metrics, the summary line, notices.

use std::time::Instant;

use geth_ipc::AdminApi;
use peer_registry::PeerRegistry;
use reconcile_core as core;
use tracing::{info, warn};

use crate::health::lock;
use crate::notice::Notice;
use crate::runner::Runner;

/// How long reachable members may stay unconnected before the log names geth's
/// peer limits as the likely cause.
const MESH_LIMIT_AFTER: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

impl<G: AdminApi, R: PeerRegistry> Runner<G, R> {
    /// Publishes the pass's report: to /status, the metrics, the log (once
    /// per change) and, for an operator, notices.
    pub(crate) fn publish(
        &mut self,
        report: &core::Report,
        now: jiff::Timestamp,
        started: Instant,
        ok: bool,
    ) {
        self.me = self
            .tracker
            .snapshot()
            .and_then(|s| s.members.get(&self.s.pod).cloned());
        let connected = self.tracker.connected().keys().copied().collect();
        self.health
            .publish(&self.s.pod, report, self.tracker.snapshot(), &connected);
        self.recheck_at = report.recheck_at;
        self.awaiting.clone_from(&report.awaiting_confirmation);
        self.metrics.desired_peers.set(report.desired as i64);
        self.metrics.connected_peers.set(report.connected as i64);
        self.metrics.missing_peers.set(report.missing.len() as i64);
        self.metrics
            .unusable_peers
            .set(self.tracker.unusable().len() as i64);
        if self
            .reported
            .partition
            .update(report.suspected_partition)
            .is_some()
            && report.suspected_partition
        {
            self.s.hooks.notice(Notice::PartitionSuspected {
                detail: format!(
                    "{} member(s) unreachable from here and this node does not reach a \
                     majority: no member is removed until it does",
                    report.unreachable.len()
                ),
            });
        }
        self.metrics
            .suspected_partition
            .set(i64::from(report.suspected_partition));
        self.note_mesh_limit(report, now);
        if self.reported.summary.update(report.to_string()).is_some() {
            info!("{report}");
        }
        self.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        if ok {
            self.metrics.last_sync.set(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            );
        }
    }

    /// Warns once when reachable members stay unconnected: geth's peer limits
    /// (maxpeers, and its outbound dial cap of maxpeers/3 that --trusted does not
    /// lift) are then the usual cause, which no admin call can change.
    fn note_mesh_limit(&mut self, report: &core::Report, now: jiff::Timestamp) {
        let unreachable = self.tracker.unreachable_since();
        let stuck = !report.missing.is_empty()
            && report
                .missing
                .iter()
                .all(|p| !unreachable.contains_key(&p.node_id));
        if !stuck {
            self.stuck_since = None;
            self.metrics.peer_limit_suspected.set(0);
            *lock(&self.health.peer_limit) = None;
            return;
        }
        let since = *self.stuck_since.get_or_insert(now);
        if now.duration_since(since) < MESH_LIMIT_AFTER {
            return;
        }
        let advice = "geth's peer limits (--maxpeers, at most maxpeers/3 outbound dials, which \
                      TRUSTED_PEERS does not lift); start geth with --maxpeers of at least \
                      3 x (members - 1)";
        self.metrics.peer_limit_suspected.set(1);
        *lock(&self.health.peer_limit) = Some(format!(
            "{} of {} desired peers are reachable but unconnected since {since}: {advice}",
            report.missing.len(),
            report.desired
        ));
        if self.reported.mesh_limit.update(()).is_some() {
            self.s.hooks.notice(Notice::PeerLimitReached {
                detail: format!(
                    "{} of {} desired peers are reachable but stayed unconnected for {} s: {advice}",
                    report.missing.len(),
                    report.desired,
                    MESH_LIMIT_AFTER.as_secs()
                ),
            });
            warn!(
                connected = report.connected,
                desired = report.desired,
                "{} reachable member(s) stayed unconnected for {}s: geth's peer limits are the \
                 likely cause (--maxpeers, and at most maxpeers/3 outbound dials, which \
                 TRUSTED_PEERS does not lift); for a full mesh of N nodes start geth with \
                 --maxpeers of at least 3 x (N - 1)",
                report.missing.len(),
                MESH_LIMIT_AFTER.as_secs()
            );
        }
    }
}
