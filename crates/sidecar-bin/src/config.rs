//! Command line and environment configuration.
//!
//! Every option has an environment variable; the seed's names (`LOGGING`,
//! `IPC_PATH`, `CONFIGMAP_NAME`, `NAMESPACE`) are kept.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Keeps every geth of a private network peered with every other, through a
/// shared ConfigMap and geth's admin API over IPC.
#[derive(Debug, Parser)]
#[command(name = "geth-peer-sidecar", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,

    #[command(flatten)]
    pub(crate) common: Common,

    #[command(flatten)]
    pub(crate) run: RunArgs,
}

/// Subcommands; without one the sidecar runs.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print the registry's members (and, with --ipc-path reachable, whether
    /// this geth is connected to each), then exit. Needs only the kubeconfig
    /// (or the pod's service account): it works from outside the pod.
    Status {
        /// Output format: a table, JSON for tools, or the mesh as a Graphviz
        /// DOT graph (`dot -Tsvg`).
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Output format of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// An aligned table.
    Table,
    /// One JSON object (the `registry` part of the `/status` endpoint).
    Json,
    /// The mesh as a Graphviz DOT graph: every member's sidecar is asked for
    /// its `/status` (at LISTEN_ADDR's port), so run it where pod IPs are
    /// reachable, e.g. `kubectl exec` in a sidecar container.
    Dot,
}

impl Output {
    /// The runtime's format; members' sidecars listen on `sidecar_port`.
    pub(crate) fn with_port(self, sidecar_port: u16) -> sidecar_runtime::status::Output {
        use sidecar_runtime::status::Output as O;
        match self {
            Output::Table => O::Table,
            Output::Json => O::Json,
            Output::Dot => O::Dot { sidecar_port },
        }
    }
}

/// Options shared by the sidecar and `status`.
#[derive(Debug, clap::Args)]
pub(crate) struct Common {
    /// geth's IPC socket (a path), or an http:// or ws:// endpoint for testing.
    /// geth creates the socket 0600: run the sidecar as geth's user.
    #[arg(
        long,
        env = "IPC_PATH",
        default_value = "/data/geth.ipc",
        global = true
    )]
    pub(crate) ipc_path: String,

    /// Name of the shared registry ConfigMap.
    #[arg(
        long,
        env = "CONFIGMAP_NAME",
        default_value = "geth-shared-static-nodes",
        global = true
    )]
    pub(crate) configmap_name: String,

    /// Where members are registered. `configmap`: one record per member in
    /// the shared ConfigMap (needs RBAC on configmaps only). `leases`: one
    /// Lease per member, `static-nodes.json` still derived into the ConfigMap
    /// (also needs get, list, watch, create, update, delete on leases):
    /// registration without conflicts, for fleets of hundreds (docs/migration.md).
    #[arg(
        long,
        env = "REGISTRY_LAYOUT",
        value_enum,
        default_value_t = RegistryLayout::Configmap,
        global = true
    )]
    pub(crate) registry_layout: RegistryLayout,

    /// Namespace of the ConfigMap. Default: the pod's service-account namespace,
    /// else the kubeconfig's namespace.
    #[arg(long, env = "NAMESPACE", global = true)]
    pub(crate) namespace: Option<String>,

    /// Kubeconfig file. Default: in-cluster service account, else $KUBECONFIG or
    /// ~/.kube/config.
    #[arg(long, env = "KUBECONFIG", global = true)]
    pub(crate) kubeconfig: Option<PathBuf>,

    /// Log level: DEBUG, INFO, WARNING or ERROR (also TRACE).
    #[arg(long, env = "LOGGING", default_value = "INFO", global = true)]
    pub(crate) logging: String,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub(crate) log_format: LogFormat,

    /// Timeout of each geth RPC call.
    #[arg(long, env = "RPC_TIMEOUT", value_parser = parse_duration, default_value = "5s", global = true)]
    pub(crate) rpc_timeout: Duration,
}

