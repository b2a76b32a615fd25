//! Mesh benchmark on the real test bed, against geth's own floor; prints a
//! table.
//!
//! `scripts/bench.sh mesh` runs it with the release sidecar binary. For each N
//! (`MESH_SIZES`, default "10 30 50") and round (`MESH_ROUNDS`, default 2) it
//! runs every variant, in an order rotated each round so that no variant
//! always runs first on a fresh machine:
//!
//! - **floor**: no registry, no sidecar; each geth is told over IPC, by the
//!   newer node of each pair, the older one's enode at the earliest moment it
//!   could be (no simultaneous dials). Nothing that learns membership through
//!   Kubernetes can beat it.
//! - the sidecars of each layout (`MESH_LAYOUTS`, default "configmap leases"),
//!   and with `MESH_BASELINE_BIN=<another build>` the same layouts with that
//!   build (a before/after comparison in one run).
//!
//! over three paths (`MESH_PATHS`, default "settled started rolling"):
//! sidecars started on settled geth; sidecars already running when geth
//! starts, from the last IPC socket answering (what a pod's start looks like);
//! a replaced pod (new IP, same key) re-meshed, from its IPC socket answering
//! (`MESH_ROLL_PODS`, default 5, per run). The time to full mesh is geth's own
//! view (`admin_peers` and its peer events on every node). Each row gives the
//! median, the runs, the ratio to the floor's median and the target.
//!
//! `MESH_STAGES=off` skips the stage polls (registered, desired) and times
//! geth's full mesh alone, as for the floor.
//!
//! At the sizes of `MESH_STEADY` (default "10") each layout also runs at rest:
//! RSS, CPU, apiserver requests, and the time to drop a deleted member.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

mod measure;
mod runs;
mod steady;

use std::collections::BTreeMap;
use std::time::Duration;

use runs::{Path, Variant};

/// One line of the printed table.
pub(crate) struct Row {
    what: String,
    value: String,
}

