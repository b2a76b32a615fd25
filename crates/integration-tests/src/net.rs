//! One network namespace per node ("pod"), joined by a per-test bridge.
//!
//! Addresses come from 10.244.0.0/16, a typical Kubernetes pod CIDR (or, for
//! tests of geth's inbound throttle, 100.64.0.0/16: [`PodRange`]), and never
//! leave the test's own bridge (the namespaces have no default route). Each test
//! gets its own /24 and its own bridge. A private range matters: geth throttles
//! inbound connections to one per IP per 30 s unless the address is loopback,
//! RFC 1918 or link-local, which would make every reconnect wait 30 s. The root namespace
//! holds `.1` on the bridge, which is where the test's apiserver listens, so a
//! process in a node's namespace reaches it exactly as a pod reaches the API.
//!
//! The namespaces of one bridge know each other's MAC addresses as permanent
//! neighbour entries ([`Neighbours`]) instead of resolving them by ARP. The
//! kernel's neighbour table is one table for the whole machine: dynamic
//! entries of every namespace count against `net.ipv4.neigh.default.gc_thresh3`
//! (1024 by default), and a mesh of N namespaces needs N x (N-1) of them. At
//! N=30 with pods moving to new addresses that overflowed ("neighbor table
//! overflow!" in the kernel log): dials hung for geth's 15 s timeout, and geth
//! then waited out its 35 s redial. Permanent entries are exempt from that
//! limit, so no machine-wide sysctl needs raising.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| Error::Setup(format!("run {}: {e}", args.join(" "))))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Setup(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs `ip -n <ns> -batch -` with `lines` as its commands.
fn batch(ns: &str, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let what = format!("ip -n {ns} -batch -");
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Setup(format!("run {what}: {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::Setup(format!("{what}: no stdin")))?;
    stdin
        .write_all(lines.join("\n").as_bytes())
        .map_err(|e| Error::Setup(format!("write to {what}: {e}")))?;
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Setup(format!("wait for {what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Setup(format!(
            "`{what}` failed on {lines:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Permanent neighbour (ARP) entries between the namespaces of one bridge:
/// each namespace knows every other's current address and MAC, so none of
/// them fills the machine-wide neighbour table (see the module docs).
#[derive(Default)]
struct Neighbours {
    /// Namespace name to (address, MAC of its `eth0`).
    members: Mutex<BTreeMap<String, (Ipv4Addr, String)>>,
}

impl Neighbours {
    fn entry(ip: Ipv4Addr, mac: &str) -> String {
        format!("neigh replace {ip} lladdr {mac} dev eth0 nud permanent")
    }

    fn forget(ip: Ipv4Addr) -> String {
        format!("neigh del {ip} dev eth0")
    }

    /// `ns` joins with `ip` and `mac`: it learns every member, every member learns it.
    fn join(&self, ns: &str, ip: Ipv4Addr, mac: &str) -> Result<()> {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let known: Vec<String> = members
            .values()
            .map(|(ip, mac)| Self::entry(*ip, mac))
            .collect();
        batch(ns, &known)?;
        for other in members.keys() {
            batch(other, &[Self::entry(ip, mac)])?;
        }
        members.insert(ns.to_owned(), (ip, mac.to_owned()));
        Ok(())
    }

    /// `ns` moved to `new`: every other member forgets its old address and
    /// learns the new one, and `ns` learns them all again (removing an
    /// interface's last address flushes its neighbours, permanent or not).
    fn moved(&self, ns: &str, new: Ipv4Addr) -> Result<()> {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let Some((old, mac)) = members.get(ns).cloned() else {
            return Ok(());
        };
        let mut known = Vec::new();
        for (other, (ip, other_mac)) in members.iter().filter(|(k, _)| k.as_str() != ns) {
            batch(other, &[Self::forget(old), Self::entry(new, &mac)])?;
            known.push(Self::entry(*ip, other_mac));
        }
        batch(ns, &known)?;
        members.insert(ns.to_owned(), (new, mac));
        Ok(())
    }

    /// `ns` is gone: every other member forgets it.
    fn leave(&self, ns: &str) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((ip, _)) = members.remove(ns) {
            for other in members.keys() {
                let _ = batch(other, &[Self::forget(ip)]);
            }
        }
    }
}

fn unique_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{:x}", std::process::id() % 0xfff, n)
}

/// The names of every network namespace that currently exists.
pub fn list_netns() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    })
    .unwrap_or_default()
}