/// Options of the running sidecar.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// This pod's name (Downward API metadata.name): the member's key.
    #[arg(long, env = "POD_NAME")]
    pub(crate) pod_name: Option<String>,

    /// This pod's IP (Downward API status.podIP).
    #[arg(long, env = "POD_IP")]
    pub(crate) pod_ip: Option<String>,

    /// This pod's UID (Downward API metadata.uid): tells a replaced pod apart.
    #[arg(long, env = "POD_UID")]
    pub(crate) pod_uid: Option<String>,

    /// Which address to publish in the enode. Default: pod-ip when POD_IP is set,
    /// else what geth reports (a 127.0.0.1 enode is refused with an explanation).
    #[arg(long, env = "ADVERTISE", value_enum)]
    pub(crate) advertise: Option<Advertise>,

    /// DNS name template for --advertise dns. Placeholders: {pod}, {service},
    /// {namespace}. geth >= 1.15 re-resolves it at every dial.
    #[arg(
        long,
        env = "DNS_TEMPLATE",
        default_value = "{pod}.{service}.{namespace}.svc.cluster.local"
    )]
    pub(crate) dns_template: String,

    /// Headless Service name for the {service} placeholder.
    #[arg(long, env = "SERVICE_NAME", default_value = "geth")]
    pub(crate) service_name: String,

    /// TCP port to publish. Default: the listener port geth reports.
    #[arg(long, env = "P2P_PORT")]
    pub(crate) p2p_port: Option<u16>,

    /// Also mark every member trusted (admin_addTrustedPeer), so maxpeers never
    /// refuses a mesh member.
    #[arg(long, env = "TRUSTED_PEERS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub(crate) trusted: bool,

    /// Safety-net resync period (jittered by up to 20%). Changes are handled at
    /// once from watch and peer events; this only catches what was missed.
    #[arg(long, env = "RESYNC_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub(crate) resync_interval: Duration,

    /// A member whose p2p endpoint has been unreachable from here continuously
    /// this long, and is not connected to this geth, may be removed.
    #[arg(long, env = "DEAD_AFTER", value_parser = parse_duration, default_value = "120s")]
    pub(crate) dead_after: Duration,

    /// A member registered or updated less than this long ago is never removed
    /// (protects new members from stale probe or pod state).
    #[arg(long, env = "REGISTRATION_GRACE", value_parser = parse_duration, default_value = "60s")]
    pub(crate) registration_grace: Duration,

    /// How often unreachable-looking members are probed (TCP connect).
    #[arg(long, env = "PROBE_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub(crate) probe_interval: Duration,

    /// Address of the HTTP server for /healthz, /readyz, /status and /metrics.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:9090")]
    pub(crate) listen: SocketAddr,

    /// /healthz fails (503) when the event loop has not completed a pass for
    /// this long, so a stuck loop gets the container restarted. The loop passes
    /// at least every 1.2 x RESYNC_INTERVAL, so this must be longer; 0 turns
    /// the check off.
    #[arg(long, env = "LIVENESS_TIMEOUT", value_parser = parse_duration_or_off, default_value = "2m")]
    pub(crate) liveness_timeout: Duration,

    /// Read the namespace's pods: a member whose pod is gone, or was replaced
    /// (other UID or IP), is removed at once instead of after DEAD_AFTER. Needs
    /// pods get/list in the Role (deploy/overlays/pod-evidence).
    #[arg(long, env = "READ_PODS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub(crate) read_pods: bool,

    /// With READ_PODS: the label selector of the member pods, so the pod watch
    /// follows only them (e.g. app.kubernetes.io/name=geth). Empty: every pod
    /// of the namespace. A member pod the selector misses is read with a GET.
    #[arg(long, env = "POD_SELECTOR", default_value = "")]
    pub(crate) pod_selector: String,

    /// Peer with legacy members: static-nodes.json entries without a member
    /// record, as the original (Python) sidecar writes them, while a fleet
    /// migrates from it. Turn off once every node runs this sidecar.
    #[arg(long, env = "LEGACY_MEMBERS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub(crate) legacy_members: bool,

    /// Publish Kubernetes Events on this pod (registered, moved, member removed,
    /// peer unusable, peer limits, partition, registry unwritable). Needs create
    /// and patch on events.k8s.io/events.
    #[arg(long, env = "EVENTS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub(crate) events: bool,

    /// Member address allowlist: comma-separated IPv4/IPv6 CIDRs (e.g.
    /// 10.244.0.0/16,fd00::/8). A member record whose enode IP lies outside
    /// every one is refused (never dialled, warned once naming its key). A DNS
    /// name is held to it by what it resolves to; external-peers.json is never
    /// filtered. Empty: any routable address.
    #[arg(long, env = "MEMBER_CIDRS", default_value = "", value_parser = parse_member_cidrs)]
    pub(crate) member_cidrs: MemberCidrs,

    /// Without pod evidence, a member unreachable from here for DEAD_AFTER is
    /// removed only when this many other members' sidecars, asked to probe it
    /// (GET /v1/probe on their port), all find it unreachable too. 0 acts on
    /// this sidecar's view alone, which a one-way broken path turns into
    /// wrong removals.
    #[arg(long, env = "REMOVAL_CONFIRMATIONS", default_value_t = 2)]
    pub(crate) removal_confirmations: usize,
}

