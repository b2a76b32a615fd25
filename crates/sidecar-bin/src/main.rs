//! geth-peer-sidecar: keeps every geth of a private Ethereum network on
//! Kubernetes peered with every other, through a shared ConfigMap registry and
//! geth's admin API over IPC.
#![forbid(unsafe_code)]

mod config;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use config::{Cli, Command, Common, LogFormat, RegistryLayout};
use geth_ipc::{ClientOptions, Endpoint, GethClient};
use peer_registry::{ConfigMapRegistry, LeaseRegistry, PeerRegistry};
use sidecar_runtime::{Events, Health, PodWatch, Sidecar};

fn init_tracing(common: &Common) -> anyhow::Result<()> {
    let level = config::level_filter(&common.logging).map_err(anyhow::Error::msg)?;
    // Our crates at the chosen level; dependencies one notch quieter.
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "warn,geth_peer_sidecar={level},sidecar_runtime={level},geth_ipc={level},peer_registry={level},reconcile_core={level}"
        ))
    });
    // Colour only on a terminal: `kubectl logs` and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    match common.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

/// The namespace: flag/env, else the pod's service-account namespace, else the
/// kubeconfig's default.
fn namespace(common: &Common, client: &kube::Client) -> String {
    if let Some(ns) = &common.namespace {
        return ns.clone();
    }
    let sa = Path::new("/var/run/secrets/kubernetes.io/serviceaccount/namespace");
    if let Ok(ns) = std::fs::read_to_string(sa) {
        let ns = ns.trim();
        if !ns.is_empty() {
            return ns.to_owned();
        }
    }
    client.default_namespace().to_owned()
}

async fn kube_client(common: &Common) -> anyhow::Result<kube::Client> {
    let config = match &common.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: not in a pod with a service account, and no KUBECONFIG",
        )?,
    };
    sidecar_runtime::kube_client(config).context("building the Kubernetes client")
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_tracing(&cli.common) {
        eprintln!("geth-peer-sidecar: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("geth-peer-sidecar: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let endpoint: Endpoint = cli
        .common
        .ipc_path
        .parse()
        .with_context(|| format!("IPC_PATH={:?}", cli.common.ipc_path))?;
    let options = ClientOptions {
        request_timeout: cli.common.rpc_timeout,
        ..ClientOptions::default()
    };
    let geth = Arc::new(GethClient::new(endpoint, options));
    let client = kube_client(&cli.common).await?;
    let ns = namespace(&cli.common, &client);
    let name = cli.common.configmap_name.clone();
    match cli.common.registry_layout {
        RegistryLayout::Configmap => {
            let registry = ConfigMapRegistry::new(client.clone(), ns.clone(), name);
            serve(cli, geth, client, ns, Arc::new(registry)).await
        }
        RegistryLayout::Leases => {
            // The name is the Leases' label value: at most 63 characters.
            if name.len() > 63 {
                anyhow::bail!(
                    "CONFIGMAP_NAME={name:?} is {} characters; with REGISTRY_LAYOUT=leases it \
                     labels every member Lease, and a label value has at most 63: choose a \
                     shorter name",
                    name.len()
                );
            }
            let mut registry = LeaseRegistry::new(client.clone(), ns.clone(), name);
            // The same pod name as the member's key (POD_NAME, else HOSTNAME).
            if let Some(pod) = cli.run.pod() {
                registry = registry.publishing_as(pod);
            }
            serve(cli, geth, client, ns, Arc::new(registry)).await
        }
    }
}

/// Runs the command on `registry`.
async fn serve<R: PeerRegistry + 'static>(
    cli: Cli,
    geth: Arc<GethClient>,
    client: kube::Client,
    ns: String,
    registry: Arc<R>,
) -> anyhow::Result<()> {
    let name = &cli.common.configmap_name;
    match cli.command {
        Some(Command::Status { output }) => {
            let output = output.with_port(cli.run.listen.port());
            let shown = sidecar_runtime::status::show(&*registry, &*geth, output)
                .await
                .with_context(|| format!("reading ConfigMap {ns}/{name}"))?;
            match shown {
                #[allow(clippy::print_stdout)]
                Some(text) => print!("{text}"),
                None => eprintln!(
                    "ConfigMap {ns}/{name} does not exist yet (no sidecar has registered)"
                ),
            }
            Ok(())
        }
        None => {
            let mut settings = cli.run.settings(&ns)?;
            if let Endpoint::Ipc(path) = geth.endpoint() {
                settings.geth_socket = Some(path.clone());
            }
            if cli.run.events {
                settings.hooks = Arc::new(Events::spawn(
                    client.clone(),
                    &ns,
                    &settings.pod,
                    settings.pod_uid.clone(),
                ));
            }
            if cli.run.read_pods {
                let selector =
                    Some(cli.run.pod_selector.trim().to_owned()).filter(|s| !s.is_empty());
                settings.pods = Some(Arc::new(PodWatch::spawn(
                    kube::Api::namespaced(client, &ns),
                    selector,
                )));
            }
            let liveness = cli
                .run
                .checked_liveness_timeout()
                .map_err(anyhow::Error::msg)?;
            let pod = settings.pod.clone();
            let advertise = format!("{:?}", settings.advertise);
            let sidecar =
                Sidecar::new(geth, registry, settings).with_health(Arc::new(Health::new(liveness)));
            sidecar.serve_http(cli.run.listen).await?;
            tracing::info!(
                pod = %pod,
                advertise = %advertise,
                version = env!("CARGO_PKG_VERSION"),
                "geth-peer-sidecar starting"
            );
            sidecar.run_until(sidecar_runtime::shutdown_signal()).await;
            Ok(())
        }
    }
}
