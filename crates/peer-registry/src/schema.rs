//! The registry's on-the-wire schema: how a [`Snapshot`] is stored in the
//! `data` of one ConfigMap. Pure functions, no I/O: available without the `kube`
//! feature.
//!
//! | key | content | written by |
//! |---|---|---|
//! | `member.<pod>` | one [`MemberRecord`] as JSON (camelCase fields) | the member's sidecar |
//! | `static-nodes.json` | JSON array of all members' enode URLs, sorted, plus legacy entries | derived on every write; legacy entries (no member record: the original Python sidecar's) are kept verbatim |
//! | `external-peers.json` | JSON array of enode URLs outside the cluster | the operator only |
//! | `lease-members.json` | JSON array of the entries of `static-nodes.json` derived from Leases | the lease layout only ([`encode_lease_members`]) |
//! | `schema-version` | `"1"` | set when absent |
//! | anything else | preserved byte-for-byte | third parties |
//!
//! [`decode`] never fails: whatever is malformed is skipped and described in
//! [`Snapshot::problems`]. [`encode`] computes the next `data` from the current
//! one and the new member set, preserving everything it does not own.

use std::collections::{BTreeMap, BTreeSet};

use geth_ipc::{Enode, NodeId};

use crate::record::{MemberRecord, Snapshot};

/// Prefix of the per-member keys: `member.<pod-name>`.
pub const MEMBER_KEY_PREFIX: &str = "member.";
/// The derived key, kept for the original sidecar's consumers: a JSON array of
/// every member's enode URL, sorted.
pub const STATIC_NODES_KEY: &str = "static-nodes.json";
/// The operator-maintained key: a JSON array of enode URLs outside the cluster.
/// Read by every sidecar, never written by one.
pub const EXTERNAL_PEERS_KEY: &str = "external-peers.json";
/// The lease layout's key: which entries of `static-nodes.json` it derived
/// from member Leases (a JSON array of enode URLs), so that an entry whose
/// Lease is gone is dropped, not taken for a legacy one.
pub const LEASE_MEMBERS_KEY: &str = "lease-members.json";
/// The key holding the schema version.
pub const SCHEMA_VERSION_KEY: &str = "schema-version";
/// The schema version this crate writes.
pub const SCHEMA_VERSION: &str = "1";
/// Above this encoded size (bytes) a warning is logged, once per crossing.
pub const WARN_BYTES: usize = 512 * 1024;
/// A write that would grow the encoded size above this (bytes) is refused.
/// Kubernetes refuses ConfigMaps whose data exceeds 1 MiB.
pub const MAX_BYTES: usize = 900 * 1024;
/// Longest pod name that still makes a valid ConfigMap key (253 minus the prefix).
pub const MAX_POD_NAME_LEN: usize = 253 - MEMBER_KEY_PREFIX.len();

/// The ConfigMap key of a member: `member.<pod>`.
pub fn member_key(pod: &str) -> String {
    format!("{MEMBER_KEY_PREFIX}{pod}")
}

/// Why a pod name cannot be a member key, or `None` when it can.
///
/// ConfigMap keys must match `[-._a-zA-Z0-9]+` and be at most 253 characters.
pub fn invalid_pod_name(pod: &str) -> Option<&'static str> {
    if pod.is_empty() {
        Some("the pod name is empty")
    } else if pod.len() > MAX_POD_NAME_LEN {
        Some("the pod name is longer than 246 characters")
    } else if !pod
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        Some("a pod name may contain only letters, digits, '-', '.' and '_'")
    } else {
        None
    }
}

/// The encoded size of a ConfigMap's `data`, as Kubernetes counts it against its
/// 1 MiB limit: the sum of the lengths of every key and value.
pub fn encoded_size(data: &BTreeMap<String, String>) -> usize {
    data.iter().map(|(k, v)| k.len() + v.len()).sum()
}

