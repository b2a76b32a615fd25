//! At rest on a full mesh: the sidecars' memory, CPU and apiserver requests;
//! then an IP move and a deleted member.

use std::time::{Duration, Instant};

use integration_tests::{Mesh, eventually};

use crate::Row;
use crate::measure::{POLL_LIMIT, proc_stat, pss, rss};

/// Rows for a full mesh `m` of the sidecars of layout `label`.
pub(crate) async fn steady(m: &mut Mesh, label: &str, rows: &mut Vec<Row>) {
    let n = m.net.nodes().len();
    let all: Vec<usize> = (0..n).collect();
    m.wait_full_mesh(&all, POLL_LIMIT).await.unwrap();
    m.wait_registered(&all, POLL_LIMIT).await.unwrap();
    // A measurement window after the start-up traffic, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let user = m.ns.service_account_user();
    let before_reqs = m.cluster.audited_requests(&user);
    let pids: Vec<u32> = m
        .sidecars
        .iter_mut()
        .map(|s| s.as_mut().unwrap().proc_mut().pid())
        .collect();
    let before: Vec<(u64, Duration)> = pids.iter().map(|&p| proc_stat(p)).collect();
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    let after: Vec<(u64, Duration)> = pids.iter().map(|&p| proc_stat(p)).collect();
    let reqs = m.cluster.audited_requests(&user);
    let new_reqs = &reqs[before_reqs.len().min(reqs.len())..];
    let writes = new_reqs
        .iter()
        .filter(|(v, _, _)| matches!(v.as_str(), "create" | "update" | "patch" | "delete"))
        .count();
    // The largest sidecar, its parts from the same read as its total.
    let [max_rss, anon, file, shmem] = pids.iter().map(|&pid| rss(pid)).max().unwrap_or_default();
    let [anon, file, shmem] = [anon, file, shmem].map(|k| k as f64 / 1024.0);
    let max_pss = pids.iter().map(|&pid| pss(pid)).max().unwrap_or_default() as f64 / 1024.0;
    let cpu: Duration = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.1.saturating_sub(b.1))
        .sum();
    let cpu_pct = cpu.as_secs_f64() / window.as_secs_f64() / n as f64 * 100.0;
    rows.push(Row::new(
        format!("{label}: sidecar RSS at idle, max of {n} (target <= 8 MiB)"),
        format!(
            "{:.1} MiB (anon {anon:.1}, file {file:.1}, shmem {shmem:.1})",
            max_rss as f64 / 1024.0
        ),
    ));
    rows.push(Row::new(
        format!("{label}: sidecar PSS at idle, max of {n} (the binary's pages shared by {n})"),
        format!("{max_pss:.1} MiB"),
    ));
    rows.push(Row::new(
        format!("{label}: sidecar CPU at idle, mean"),
        format!("{cpu_pct:.2} % of a core"),
    ));
    rows.push(Row::new(
        format!("{label}: apiserver requests / min / sidecar at rest"),
        format!(
            "{:.2} ({} writes in total)",
            new_reqs.len() as f64 / n as f64 / (window.as_secs_f64() / 60.0),
            writes
        ),
    ));

    // Deleted member: SIGTERM its sidecar (deregisters), stop geth.
    let last = n - 1;
    let t0 = Instant::now();
    let exit = m.take_sidecar(last).unwrap().terminate().await;
    m.net.node_mut(last).stop().await;
    let rest: Vec<usize> = (0..last).collect();
    m.wait_registered(&rest, POLL_LIMIT).await.unwrap();
    let want = (last - 1) as f64;
    for i in 0..last {
        eventually("desired peers to drop", POLL_LIMIT, || async {
            (m.metric(i, "geth_peer_sidecar_desired_peers").await == Some(want)).then_some(())
        })
        .await
        .unwrap();
    }
    rows.push(Row::new(
        format!("{label}: drop a deleted member everywhere, N={n} (sidecar exit {exit:?})"),
        format!("{:.2} s", t0.elapsed().as_secs_f64()),
    ));
}