impl Row {
    pub(crate) fn new(what: String, value: String) -> Self {
        Self { what, value }
    }
}

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_owned())
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn sizes(var: &str, default: &str) -> Vec<usize> {
    list(var, default)
        .iter()
        .map(|v| v.parse().expect("a list of node counts"))
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let k = v.len();
    if k % 2 == 1 {
        v[k / 2]
    } else {
        (v[k / 2 - 1] + v[k / 2]) / 2
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

type Results = BTreeMap<(Path, usize), Vec<(String, Vec<measure::Stages>)>>;

fn record(results: &mut Results, path: Path, n: usize, v: &Variant, s: measure::Stages) {
    eprintln!("{path:?} N={n} {}: full mesh {} s", v.name(), secs(s.mesh));
    let of_path = results.entry((path, n)).or_default();
    match of_path.iter_mut().find(|(name, _)| name == v.name()) {
        Some((_, runs)) => runs.push(s),
        None => of_path.push((v.name().to_owned(), vec![s])),
    }
}

/// Runs every path of `paths` for one variant at one size.
async fn one(n: usize, v: &Variant, paths: &[Path], roll: usize, tag: &str, out: &mut Results) {
    if paths.contains(&Path::Settled) || paths.contains(&Path::Rolling) {
        let mut m = runs::mesh(n, v, &format!("{tag}a")).await;
        let s = runs::settled(&mut m, v).await;
        if paths.contains(&Path::Settled) {
            record(out, Path::Settled, n, v, s);
        }
        if paths.contains(&Path::Rolling) {
            for i in (n.saturating_sub(roll)..n).rev() {
                let s = runs::replace(&mut m, v, i).await;
                record(out, Path::Rolling, n, v, s);
            }
        }
    }
    if paths.contains(&Path::Started) {
        let mut m = runs::mesh(n, v, &format!("{tag}b")).await;
        let s = runs::started(&mut m, v).await;
        record(out, Path::Started, n, v, s);
    }
}

fn print(results: &Results, rows: &[Row]) {
    println!(
        "\n{:<58} {:<4} {:<20} {:>10} {:>9} {:>22} {:>7} {:>6} {:>12} {:>14} {:>6}",
        "path",
        "N",
        "variant",
        "registered",
        "desired",
        "geth full mesh (runs)",
        "x floor",
        "target",
        "sidecar CPU",
        "ctl-plane CPU",
        "busy"
    );
    println!("{}", "-".repeat(180));
    for ((path, n), variants) in results {
        let floor = variants
            .iter()
            .find(|(name, _)| name == "floor")
            .map(|(_, r)| median(r.iter().map(|s| s.mesh).collect()));
        for (name, runs) in variants {
            let mesh = median(runs.iter().map(|s| s.mesh).collect());
            let opt = |f: fn(&measure::Stages) -> Option<Duration>| -> String {
                let v: Vec<Duration> = runs.iter().filter_map(f).collect();
                if v.is_empty() {
                    "-".into()
                } else {
                    secs(median(v))
                }
            };
            let all: Vec<String> = runs.iter().map(|s| secs(s.mesh)).collect();
            let all = if all.len() > 4 {
                format!(
                    "{}..{}",
                    all.iter().min().unwrap(),
                    all.iter().max().unwrap()
                )
            } else {
                all.join(" ")
            };
            let ratio = floor.map_or("-".into(), |f| {
                format!("{:.2}", mesh.as_secs_f64() / f.as_secs_f64())
            });
            // The median of a CPU figure in ms, with `decimals`; "-" when no run has it.
            let cpu_ms = |f: fn(&measure::Stages) -> Option<Duration>, decimals: usize| {
                let v: Vec<Duration> = runs.iter().filter_map(f).collect();
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.decimals$} ms", median(v).as_secs_f64() * 1e3)
                }
            };
            let cpu = cpu_ms(|s| s.sidecar_cpu, 1);
            let control_plane = cpu_ms(|s| s.control_plane_cpu, 0);
            let mut busy: Vec<f64> = runs.iter().filter_map(|s| s.busy).collect();
            busy.sort_by(f64::total_cmp);
            let busy = busy
                .get(busy.len() / 2)
                .map_or("-".into(), |b| format!("{:.0} %", b * 100.0));
            println!(
                "{:<58} {:<4} {:<20} {:>10} {:>9} {:>22} {:>7} {:>6} {:>12} {:>14} {:>6}",
                path.describe(),
                n,
                name,
                opt(|s| s.registered),
                opt(|s| s.desired),
                format!("{} ({all})", secs(mesh)),
                ratio,
                if name == "floor" {
                    "-".into()
                } else {
                    format!("{:.2}", path.target())
                },
                cpu,
                control_plane,
                busy
            );
        }
    }
    println!(
        "(times in s; sidecar CPU: per pod from its start to full mesh; for a replaced pod, all sidecars' CPU for one replacement; \
         ctl-plane CPU: the apiserver's and etcd's over the run, from about its t0 to the full mesh; busy: the share of both \
         cores busy over that window)"
    );
    if !rows.is_empty() {
        let w = rows.iter().map(|r| r.what.len()).max().unwrap_or(10);
        println!("\n{:<w$}  value", "at rest");
        println!("{}", "-".repeat(w + 20));
        for r in rows {
            println!("{:<w$}  {}", r.what, r.value);
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ns = sizes("MESH_SIZES", "10 30 50");
    let rounds: usize = std::env::var("MESH_ROUNDS").map_or(2, |v| v.parse().unwrap());
    let roll: usize = std::env::var("MESH_ROLL_PODS").map_or(5, |v| v.parse().unwrap());
    let steady_at = sizes("MESH_STEADY", "10");
    let paths: Vec<Path> = list("MESH_PATHS", "settled started rolling")
        .iter()
        .map(|p| match p.as_str() {
            "settled" => Path::Settled,
            "started" => Path::Started,
            "rolling" => Path::Rolling,
            other => panic!("MESH_PATHS: unknown path {other} (settled, started, rolling)"),
        })
        .collect();
    let layouts = list("MESH_LAYOUTS", "configmap leases");
    let mut variants = vec![Variant::Floor];
    for layout in &layouts {
        variants.push(Variant::Sidecar {
            layout: layout.clone(),
            bin: None,
            label: layout.clone(),
        });
    }
    if let Some(bin) = std::env::var_os("MESH_BASELINE_BIN") {
        for layout in &layouts {
            variants.push(Variant::Sidecar {
                layout: layout.clone(),
                bin: Some(bin.clone().into()),
                label: format!("{layout} (baseline)"),
            });
        }
    }
    let mut results = Results::new();
    let mut rows = Vec::new();
    rt.block_on(async {
        for &n in &ns {
            for round in 0..rounds {
                let mut order = variants.clone();
                let k = round % order.len();
                order.rotate_left(k);
                for (k, v) in order.iter().enumerate() {
                    one(
                        n,
                        v,
                        &paths,
                        roll,
                        &format!("b{n}r{round}v{k}"),
                        &mut results,
                    )
                    .await;
                }
            }
            // The table so far: a later size that fails keeps these figures.
            print(&results, &[]);
            if steady_at.contains(&n) {
                for layout in &layouts {
                    let v = Variant::Sidecar {
                        layout: layout.clone(),
                        bin: None,
                        label: layout.clone(),
                    };
                    let mut m = runs::mesh(n, &v, &format!("b{n}steady{layout}")).await;
                    runs::settled(&mut m, &v).await;
                    steady::steady(&mut m, layout, &mut rows).await;
                }
            }
        }
    });
    print(&results, &rows);
}