fn truncated(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

/// Decodes one `member.<pod>` value, checking it against its key.
fn decode_member(key: &str, pod: &str, value: &str) -> Result<MemberRecord, String> {
    let rec: MemberRecord = serde_json::from_str(value).map_err(|e| {
        format!(
            "key {key:?}: not a valid member record ({e}); skipped. Its sidecar rewrites it \
             on its next registration; delete the key if no such pod exists"
        )
    })?;
    if rec.pod != pod {
        return Err(format!(
            "key {key:?}: the record names pod {:?}, not {pod:?}; skipped. Delete the key \
             unless the pod {pod:?} exists (its sidecar then rewrites it)",
            truncated(&rec.pod)
        ));
    }
    if rec.node_id != rec.enode.node_id() {
        return Err(format!(
            "key {key:?}: the record's nodeId {} is not the enode's node id {}; skipped. \
             Its sidecar rewrites it on its next registration",
            rec.node_id,
            rec.enode.node_id()
        ));
    }
    Ok(rec)
}

/// Decodes the external peers, skipping malformed entries.
fn decode_external(value: &str, problems: &mut Vec<String>) -> Vec<Enode> {
    let entries: Vec<serde_json::Value> = match serde_json::from_str(value) {
        Ok(serde_json::Value::Array(entries)) => entries,
        Ok(_) | Err(_) => {
            problems.push(format!(
                "key {EXTERNAL_PEERS_KEY:?}: not a JSON array of enode URL strings; ignored \
                 (no external peers used). Fix it: [\"enode://<128 hex>@<host>:<port>\", ...]"
            ));
            return Vec::new();
        }
    };
    let mut out: Vec<Enode> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let parsed = match entry {
            serde_json::Value::String(s) => s.parse::<Enode>().map_err(|e| e.to_string()),
            _ => Err("not a string".to_owned()),
        };
        match parsed {
            Ok(enode) => {
                if !out.iter().any(|e| e.identical(&enode)) {
                    out.push(enode);
                }
            }
            Err(e) => problems.push(format!(
                "key {EXTERNAL_PEERS_KEY:?}: entry {i} ({}) skipped: {e}",
                truncated(&entry.to_string())
            )),
        }
    }
    out
}

/// Decodes a ConfigMap's `data` into a [`Snapshot`]. Never fails: malformed
/// member records, a garbage `static-nodes.json`, malformed external peers and an
/// unknown schema version are reported in [`Snapshot::problems`], each naming the
/// key (and entry) and what to do.
///
/// ```
/// use std::collections::BTreeMap;
/// use peer_registry::schema;
///
/// let mut data = BTreeMap::new();
/// data.insert(
///     "external-peers.json".to_owned(),
///     r#"["enode://6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0@203.0.113.7:30303", "nonsense"]"#.to_owned(),
/// );
/// data.insert("member.geth-1".to_owned(), "{not json".to_owned());
/// data.insert("operator-note".to_owned(), "unknown keys are kept".to_owned());
///
/// let snap = schema::decode(&data, Some("42".to_owned()));
/// assert_eq!(snap.resource_version.as_deref(), Some("42"));
/// assert!(snap.members.is_empty());
/// assert_eq!(snap.external.len(), 1);
/// assert_eq!(snap.problems.len(), 2); // the bad external entry, the bad record
/// assert!(snap.problems.iter().any(|p| p.contains("member.geth-1")));
/// ```
pub fn decode(data: &BTreeMap<String, String>, resource_version: Option<String>) -> Snapshot {
    let mut snap = Snapshot {
        resource_version,
        ..Snapshot::default()
    };
    for (key, value) in data {
        if let Some(pod) = key.strip_prefix(MEMBER_KEY_PREFIX) {
            match decode_member(key, pod, value) {
                Ok(rec) => {
                    snap.members.insert(pod.to_owned(), rec);
                }
                Err(problem) => snap.problems.push(problem),
            }
        } else if key == EXTERNAL_PEERS_KEY {
            snap.external = decode_external(value, &mut snap.problems);
        } else if key == STATIC_NODES_KEY {
            if serde_json::from_str::<Vec<String>>(value).is_err() {
                snap.problems.push(format!(
                    "key {STATIC_NODES_KEY:?}: not a JSON array of strings; ignored (it is \
                     derived from the member records and rebuilt on the next write)"
                ));
            }
        } else if key == SCHEMA_VERSION_KEY && value.trim() != SCHEMA_VERSION {
            snap.problems.push(format!(
                "key {SCHEMA_VERSION_KEY:?}: version {:?} is not {SCHEMA_VERSION:?}, the \
                 version this sidecar understands; decoded as version {SCHEMA_VERSION} (upgrade \
                 every sidecar to the same version)",
                truncated(value)
            ));
        }
    }
    if let Some(value) = data.get(STATIC_NODES_KEY) {
        let members: BTreeSet<NodeId> = snap
            .members
            .values()
            .flat_map(|m| [m.node_id, m.enode.node_id()])
            .collect();
        let derived = lease_members_listed(data);
        for (_, enode) in legacy_entries(value, &members, &mut snap.problems) {
            if !snap.legacy.iter().any(|e| e.node_id() == enode.node_id()) {
                if derived.contains(&enode.node_id()) {
                    snap.derived.insert(enode.node_id());
                }
                snap.legacy.push(enode);
            }
        }
    }
    snap
}

