//! Rule 5, report: how the desired static set stands (connected, ready,
//! missing) and which peers are unusable.

use super::Pass;

/// Fills the counts and lists of the report from the desired set.
pub(super) fn rule(pass: &mut Pass<'_>) {
    let obs = pass.obs;
    let report = &mut pass.report;
    report.desired = pass.targets.len();
    for (id, target) in &pass.targets {
        match obs.connected.get(id) {
            Some(p) => {
                report.connected += 1;
                if p.eth_ready {
                    report.ready += 1;
                }
            }
            None => report.missing.push(target.peer.clone()),
        }
    }
    let unusable = obs
        .unusable
        .iter()
        .map(|(id, err)| {
            let peer = pass
                .targets
                .get(id)
                .map_or_else(|| pass.peer_ref_for(*id), |t| t.peer.clone());
            (peer, err.clone())
        })
        .collect();
    let report = &mut pass.report;
    report.unusable = unusable;
    report.missing.sort();
    report.deferred.sort();
}