/// The address space a test's pods get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodRange {
    /// 10.244.K.0/24 (RFC 1918): geth never throttles inbound connections.
    #[default]
    Private,
    /// 100.64.K.0/24 (RFC 6598 shared address space, a common pod CIDR): geth
    /// throttles inbound connections to one per IP per 30 s.
    SharedAddressSpace,
}

impl PodRange {
    fn first_octets(self) -> [u8; 2] {
        match self {
            PodRange::Private => [10, 244],
            PodRange::SharedAddressSpace => [100, 64],
        }
    }
}

/// A per-test Linux bridge in the root namespace with its own /24.
pub struct Bridge {
    name: String,
    id: String,
    prefix: [u8; 3],
    neighbours: Arc<Neighbours>,
}

impl Bridge {
    /// Creates a bridge on a free 10.244.K.0/24 subnet and gives the root
    /// namespace address `.1` on it.
    pub fn create() -> Result<Bridge> {
        Self::create_in(PodRange::Private)
    }

    /// Creates a bridge on a free /24 of `range` (its third octet free on this
    /// machine, checked against every address and route) with `.1` in the root
    /// namespace. The subnet stays on the bridge: it is never routed elsewhere.
    pub fn create_in(range: PodRange) -> Result<Bridge> {
        static ALLOC: Mutex<()> = Mutex::new(());
        let _guard = ALLOC.lock().unwrap_or_else(|e| e.into_inner());
        let used = Command::new("ip")
            .args(["-4", "-o", "addr", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let routes = Command::new("ip")
            .args(["-4", "route", "show", "table", "all"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let [a, b] = range.first_octets();
        let start = (std::process::id() as usize * 7) % 256;
        let prefix = (0..256)
            .map(|i| (start + i) % 256)
            .map(|k| [a, b, k as u8])
            .find(|p| {
                let net = format!("{}.{}.{}.", p[0], p[1], p[2]);
                !used.contains(&format!(" {net}")) && !routes.contains(&net)
            })
            .ok_or_else(|| Error::Setup(format!("no free {a}.{b}.0.0/16 subnet")))?;
        let id = unique_id();
        let name = format!("gpsb{id}");
        run(&["ip", "link", "add", &name, "type", "bridge"])?;
        let bridge = Bridge {
            name,
            id,
            prefix,
            neighbours: Arc::default(),
        };
        let cidr = format!("{}/24", bridge.ip(1));
        run(&["ip", "addr", "add", &cidr, "dev", &bridge.name])?;
        run(&["ip", "link", "set", &bridge.name, "up"])?;
        Ok(bridge)
    }

    /// The address `.host` on this bridge's subnet.
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], host)
    }

    /// The root namespace's address on the bridge (where the apiserver listens).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.ip(1)
    }

    /// The bridge's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates a network namespace attached to this bridge with address `ip`.
    pub fn netns(&self, label: &str, ip: Ipv4Addr) -> Result<Netns> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let ns = Netns {
            name: format!("gps{}{label}", self.id),
            veth: format!("gpsv{}x{n}", self.id),
            ip: Mutex::new(ip),
            neighbours: self.neighbours.clone(),
        };
        // Locally administered, unique on this bridge (one per namespace made
        // by this process; every bridge is its own process's).
        let [b0, b1, b2, b3] = n.to_be_bytes();
        let mac = format!("02:67:{b0:02x}:{b1:02x}:{b2:02x}:{b3:02x}");
        run(&["ip", "netns", "add", &ns.name])?;
        // Construct first so Drop cleans up whatever follows.
        run(&[
            "ip", "link", "add", &ns.veth, "type", "veth", "peer", "name", "eth0", "address", &mac,
            "netns", &ns.name,
        ])?;
        run(&["ip", "link", "set", &ns.veth, "master", &self.name, "up"])?;
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"])?;
        run(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", &ns.name, "link", "set", "eth0", "up"])?;
        self.neighbours.join(&ns.name, ip, &mac)?;
        // A hosts file from the start: `ip netns exec` bind-mounts it only if it
        // exists when a process starts; later updates rewrite it in place.
        ns.write_hosts(&[])?;
        Ok(ns)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.name]);
    }
}

/// A network namespace with one interface (`eth0`) on a [`Bridge`]: a pod's network.
pub struct Netns {
    name: String,
    veth: String,
    ip: Mutex<Ipv4Addr>,
    neighbours: Arc<Neighbours>,
}