/// The parsed MEMBER_CIDRS: empty means any address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MemberCidrs(pub(crate) Vec<reconcile_core::Cidr>);

/// Parses MEMBER_CIDRS: a comma-separated list of CIDRs, blanks ignored; an
/// empty list allows any address. Any invalid entry fails startup.
pub(crate) fn parse_member_cidrs(s: &str) -> Result<MemberCidrs, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse().map_err(|e| {
                format!("MEMBER_CIDRS: {e} (give e.g. 10.244.0.0/16,fd00::/8, or leave it empty)")
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(MemberCidrs)
}

/// `value` unless it is empty: an env var set to "" counts as unset (clap
/// takes it as a value).
fn non_empty(value: Option<&String>) -> Option<String> {
    value.filter(|v| !v.is_empty()).cloned()
}

/// The first non-empty of `pod_name` and `hostname` ([`RunArgs::pod`]).
fn pod_name_from(pod_name: Option<String>, hostname: Option<String>) -> Option<String> {
    non_empty(pod_name.as_ref()).or(non_empty(hostname.as_ref()))
}

impl RunArgs {
    /// The runtime's settings for this pod in `namespace` (ports left at
    /// their defaults: the system clock, TCP probes, no pod evidence, no
    /// hooks; `main` plugs in the Kubernetes ones).
    pub(crate) fn settings(&self, namespace: &str) -> anyhow::Result<sidecar_runtime::Settings> {
        use anyhow::Context as _;
        let pod = self.pod().context(
            "POD_NAME and HOSTNAME are both unset or empty (set POD_NAME with the Downward API: \
             fieldRef metadata.name)",
        )?;
        let advertise = sidecar_runtime::AdvertiseMode::resolve(
            self.advertise.map(Into::into),
            self.pod_ip().as_deref(),
            &self.dns_template,
            &pod,
            &self.service_name,
            namespace,
        )?;
        let mut s = sidecar_runtime::Settings::new(pod, advertise);
        s.pod_ip = self.pod_ip();
        s.pod_uid = self.pod_uid();
        s.p2p_port = self.p2p_port;
        s.engine = reconcile_core::Config {
            trusted: self.trusted,
            dead_after: self.dead_after,
            grace_after_register: self.registration_grace,
            legacy_members: self.legacy_members,
            member_cidrs: self.member_cidrs.0.clone(),
            confirmations_needed: self.removal_confirmations,
            confirmation_max_age: (self.probe_interval * 3).max(std::time::Duration::from_secs(10)),
            ..reconcile_core::Config::default()
        };
        s.resync = self.resync_interval;
        s.probe_interval = self.probe_interval;
        s.sidecar_port = self.listen.port();
        s.validate()?;
        Ok(s)
    }

    /// This pod's name: `POD_NAME`, else `$HOSTNAME` (a pod's hostname is its
    /// name unless the spec sets another). An empty value counts as unset (a
    /// pod spec with `value: ""` otherwise registered nobody, forever).
    pub(crate) fn pod(&self) -> Option<String> {
        pod_name_from(self.pod_name.clone(), std::env::var("HOSTNAME").ok())
    }

    /// `POD_IP`, unless unset or empty.
    pub(crate) fn pod_ip(&self) -> Option<String> {
        non_empty(self.pod_ip.as_ref())
    }

    /// `POD_UID`, unless unset or empty (an empty UID would be written into
    /// the member's record and, with the lease layout, its ownerReference).
    pub(crate) fn pod_uid(&self) -> Option<String> {
        non_empty(self.pod_uid.as_ref())
    }

    /// LIVENESS_TIMEOUT, checked against RESYNC_INTERVAL: a healthy but idle loop
    /// passes only at each (jittered, up to +20%) resync, so a shorter timeout
    /// would restart healthy containers. `None` when the check is off.
    pub(crate) fn checked_liveness_timeout(&self) -> Result<Option<Duration>, String> {
        if self.liveness_timeout.is_zero() {
            return Ok(None);
        }
        let idle_gap = self.resync_interval.mul_f64(1.2);
        if self.liveness_timeout <= idle_gap {
            return Err(format!(
                "LIVENESS_TIMEOUT={:?} is not longer than 1.2 x RESYNC_INTERVAL ({:?}): an idle, \
                 healthy loop would fail /healthz; raise LIVENESS_TIMEOUT (or set 0 to turn the check off)",
                self.liveness_timeout, idle_gap
            ));
        }
        Ok(Some(self.liveness_timeout))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// How the registry is stored (see `REGISTRY_LAYOUT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RegistryLayout {
    /// One record per member in the shared ConfigMap.
    Configmap,
    /// One Lease per member; `static-nodes.json` derived into the ConfigMap.
    Leases,
}

/// What address the published enode carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Advertise {
    /// The pod IP (POD_IP).
    PodIp,
    /// A stable DNS name from --dns-template (StatefulSet + headless Service).
    Dns,
    /// Exactly what geth's admin_nodeInfo reports.
    Geth,
}

impl From<Advertise> for sidecar_runtime::Advertise {
    fn from(a: Advertise) -> Self {
        match a {
            Advertise::PodIp => Self::PodIp,
            Advertise::Dns => Self::Dns,
            Advertise::Geth => Self::Geth,
        }
    }
}

/// Like [`parse_duration`], but `0` (with or without a unit) means "off" and
/// parses to [`Duration::ZERO`]; for settings documented as "0 turns it off".
pub(crate) fn parse_duration_or_off(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = ["ms", "s", "m", "h"]
        .iter()
        .find_map(|unit| t.strip_suffix(unit))
        .unwrap_or(t);
    if !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.parse::<f64>() == Ok(0.0)
    {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// The longest duration accepted by [`parse_duration`].
const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);

/// Parses `500ms`, `30s`, `2m`, `1h` or plain seconds; rejects 0 and anything over
/// a week, with a message saying why.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 30s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    if secs <= 0.0 {
        return Err(format!(
            "duration {s:?} is zero: an interval of 0 is a busy loop and a timeout of 0 \
             always fails; give a positive duration such as 500ms or 30s"
        ));
    }
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!(
            "duration {s:?} is longer than {} days, which no interval or timeout here \
             needs; give e.g. 30s, 2m or 1h",
            MAX_DURATION.as_secs() / 86_400
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Maps the seed's `LOGGING` values (Python level names) to a tracing filter.
pub(crate) fn level_filter(logging: &str) -> Result<&'static str, String> {
    match logging.trim().to_ascii_uppercase().as_str() {
        "TRACE" => Ok("trace"),
        "DEBUG" => Ok("debug"),
        "INFO" => Ok("info"),
        "WARNING" | "WARN" => Ok("warn"),
        "ERROR" | "CRITICAL" => Ok("error"),
        other => Err(format!(
            "LOGGING={other:?} is not a level: use DEBUG, INFO, WARNING or ERROR"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_pod_name_falls_back_to_the_hostname_and_empty_pod_fields_count_as_unset() {
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(pod_name_from(some("geth-1"), some("h")), some("geth-1"));
        assert_eq!(pod_name_from(some(""), some("geth-0")), some("geth-0"));
        assert_eq!(pod_name_from(None, some("geth-0")), some("geth-0"));
        assert_eq!(pod_name_from(some(""), some("")), None);
        assert_eq!(pod_name_from(None, None), None);
        assert_eq!(non_empty(Some(&String::new())), None);
        assert_eq!(non_empty(Some(&"10.0.0.1".to_owned())), some("10.0.0.1"));
    }

    #[test]
    fn durations_accept_units_and_plain_seconds() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn zero_and_absurd_durations_are_rejected_with_the_reason() {
        assert!(parse_duration("0").unwrap_err().contains("zero"));
        assert_eq!(parse_duration_or_off("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_off("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_off("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration_or_off("0x").is_err());
        assert!(parse_duration("0ms").unwrap_err().contains("zero"));
        assert!(parse_duration("200h").unwrap_err().contains("7 days"));
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("168h").is_ok());
    }

    #[test]
    fn seed_logging_levels_map_to_filters() {
        assert_eq!(level_filter("WARNING").unwrap(), "warn");
        assert_eq!(level_filter("debug").unwrap(), "debug");
        assert!(level_filter("LOUD").unwrap_err().contains("LOUD"));
    }

    #[test]
    fn every_option_documents_its_env_var() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for env in [
            "IPC_PATH",
            "CONFIGMAP_NAME",
            "NAMESPACE",
            "LOGGING",
            "POD_NAME",
            "POD_IP",
            "POD_UID",
            "ADVERTISE",
            "TRUSTED_PEERS",
            "RESYNC_INTERVAL",
            "DEAD_AFTER",
            "LISTEN_ADDR",
            "LIVENESS_TIMEOUT",
            "POD_SELECTOR",
            "MEMBER_CIDRS",
        ] {
            assert!(
                help.contains(&format!("env: {env}")),
                "{env} missing from --help"
            );
        }
    }

    #[test]
    fn member_cidrs_parse_from_a_comma_separated_list_and_fail_startup_when_invalid() {
        let parse = |argv: &[&str]| {
            let mut full = vec!["geth-peer-sidecar"];
            full.extend(argv);
            Cli::try_parse_from(full).map(|c| c.run.member_cidrs)
        };
        assert_eq!(parse(&[]).unwrap(), MemberCidrs::default());
        assert_eq!(
            parse(&["--member-cidrs", ""]).unwrap(),
            MemberCidrs::default()
        );
        let both = parse(&["--member-cidrs", "10.244.0.0/16, fd00::/8"]).unwrap();
        let shown: Vec<String> = both.0.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.244.0.0/16", "fd00::/8"]);
        let err = parse(&["--member-cidrs", "10.244.0.0/16,10.1.2.3"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MEMBER_CIDRS"), "{err}");
        assert!(err.contains(r#"invalid CIDR "10.1.2.3""#), "{err}");
        let err = parse_member_cidrs("fd00::/200").unwrap_err();
        assert!(
            err.contains("MEMBER_CIDRS") && err.contains("fd00::/200"),
            "{err}"
        );
    }

    #[test]
    fn liveness_timeout_must_exceed_the_idle_resync_gap() {
        let args = |extra: &[&str]| {
            let mut argv = vec!["geth-peer-sidecar"];
            argv.extend(extra);
            Cli::try_parse_from(argv).unwrap().run
        };
        assert_eq!(
            args(&[]).checked_liveness_timeout(),
            Ok(Some(Duration::from_secs(120)))
        );
        assert_eq!(
            args(&["--liveness-timeout", "0"]).checked_liveness_timeout(),
            Ok(None)
        );
        let err = args(&["--liveness-timeout", "35s"])
            .checked_liveness_timeout()
            .unwrap_err();
        assert!(
            err.contains("LIVENESS_TIMEOUT") && err.contains("RESYNC_INTERVAL"),
            "{err}"
        );
        assert!(
            args(&["--liveness-timeout", "3s", "--resync-interval", "2s"])
                .checked_liveness_timeout()
                .is_ok()
        );
    }

    #[test]
    fn readme_configuration_table_matches_the_cli() {
        use clap::CommandFactory;
        let readme = include_str!("../../../docs/configuration.md");
        // Rows: | `--flag` | `ENV` | default | meaning |
        let rows: Vec<Vec<String>> = readme
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|l| {
                l.split('|')
                    .map(|c| c.trim().trim_matches('`').to_owned())
                    .collect()
            })
            .collect();
        let cmd = Cli::command();
        let args: Vec<_> = cmd
            .get_arguments()
            .filter(|a| a.get_long().is_some_and(|l| l != "help" && l != "version"))
            .collect();
        assert_eq!(rows.len(), args.len(), "README rows vs CLI options");
        for arg in args {
            let long = format!("--{}", arg.get_long().unwrap_or_default());
            let row = rows
                .iter()
                .find(|r| r[1] == long)
                .unwrap_or_else(|| panic!("{long} is not in the README's configuration table"));
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(Some(row[2].clone()), env, "env of {long}");
            if let Some(default) = arg.get_default_values().first() {
                let default = default.to_string_lossy();
                assert_eq!(row[3], default, "default of {long}");
            }
        }
    }
}
