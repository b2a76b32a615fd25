//! Mesh benchmark on the real test bed; prints a table.
//!
//! `scripts/bench.sh` runs it with the release sidecar binary. Figures:
//! time to full mesh for N = 3, 5, 10 (from the moment the last geth's IPC
//! answers and the sidecars are started), time to re-mesh after an IP move
//! (from the moved geth's IPC answering), time to drop a deleted member from the
//! registry and every other sidecar's desired set, and at steady state the
//! sidecars' RSS, CPU and apiserver requests per minute (from the audit log).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::time::{Duration, Instant};

use integration_tests::{Mesh, eventually};

const POLL_LIMIT: Duration = Duration::from_secs(120);

fn proc_stat(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (rss_kib, ticks)
}

struct Row {
    what: String,
    value: String,
}

async fn bench_n(n: usize, rows: &mut Vec<Row>, steady: bool) {
    let mut m = Mesh::start(&format!("bench{n}"), n, &[]).await.unwrap();
    // Mesh::start returns once the sidecars are spawned; the geth nodes' IPC
    // answered before that. Measure from here.
    let t0 = Instant::now();
    let all: Vec<usize> = (0..n).collect();
    m.wait_full_mesh(&all, POLL_LIMIT).await.unwrap();
    rows.push(Row {
        what: format!("full mesh, N={n}"),
        value: format!("{:.2} s", t0.elapsed().as_secs_f64()),
    });
    if !steady {
        return;
    }

    // Steady state: RSS, CPU, apiserver requests over a window.
    m.wait_registered(&all, POLL_LIMIT).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await; // let start-up traffic settle
    let user = m.ns.service_account_user();
    let before_reqs = m.cluster.audited_requests(&user);
    let pids: Vec<u32> = m
        .sidecars
        .iter_mut()
        .map(|s| s.as_mut().unwrap().proc_mut().pid())
        .collect();
    let before: Vec<(u64, u64)> = pids.iter().map(|&p| proc_stat(p)).collect();
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    let after: Vec<(u64, u64)> = pids.iter().map(|&p| proc_stat(p)).collect();
    let reqs = m.cluster.audited_requests(&user);
    let new_reqs = &reqs[before_reqs.len().min(reqs.len())..];
    let writes = new_reqs
        .iter()
        .filter(|(v, _, _)| matches!(v.as_str(), "create" | "update" | "patch" | "delete"))
        .count();
    let max_rss = after.iter().map(|a| a.0).max().unwrap_or(0);
    let cpu_ticks: u64 = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).sum();
    let cpu_pct = cpu_ticks as f64 / 100.0 / window.as_secs_f64() / n as f64 * 100.0;
    rows.push(Row {
        what: format!("sidecar RSS at idle (max of {n})"),
        value: format!("{:.1} MiB", max_rss as f64 / 1024.0),
    });
    rows.push(Row {
        what: "sidecar CPU at idle (mean)".into(),
        value: format!("{cpu_pct:.2} % of a core"),
    });
    rows.push(Row {
        what: "apiserver requests / min / sidecar at steady state".into(),
        value: format!(
            "{:.2} ({} writes in total)",
            new_reqs.len() as f64 / n as f64 / (window.as_secs_f64() / 60.0),
            writes
        ),
    });

    // IP move of the last node: pod replaced, same key, new IP.
    let last = n - 1;
    let new_ip = m.net.fresh_ip();
    m.take_sidecar(last).unwrap().kill().await;
    m.net
        .node_mut(last)
        .restart_on_new_ip(new_ip)
        .await
        .unwrap();
    let t0 = Instant::now();
    m.start_sidecar(last).unwrap();
    m.wait_full_mesh(&all, POLL_LIMIT).await.unwrap();
    rows.push(Row {
        what: format!("re-mesh after an IP move, N={n}"),
        value: format!("{:.2} s", t0.elapsed().as_secs_f64()),
    });

    // Deleted member: SIGTERM its sidecar (deregisters), stop geth.
    let t0 = Instant::now();
    let sc = m.take_sidecar(last).unwrap();
    let exit = sc.terminate().await;
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
    rows.push(Row {
        what: format!("drop a deleted member everywhere, N={n} (sidecar exit {exit:?})"),
        value: format!("{:.2} s", t0.elapsed().as_secs_f64()),
    });
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    rt.block_on(async {
        bench_n(3, &mut rows, false).await;
        bench_n(5, &mut rows, false).await;
        bench_n(10, &mut rows, true).await;
    });
    let w = rows.iter().map(|r| r.what.len()).max().unwrap_or(10);
    println!("\n{:<w$}  value", "measure");
    println!("{}", "-".repeat(w + 20));
    for r in rows {
        println!("{:<w$}  {}", r.what, r.value);
    }
}