impl Netns {
    /// The namespace name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host side of its veth pair (on the bridge).
    pub fn veth(&self) -> &str {
        &self.veth
    }

    /// The current address.
    pub fn ip(&self) -> Ipv4Addr {
        *self.ip.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the namespace to a new address (the old one is removed).
    ///
    /// The old address goes first: deleting an interface's primary address also
    /// deletes its secondaries on the same subnet.
    pub fn set_ip(&self, new: Ipv4Addr) -> Result<()> {
        let old = self.ip();
        let ns = self.name.as_str();
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "del",
            &format!("{old}/24"),
            "dev",
            "eth0",
        ])?;
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{new}/24"),
            "dev",
            "eth0",
        ])?;
        *self.ip.lock().unwrap_or_else(|e| e.into_inner()) = new;
        self.neighbours.moved(ns, new)
    }

    /// Cuts the link (the namespace keeps its address; nothing gets in or out).
    pub fn cut(&self) -> Result<()> {
        run(&["ip", "link", "set", &self.veth, "down"])
    }

    /// Blackholes traffic to `peers` (the link stays up: the apiserver on the
    /// bridge's `.1` is still reachable). A p2p partition that leaves the
    /// control plane working.
    pub fn isolate_from(&self, peers: &[Ipv4Addr]) -> Result<()> {
        self.blackhole("add", peers)
    }

    /// Removes the blackhole routes of [`Netns::isolate_from`].
    pub fn rejoin(&self, peers: &[Ipv4Addr]) -> Result<()> {
        self.blackhole("del", peers)
    }

    fn blackhole(&self, op: &str, peers: &[Ipv4Addr]) -> Result<()> {
        for ip in peers {
            let dest = format!("{ip}/32");
            run(&["ip", "-n", &self.name, "route", op, "blackhole", &dest])?;
        }
        Ok(())
    }

    /// Drops the TCP connection attempts (SYN without ACK) this namespace makes
    /// to `peer`: `peer` can still connect in, and replies flow. An nftables
    /// table inside the namespace, gone with it.
    pub fn refuse_outbound_dials_to(&self, peer: Ipv4Addr) -> Result<()> {
        let ns = self.name.as_str();
        let nft = |cmd: &str| run(&["ip", "netns", "exec", ns, "nft", cmd]);
        nft("add table ip gps_dials")?;
        nft("add chain ip gps_dials out { type filter hook output priority 0 ; }")?;
        nft(&format!(
            "add rule ip gps_dials out ip daddr {peer} tcp flags & (syn | ack) == syn drop"
        ))
    }

    /// Starts counting the TCP connection attempts (SYN without ACK) that reach
    /// `port` in this namespace; read with [`Netns::connection_attempts`].
    pub fn count_connection_attempts(&self, port: u16) -> Result<()> {
        let ns = self.name.as_str();
        let nft = |cmd: &str| run(&["ip", "netns", "exec", ns, "nft", cmd]);
        nft("add table ip gps_count")?;
        nft("add chain ip gps_count in { type filter hook input priority 0 ; }")?;
        nft(&format!(
            "add rule ip gps_count in tcp dport {port} tcp flags & (syn | ack) == syn counter"
        ))
    }

    /// The connection attempts counted since [`Netns::count_connection_attempts`].
    pub fn connection_attempts(&self) -> Result<u64> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "nft",
                "list",
                "table",
                "ip",
                "gps_count",
            ])
            .output()
            .map_err(|e| Error::Setup(format!("nft list: {e}")))?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::Setup(format!("no counter in: {text}")))
    }

    /// Drops every packet between this namespace and `peer`, both directions
    /// (an `inet` nftables table inside the namespace). Everything else,
    /// including the apiserver and every other node, is still reachable. The
    /// rules go when the returned [`NftTable`] is dropped (or removed).
    pub fn block_peer(&self, peer: Ipv4Addr) -> Result<NftTable> {
        let table = NftTable::create(&self.name)?;
        table.rule("in", &format!("ip saddr {peer} counter drop"))?;
        table.rule("out", &format!("ip daddr {peer} counter drop"))?;
        Ok(table)
    }

    /// Drops the new TCP connections this namespace opens to `ports` of
    /// `peers` (`ct state new`): established connections keep flowing, and
    /// `peers` can still connect in. Undone when the [`NftTable`] is dropped.
    pub fn block_new_outbound(&self, peers: &[Ipv4Addr], ports: &[u16]) -> Result<NftTable> {
        let table = NftTable::create(&self.name)?;
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        for peer in peers {
            table.rule(
                "out",
                &format!(
                    "ip daddr {peer} tcp dport {{ {} }} ct state new counter drop",
                    ports.join(", ")
                ),
            )?;
        }
        Ok(table)
    }

    /// Counts (never drops) what this namespace sends to `dest`: one rule per
    /// TCP port of `ports`, then one for every packet to `dest`. Read with
    /// [`NftTable::packets`]; undone when the [`NftTable`] is dropped.
    pub fn count_outbound_to(&self, dest: Ipv4Addr, ports: &[u16]) -> Result<NftTable> {
        let table = NftTable::create(&self.name)?;
        for port in ports {
            table.rule("out", &format!("ip daddr {dest} tcp dport {port} counter"))?;
        }
        table.rule("out", &format!("ip daddr {dest} counter"))?;
        Ok(table)
    }

    /// Routes `dest` (a /32) out of `eth0` as if on the link: packets to it
    /// leave the namespace (and pass its output hook) though nobody answers.
    /// Gone with the namespace.
    pub fn route_on_link(&self, dest: Ipv4Addr) -> Result<()> {
        let dest = format!("{dest}/32");
        run(&[
            "ip", "-n", &self.name, "route", "replace", &dest, "dev", "eth0",
        ])
    }

    /// Restores a cut link.
    pub fn restore(&self) -> Result<()> {
        run(&["ip", "link", "set", &self.veth, "up"])
    }

    /// Writes `/etc/netns/<name>/hosts`, which `ip netns exec` bind-mounts over
    /// `/etc/hosts` for processes started in this namespace afterwards.
    pub fn write_hosts(&self, entries: &[(Ipv4Addr, String)]) -> Result<()> {
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Setup(format!("create {}: {e}", dir.display())))?;
        let mut text = String::from("127.0.0.1 localhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(dir.join("hosts"), text)
            .map_err(|e| Error::Setup(format!("write hosts: {e}")))
    }

    fn etc_dir(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.neighbours.leave(&self.name);
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.veth]);
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

