//! Prints a geth node's info and peers.
//!
//! ```sh
//! cargo run -p geth-ipc --example node_info -- /data/geth.ipc
//! cargo run -p geth-ipc --example node_info -- http://127.0.0.1:8545
//! cargo run -p geth-ipc --example node_info -- ws://127.0.0.1:8546 --events 10
//! ```
//!
//! Optional actions: `--add-peer ENODE`, `--remove-peer ENODE`, `--add-trusted ENODE`,
//! `--remove-trusted ENODE`; with `--events SECONDS` it subscribes to peer events
//! first (IPC and WS only) and prints them for that long, then the peers again; with
//! `--poll SECONDS` it calls `admin_nodeInfo` every second for that long, printing
//! the connection generation (restart geth meanwhile to see it reconnect).
//! Exits non-zero with the error message on failure; exits quietly (success) when
//! stdout is closed early, e.g. piped into `head`.
#![allow(clippy::print_stderr)]

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use geth_ipc::{AdminApi, ClientOptions, Endpoint, Enode, GethClient, PeerInfo};

/// Why [`run`] stopped early.
enum Failure {
    Geth(geth_ipc::Error),
    Stdout(io::Error),
}

impl From<geth_ipc::Error> for Failure {
    fn from(e: geth_ipc::Error) -> Self {
        Failure::Geth(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Stdout(e)
    }
}

/// What to do besides printing.
#[derive(Default)]
struct Actions {
    events: Option<Duration>,
    poll: Option<Duration>,
    calls: Vec<(String, Enode)>,
}

fn parse_args(args: &[String]) -> Result<(String, Actions), String> {
    let mut it = args.iter();
    let endpoint = it.next().ok_or("missing endpoint")?.clone();
    let mut actions = Actions::default();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => {
                let secs = value.parse::<u64>().map_err(|e| format!("--events: {e}"))?;
                actions.events = Some(Duration::from_secs(secs));
            }
            "--poll" => {
                let secs = value.parse::<u64>().map_err(|e| format!("--poll: {e}"))?;
                actions.poll = Some(Duration::from_secs(secs));
            }
            "--add-peer" | "--remove-peer" | "--add-trusted" | "--remove-trusted" => {
                let enode = value.parse::<Enode>().map_err(|e| e.to_string())?;
                actions.calls.push((flag.clone(), enode));
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok((endpoint, actions))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (endpoint, actions) = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "usage: node_info <ipc path | http(s)://... | ws(s)://...> [--add-peer ENODE] \
                 [--remove-peer ENODE] [--add-trusted ENODE] [--remove-trusted ENODE] [--events SECONDS] [--poll SECONDS]"
            );
            return ExitCode::from(2);
        }
    };
    let mut out = io::stdout().lock();
    match run(&mut out, &endpoint, actions).await {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (e.g. `| head`): nothing left to do.
        Err(Failure::Stdout(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Stdout(e)) => {
            eprintln!("error writing to stdout: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Geth(e)) => {
            eprintln!("error ({}): {e}", e.kind());
            ExitCode::FAILURE
        }
    }
}

fn print_peers(out: &mut impl Write, peers: &[PeerInfo]) -> io::Result<()> {
    writeln!(out, "peers:      {}", peers.len())?;
    for p in peers {
        let n = &p.network;
        writeln!(
            out,
            "  {} {} {} -> {} inbound={} trusted={} static={} eth={} caps={}",
            p.id.short(),
            p.name,
            n.local_address,
            n.remote_address,
            n.inbound,
            n.trusted,
            n.static_,
            if p.eth_ready() { "ready" } else { "handshake" },
            p.caps.join(",")
        )?;
    }
    Ok(())
}

async fn run(out: &mut impl Write, endpoint: &str, actions: Actions) -> Result<(), Failure> {
    let endpoint: Endpoint = endpoint.parse()?;
    let geth = GethClient::connect(endpoint, ClientOptions::default()).await?;
    let info = geth.node_info().await?;
    writeln!(
        out,
        "endpoint:   {} ({})",
        geth.endpoint(),
        geth.endpoint().transport()
    )?;
    writeln!(out, "id:         {}", info.id)?;
    writeln!(out, "name:       {}", info.name)?;
    writeln!(out, "enode:      {}", info.enode)?;
    match info.parsed_enode() {
        Ok(e) => writeln!(
            out,
            "  host {} tcp {} discport {:?}",
            e.host(),
            e.tcp_port(),
            e.disc_port()
        )?,
        Err(e) => writeln!(out, "  (does not parse: {e})")?,
    }
    writeln!(out, "enr:        {}", info.enr.as_deref().unwrap_or("-"))?;
    writeln!(out, "ip:         {}", info.ip.as_deref().unwrap_or("-"))?;
    writeln!(
        out,
        "ports:      discovery {} listener {}",
        info.ports.discovery, info.ports.listener
    )?;
    writeln!(
        out,
        "listenAddr: {}",
        info.listen_addr.as_deref().unwrap_or("-")
    )?;

    let mut stream = match actions.events {
        Some(_) => Some(geth.peer_events().await?),
        None => None,
    };
    for (flag, enode) in &actions.calls {
        let ok = match flag.as_str() {
            "--add-peer" => geth.add_peer(enode).await?,
            "--remove-peer" => geth.remove_peer(enode).await?,
            "--add-trusted" => geth.add_trusted_peer(enode).await?,
            _ => geth.remove_trusted_peer(enode).await?,
        };
        writeln!(out, "{flag} {enode:?}: {ok}")?;
    }
    print_peers(out, &geth.peers().await?)?;

    if let (Some(duration), Some(stream)) = (actions.events, stream.as_mut()) {
        writeln!(out, "peer events for {duration:?}:")?;
        let deadline = tokio::time::sleep(duration);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => writeln!(out,
                        "  {} {} error={:?} local={:?} remote={:?} protocol={:?}",
                        ev.kind, ev.peer.short(), ev.error, ev.local, ev.remote, ev.protocol
                    )?,
                    Some(Err(e)) => return Err(e.into()),
                    None => break,
                },
            }
        }
        print_peers(out, &geth.peers().await?)?;
    }
    if let Some(duration) = actions.poll {
        // Survives geth restarts: each call after a broken connection reconnects.
        let end = tokio::time::Instant::now() + duration;
        while tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match geth.node_info().await {
                Ok(i) => writeln!(
                    out,
                    "poll: ok {} generation {}",
                    i.id.short(),
                    geth.connection_generation()
                )?,
                Err(e) => writeln!(out, "poll: {} ({e})", e.kind())?,
            }
        }
    }
    writeln!(
        out,
        "connection generation: {}",
        geth.connection_generation()
    )?;
    Ok(())
}