/// The entries of a `static-nodes.json` value that belong to no member in
/// `members` (by node id): legacy members, as (the text as stored, parsed).
/// Entries that are not enode URLs are named in `problems` and left out.
fn legacy_entries(
    value: &str,
    members: &BTreeSet<NodeId>,
    problems: &mut Vec<String>,
) -> Vec<(String, Enode)> {
    let Ok(entries) = serde_json::from_str::<Vec<String>>(value) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries {
        match entry.parse::<Enode>() {
            Ok(enode) if members.contains(&enode.node_id()) => {}
            Ok(enode) => out.push((entry, enode)),
            Err(e) => problems.push(format!(
                "key {STATIC_NODES_KEY:?}: entry {} is not an enode URL ({e}); ignored and \
                 dropped on the next write",
                truncated(&entry)
            )),
        }
    }
    out
}

/// The derived `static-nodes.json` value: every member's enode URL, sorted,
/// without duplicates, as a compact JSON array.
pub fn static_nodes(members: &BTreeMap<String, MemberRecord>) -> String {
    let urls: BTreeSet<String> = members.values().map(|m| m.enode.to_string()).collect();
    let urls: Vec<&String> = urls.iter().collect();
    serde_json::to_string(&urls).unwrap_or_else(|_| "[]".to_owned())
}

/// `static_nodes` (a JSON array) with the `legacy` entries added, sorted,
/// without duplicates.
fn with_legacy(static_nodes: &str, legacy: &[String]) -> String {
    let mut urls: BTreeSet<String> = serde_json::from_str::<Vec<String>>(static_nodes)
        .unwrap_or_default()
        .into_iter()
        .collect();
    urls.extend(legacy.iter().cloned());
    let urls: Vec<&String> = urls.iter().collect();
    serde_json::to_string(&urls).unwrap_or_else(|_| "[]".to_owned())
}

/// Computes the next `data` of the registry from the `existing` one and the new
/// member set (keyed by pod; each record is stored under `member.<record.pod>`).
///
/// - Every member is written as compact JSON under its key (an existing
///   malformed value under that key is overwritten: healed).
/// - A `member.*` key that holds a *valid* record (one [`decode`] accepts) of a
///   pod not in `members` is deleted: that member was removed. Malformed
///   `member.*` values of pods not in `members` are kept: we never delete what we
///   cannot read.
/// - `static-nodes.json` is rebuilt from `members`, keeping legacy entries
///   (see [`encode_dropping_legacy`]).
/// - `external-peers.json` and every unknown key are kept byte-for-byte.
/// - `schema-version` is set to `"1"` when absent, kept otherwise.
///
/// An unchanged member set over well-formed data gives back equal data, so the
/// caller can skip the write.
pub fn encode(
    existing: &BTreeMap<String, String>,
    members: &BTreeMap<String, MemberRecord>,
) -> BTreeMap<String, String> {
    encode_dropping_legacy(existing, members, &BTreeSet::new())
}

