//! The real-node demo's commands and live table, shared by the demo binary
//! (`scripts/demo.sh`) and the node test that drives every command.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::{Error, Release, Result};

/// The commands the real-node demo offers.
pub const HELP: &str = "commands: d N = delete pod N (it returns on a new IP) | \
k N = stop geth in pod N (the container restarts and forgets its peers) | s N = scale to N pods | q = quit";

/// Pods the demo can scale to (one volume each is prepared).
pub const MAX_NODES: usize = 9;

/// What the table prints after a pod connected to every other pod.
pub const FULL_MARK: &str = "  (all)";

/// One command typed into the demo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// An empty line.
    Nothing,
    /// `d N`: delete pod N; the StatefulSet recreates it on a new IP.
    DeletePod(usize),
    /// `k N`: stop geth in pod N (`kill 1` in its container, as a user would
    /// with `kubectl exec`); the kubelet restarts the container.
    StopGeth(usize),
    /// `s N`: scale the StatefulSet to N pods.
    Scale(usize),
    /// `q`: quit (the demo tears everything down).
    Quit,
}

impl Command {
    /// Parses one line; the error is what to tell the user.
    pub fn parse(line: &str) -> Result<Command> {
        let mut parts = line.split_whitespace();
        let cmd = parts.next().unwrap_or_default();
        let n: Option<usize> = parts.next().and_then(|v| v.parse().ok());
        let which = || n.ok_or_else(|| Error::Setup("which pod? (its ordinal)".into()));
        Ok(match cmd {
            "" => Command::Nothing,
            "q" | "quit" => Command::Quit,
            "d" => Command::DeletePod(which()?),
            "k" => Command::StopGeth(which()?),
            "s" => Command::Scale(
                n.filter(|n| (1..=MAX_NODES).contains(n))
                    .ok_or_else(|| Error::Setup(format!("scale to 1..={MAX_NODES}")))?,
            ),
            _ => return Err(Error::Setup(HELP.to_owned())),
        })
    }
}

/// Runs `cmd` on the release and says what happened (what to watch for).
pub fn apply(r: &Release<'_>, cmd: Command) -> Result<String> {
    let pod = |i: usize| format!("{}-{i}", r.statefulset);
    Ok(match cmd {
        Command::Nothing => String::new(),
        Command::Quit => "tearing down...".to_owned(),
        Command::DeletePod(i) => {
            let p = pod(i);
            r.kubectl(&["delete", "pod", &p, "--wait=false"])?;
            format!("{p} deleted: the StatefulSet recreates it on a new IP")
        }
        Command::StopGeth(i) => {
            let p = pod(i);
            // PID 1 of the geth container is geth; `kill` is a busybox applet
            // in ethereum/client-go's Alpine image (and in the test bed's).
            r.kubectl(&["exec", &p, "-c", "geth", "--", "kill", "1"])?;
            format!(
                "geth in {p} stopped: the kubelet restarts it, its sidecar re-applies every peer"
            )
        }
        Command::Scale(n) => {
            r.kubectl(&[
                "scale",
                "statefulset",
                &r.statefulset,
                &format!("--replicas={n}"),
            ])?;
            format!("scaled to {n}")
        }
    })
}

/// The live table: each pod, its IP, readiness, registration and geth's own
/// peers (`admin.peers`, by pod ordinal); [`FULL_MARK`] after a pod connected
/// to every other.
pub async fn table(r: &Release<'_>) -> String {
    let pods = r.pods().await.unwrap_or_default();
    let members = r.members().await.unwrap_or_default();
    let by_ip: BTreeMap<Ipv4Addr, String> = pods
        .iter()
        .filter_map(|p| Some((p.ip?, p.name.rsplit('-').next()?.to_owned())))
        .collect();
    let mut out = format!(
        "{:<26} {:<14} {:<6} {:<11} {}\n",
        "POD", "IP", "READY", "REGISTERED", "GETH PEERS (admin.peers)"
    );
    for p in &pods {
        let peers: Vec<String> = if p.ready {
            r.geth_peer_ips(&p.name)
                .unwrap_or_default()
                .iter()
                .map(|ip| by_ip.get(ip).cloned().unwrap_or_else(|| ip.to_string()))
                .collect()
        } else {
            Vec::new()
        };
        let full =
            p.ready && peers.len() + 1 == pods.len() && peers.iter().all(|p| !p.contains('.'));
        let ready = match (p.deleting, p.ready) {
            (true, _) => "term",
            (false, true) => "yes",
            (false, false) => "no",
        };
        let registered = if members.contains_key(&p.name) {
            "yes"
        } else {
            "no"
        };
        out.push_str(&format!(
            "{:<26} {:<14} {:<6} {:<11} {}{}\n",
            p.name,
            p.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into()),
            ready,
            registered,
            peers.join(","),
            if full { FULL_MARK } else { "" }
        ));
    }
    out
}

/// True when `table` (as [`table`] prints it) shows `n` pods, each connected
/// to every other.
pub fn table_shows_full_mesh(table: &str, n: usize) -> bool {
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("POD "))
        .collect();
    rows.len() == n && rows.iter().all(|l| l.ends_with(FULL_MARK))
}