/// An nftables table (`inet` family, chains `in` and `out` hooked at input and
/// output) inside a network namespace, made by [`Netns::block_peer`] or
/// [`Netns::block_new_outbound`]. Deleted when dropped, so a test that fails
/// or panics leaves no rule behind (the namespace itself goes with its fixture).
pub struct NftTable {
    ns: String,
    table: String,
}

impl NftTable {
    fn create(ns: &str) -> Result<NftTable> {
        static N: AtomicU32 = AtomicU32::new(0);
        let table = NftTable {
            ns: ns.to_owned(),
            table: format!("chaos{}", N.fetch_add(1, Ordering::Relaxed)),
        };
        // Constructed first: Drop deletes whatever part of it was made.
        table.nft(&format!("add table inet {}", table.table))?;
        for (chain, hook) in [("in", "input"), ("out", "output")] {
            table.nft(&format!(
                "add chain inet {} {chain} {{ type filter hook {hook} priority 0 ; policy accept ; }}",
                table.table
            ))?;
        }
        Ok(table)
    }

    fn nft(&self, cmd: &str) -> Result<()> {
        run(&["ip", "netns", "exec", &self.ns, "nft", cmd])
    }

    fn rule(&self, chain: &str, rule: &str) -> Result<()> {
        self.nft(&format!("add rule inet {} {chain} {rule}", self.table))
    }

    /// The packets each rule dropped so far, as `nft list table` prints them.
    pub fn list(&self) -> String {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "list", "table", "inet"])
            .arg(&self.table)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The packets counted by the first rule whose text contains `rule`
    /// (e.g. `tcp dport 9090`, or `ip daddr 10.0.0.1 counter` for the catch-all
    /// of [`Netns::count_outbound_to`]); `None` when no such rule is listed.
    pub fn packets(&self, rule: &str) -> Option<u64> {
        self.list()
            .lines()
            .find(|l| l.contains(rule) && l.contains("packets"))
            .and_then(|l| {
                l.split_whitespace()
                    .skip_while(|w| *w != "packets")
                    .nth(1)
                    .and_then(|n| n.parse().ok())
            })
    }

    /// Removes the rules now (dropping does the same).
    pub fn remove(self) {}
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = self.nft(&format!("delete table inet {}", self.table));
    }
}