/// [`encode`], also dropping the legacy entries of `static-nodes.json` whose
/// node id is in `drop_legacy`.
///
/// Legacy entries are the stored `static-nodes.json` entries whose node id
/// belongs to no member record, neither stored nor in `members` (an entry of a
/// member removed now is not legacy: it goes with its member). They are kept
/// verbatim (text as stored, e.g. with `?discport=0`), so the original sidecar,
/// which re-adds its own entry when it does not find it, never has to.
///
/// Entries listed in [`LEASE_MEMBERS_KEY`] (derived by the lease layout's
/// publisher, [`Snapshot::derived`]) are never dropped here, even when in
/// `drop_legacy`: the publisher owns them and would put them back at once.
pub fn encode_dropping_legacy(
    existing: &BTreeMap<String, String>,
    members: &BTreeMap<String, MemberRecord>,
    drop_legacy: &BTreeSet<NodeId>,
) -> BTreeMap<String, String> {
    let mut data: BTreeMap<String, String> = existing
        .iter()
        .filter(|(key, value)| match key.strip_prefix(MEMBER_KEY_PREFIX) {
            Some(pod) => {
                members.values().any(|m| m.pod == pod) || decode_member(key, pod, value).is_err()
            }
            None => true,
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for rec in members.values() {
        let key = member_key(&rec.pod);
        // Keep the stored text when it decodes to the very same record, so that a
        // pretty-printed record written by someone else does not cause a write.
        let unchanged = existing
            .get(&key)
            .and_then(|v| decode_member(&key, &rec.pod, v).ok())
            .is_some_and(|stored| &stored == rec && stored.enode.identical(&rec.enode));
        if !unchanged {
            let value = serde_json::to_string(rec).unwrap_or_default();
            data.insert(key, value);
        }
    }
    let mut known: BTreeSet<NodeId> = members
        .values()
        .flat_map(|m| [m.node_id, m.enode.node_id()])
        .collect();
    known.extend(
        existing
            .iter()
            .filter_map(|(key, value)| {
                let pod = key.strip_prefix(MEMBER_KEY_PREFIX)?;
                decode_member(key, pod, value).ok()
            })
            .flat_map(|m| [m.node_id, m.enode.node_id()]),
    );
    let lease_derived = lease_members_listed(existing);
    let legacy: Vec<String> = existing
        .get(STATIC_NODES_KEY)
        .map(|value| legacy_entries(value, &known, &mut Vec::new()))
        .unwrap_or_default()
        .into_iter()
        // What the lease layout's publisher derived is its to drop, never ours
        // (it would put it back at once).
        .filter(|(_, enode)| {
            !drop_legacy.contains(&enode.node_id()) || lease_derived.contains(&enode.node_id())
        })
        .map(|(text, _)| text)
        .collect();
    let derived = with_legacy(&static_nodes(members), &legacy);
    // Compared as sets: the original sidecar appends, we sort.
    let as_set = |v: &str| {
        serde_json::from_str::<Vec<String>>(v)
            .ok()
            .map(|l| l.into_iter().collect::<BTreeSet<String>>())
    };
    let derived_unchanged = existing
        .get(STATIC_NODES_KEY)
        .is_some_and(|old| as_set(old).is_some() && as_set(old) == as_set(&derived));
    if !derived_unchanged {
        data.insert(STATIC_NODES_KEY.to_owned(), derived);
    }
    data.entry(SCHEMA_VERSION_KEY.to_owned())
        .or_insert_with(|| SCHEMA_VERSION.to_owned());
    data
}

/// The node ids of the entries of [`LEASE_MEMBERS_KEY`] (none when it is
/// missing or does not parse).
pub fn lease_members_listed(data: &BTreeMap<String, String>) -> BTreeSet<NodeId> {
    data.get(LEASE_MEMBERS_KEY)
        .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.parse::<Enode>().ok())
        .map(|e| e.node_id())
        .collect()
}

/// The lease layout's `data` of the shared ConfigMap, computed from the
/// `existing` one and the members registered as Leases (`leases`, by pod):
///
/// - `static-nodes.json` lists every member, the Leases' and the ConfigMap's
///   own `member.*` records (a fleet switching layouts; a Lease wins over a
///   record of the same pod), plus the legacy entries (those of no member,
///   past or present), kept verbatim;
/// - [`LEASE_MEMBERS_KEY`] lists the entries taken from Leases, so that the
///   entry of a Lease deleted since goes too;
/// - everything else is kept byte for byte.
///
/// `None` when `existing` already holds exactly that.
pub fn encode_lease_members(
    existing: &BTreeMap<String, String>,
    leases: &BTreeMap<String, MemberRecord>,
) -> Option<BTreeMap<String, String>> {
    let stored = decode(existing, None).members;
    let mut known: BTreeSet<NodeId> = lease_members_listed(existing);
    let ids = |m: &MemberRecord| [m.node_id, m.enode.node_id()];
    known.extend(stored.values().chain(leases.values()).flat_map(ids));
    let legacy: Vec<String> = existing
        .get(STATIC_NODES_KEY)
        .map(|value| legacy_entries(value, &known, &mut Vec::new()))
        .unwrap_or_default()
        .into_iter()
        .map(|(text, _)| text)
        .collect();
    let mut members = stored;
    members.extend(leases.iter().map(|(pod, m)| (pod.clone(), m.clone())));
    let mut data = existing.clone();
    data.insert(
        STATIC_NODES_KEY.to_owned(),
        with_legacy(&static_nodes(&members), &legacy),
    );
    data.insert(LEASE_MEMBERS_KEY.to_owned(), static_nodes(leases));
    data.entry(SCHEMA_VERSION_KEY.to_owned())
        .or_insert_with(|| SCHEMA_VERSION.to_owned());
    (&data != existing).then_some(data)
}

#[cfg(test)]
pub(crate) mod tests;
