//! The schema codec's tests, and the record and enode builders other
//! modules' tests use ([`member`], [`enode`]).

use super::*;
use geth_ipc::Host;

const KEY: &str = "6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0";

/// A valid enode with a distinct node id per seed: (seed + 1) * G.
pub(crate) fn enode(seed: u32, host: &str) -> Enode {
    use k256::elliptic_curve::sec1::ToEncodedPoint;
    let scalar = k256::Scalar::from(u64::from(seed) + 1);
    let point = (k256::ProjectivePoint::GENERATOR * scalar).to_affine();
    let enc = point.to_encoded_point(false);
    let mut pubkey = [0u8; 64];
    pubkey.copy_from_slice(&enc.as_bytes()[1..]);
    let host: Host = host.parse().unwrap();
    Enode::new(pubkey, host, 30303, None).unwrap()
}

pub(crate) fn member(pod: &str, seed: u32) -> MemberRecord {
    let e = enode(seed, &format!("10.0.{}.{}", seed / 250, seed % 250 + 2));
    let t: jiff::Timestamp = "2025-01-02T03:04:05Z".parse().unwrap();
    MemberRecord {
        pod: pod.to_owned(),
        node_id: e.node_id(),
        enode: e,
        pod_uid: Some(format!("0b6a1f0e-5d2c-4c7e-9a51-{seed:012}")),
        pod_ip: Some(format!("10.0.{}.{}", seed / 250, seed % 250 + 2)),
        registered_at: t,
        updated_at: t,
        sidecar_version: "0.1.0".to_owned(),
    }
}

fn set(recs: &[MemberRecord]) -> BTreeMap<String, MemberRecord> {
    recs.iter().map(|r| (r.pod.clone(), r.clone())).collect()
}

/// A static-nodes.json as the original sidecar leaves it: our members
/// plus its own entry, appended, with `?discport=0`.
fn with_legacy_entry(recs: &[MemberRecord], legacy: &str) -> BTreeMap<String, String> {
    let mut data = encode(&BTreeMap::new(), &set(recs));
    let mut list: Vec<String> = serde_json::from_str(&data[STATIC_NODES_KEY]).unwrap();
    list.push(legacy.to_owned());
    data.insert(
        STATIC_NODES_KEY.to_owned(),
        serde_json::to_string(&list).unwrap(),
    );
    data
}

#[test]
fn static_nodes_entries_without_a_record_are_legacy_members_kept_verbatim() {
    let recs = [member("geth-0", 1), member("geth-1", 2)];
    let legacy = format!("{}?discport=0", enode(7, "10.9.0.7"));
    let data = with_legacy_entry(&recs, &legacy);
    let snap = decode(&data, None);
    assert_eq!(snap.members.len(), 2);
    assert_eq!(snap.legacy.len(), 1);
    assert_eq!(snap.legacy[0].node_id(), enode(7, "10.9.0.7").node_id());
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    // Our write keeps it byte for byte: the original sidecar never re-adds it.
    let mut more = set(&recs);
    more.insert("geth-2".into(), member("geth-2", 3));
    let written = encode(&data, &more);
    let list: Vec<String> = serde_json::from_str(&written[STATIC_NODES_KEY]).unwrap();
    assert!(list.contains(&legacy), "{list:?}");
    assert_eq!(list.len(), 4);
    // An unchanged member set leaves the appended (unsorted) list alone.
    assert_eq!(encode(&data, &set(&recs)), data);
}

#[test]
fn a_removed_members_entry_goes_with_it_and_is_not_taken_for_legacy() {
    let recs = [member("geth-0", 1), member("geth-1", 2)];
    let data = encode(&BTreeMap::new(), &set(&recs));
    let written = encode(&data, &set(&recs[..1]));
    let snap = decode(&written, None);
    assert!(snap.legacy.is_empty(), "{:?}", snap.legacy);
    let list: Vec<String> = serde_json::from_str(&written[STATIC_NODES_KEY]).unwrap();
    assert_eq!(list.len(), 1);
}

#[test]
fn a_legacy_entry_is_dropped_only_when_asked() {
    let recs = [member("geth-0", 1)];
    let legacy = enode(7, "10.9.0.7");
    let data = with_legacy_entry(&recs, &legacy.to_string());
    let drop = BTreeSet::from([legacy.node_id()]);
    let written = encode_dropping_legacy(&data, &set(&recs), &drop);
    assert!(decode(&written, None).legacy.is_empty());
    // A legacy node that now has a record is a member, not legacy.
    let mut migrated = member("geth-9", 7);
    migrated.enode = legacy.clone();
    let snap = decode(&encode(&data, &set(&[recs[0].clone(), migrated])), None);
    assert!(snap.legacy.is_empty());
    assert_eq!(snap.members.len(), 2);
}

#[test]
fn a_static_nodes_entry_that_is_not_an_enode_is_named_and_dropped() {
    let recs = [member("geth-0", 1)];
    let data = with_legacy_entry(&recs, "enode://nonsense");
    let snap = decode(&data, None);
    assert!(snap.legacy.is_empty());
    assert!(
        snap.problems.iter().any(|p| p.contains("nonsense")),
        "{:?}",
        snap.problems
    );
}

#[test]
fn round_trip() {
    let members = set(&[member("geth-0", 0), member("geth-1", 1)]);
    let data = encode(&BTreeMap::new(), &members);
    assert_eq!(data[SCHEMA_VERSION_KEY], "1");
    assert!(data.contains_key("member.geth-0"));
    let snap = decode(&data, Some("7".into()));
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    assert_eq!(snap.members, members);
    assert_eq!(snap.resource_version.as_deref(), Some("7"));
    let list: Vec<String> = serde_json::from_str(&data[STATIC_NODES_KEY]).unwrap();
    let mut want: Vec<String> = members.values().map(|m| m.enode.to_string()).collect();
    want.sort();
    assert_eq!(list, want);
}

#[test]
fn encoding_an_unchanged_set_gives_equal_data() {
    let members = set(&[member("geth-0", 0), member("geth-1", 1)]);
    let data = encode(&BTreeMap::new(), &members);
    assert_eq!(encode(&data, &members), data);
    let snap = decode(&data, None);
    assert_eq!(encode(&data, &snap.members), data);
}

#[test]
fn pretty_printed_records_are_read_and_not_rewritten() {
    let rec = member("geth-0", 0);
    let mut data = encode(&BTreeMap::new(), &set(std::slice::from_ref(&rec)));
    let pretty = serde_json::to_string_pretty(&rec).unwrap();
    data.insert("member.geth-0".into(), pretty.clone());
    let snap = decode(&data, None);
    assert_eq!(snap.members["geth-0"], rec);
    assert_eq!(encode(&data, &snap.members)["member.geth-0"], pretty);
}

#[test]
fn record_fields_are_camel_case() {
    let data = encode(&BTreeMap::new(), &set(&[member("geth-0", 0)]));
    let v: serde_json::Value = serde_json::from_str(&data["member.geth-0"]).unwrap();
    for field in [
        "pod",
        "nodeId",
        "enode",
        "podUid",
        "podIp",
        "registeredAt",
        "updatedAt",
    ] {
        assert!(v.get(field).is_some(), "missing {field}: {v}");
    }
}

#[test]
fn unknown_keys_and_external_peers_are_preserved_byte_for_byte() {
    let mut existing = BTreeMap::new();
    let external = format!("[ \"enode://{KEY}@203.0.113.7:30303\" ,\n 42 ]");
    existing.insert(EXTERNAL_PEERS_KEY.to_owned(), external.clone());
    existing.insert("operator-note".to_owned(), "keep  me\n".to_owned());
    existing.insert(SCHEMA_VERSION_KEY.to_owned(), "1".to_owned());
    let data = encode(&existing, &set(&[member("geth-0", 0)]));
    assert_eq!(data[EXTERNAL_PEERS_KEY], external);
    assert_eq!(data["operator-note"], "keep  me\n");
    let snap = decode(&data, None);
    assert_eq!(snap.external.len(), 1);
    assert_eq!(snap.problems.len(), 1, "{:?}", snap.problems);
    assert!(
        snap.problems[0].contains("entry 1 (42)"),
        "{:?}",
        snap.problems
    );
}

#[test]
fn malformed_external_peers() {
    let mut data = BTreeMap::new();
    data.insert(EXTERNAL_PEERS_KEY.to_owned(), "{\"a\": 1}".to_owned());
    let snap = decode(&data, None);
    assert!(snap.external.is_empty());
    assert!(snap.problems[0].contains(EXTERNAL_PEERS_KEY));

    data.insert(
        EXTERNAL_PEERS_KEY.to_owned(),
        format!(
            "[\"enode://{KEY}@1.2.3.4:30303\", \"enode://{KEY}@1.2.3.4:30303\", \"enode://zz@1.2.3.4:1\"]"
        ),
    );
    let snap = decode(&data, None);
    assert_eq!(snap.external.len(), 1, "duplicates collapse");
    assert_eq!(snap.problems.len(), 1);
    assert!(snap.problems[0].contains("entry 2"), "{:?}", snap.problems);
}

#[test]
fn garbage_static_nodes_is_ignored_then_rebuilt() {
    let members = set(&[member("geth-0", 0)]);
    let mut data = encode(&BTreeMap::new(), &members);
    data.insert(STATIC_NODES_KEY.to_owned(), "{{{ not json".to_owned());
    let snap = decode(&data, None);
    assert_eq!(snap.members, members);
    assert_eq!(snap.problems.len(), 1);
    assert!(snap.problems[0].contains(STATIC_NODES_KEY));
    let healed = encode(&data, &snap.members);
    let list: Vec<String> = serde_json::from_str(&healed[STATIC_NODES_KEY]).unwrap();
    assert_eq!(list, vec![members["geth-0"].enode.to_string()]);
    assert!(decode(&healed, None).problems.is_empty());
}

#[test]
fn stale_static_nodes_is_rebuilt() {
    let members = set(&[member("geth-0", 0), member("geth-1", 1)]);
    let mut data = encode(&BTreeMap::new(), &members);
    data.insert(STATIC_NODES_KEY.to_owned(), "[]".to_owned());
    assert_ne!(encode(&data, &members), data);
    // Reformatted but equal: not rewritten.
    let list: Vec<String> = serde_json::from_str(&static_nodes(&members)).unwrap();
    data.insert(
        STATIC_NODES_KEY.to_owned(),
        serde_json::to_string_pretty(&list).unwrap(),
    );
    assert_eq!(encode(&data, &members), data);
}

#[test]
fn malformed_records_are_skipped_named_and_kept() {
    let good = member("geth-0", 0);
    let mut data = encode(&BTreeMap::new(), &set(std::slice::from_ref(&good)));
    data.insert("member.broken".into(), "not a record".into());
    data.insert("member.geth-9".into(), "{\"pod\": 42}".into());
    data.insert("member.".into(), "{}".into());
    let snap = decode(&data, None);
    assert_eq!(snap.members.len(), 1);
    assert_eq!(snap.problems.len(), 3, "{:?}", snap.problems);
    for key in ["member.broken", "member.geth-9", "\"member.\""] {
        assert!(
            snap.problems.iter().any(|p| p.contains(key)),
            "{key}: {:?}",
            snap.problems
        );
    }
    let next = encode(&data, &snap.members);
    assert_eq!(next["member.broken"], "not a record");
    assert_eq!(next["member.geth-9"], "{\"pod\": 42}");
    // Removing every valid member still keeps what we cannot read.
    let emptied = encode(&data, &BTreeMap::new());
    assert!(!emptied.contains_key("member.geth-0"));
    assert!(emptied.contains_key("member.broken"));
    assert_eq!(emptied[STATIC_NODES_KEY], "[]");
}

#[test]
fn a_malformed_record_is_healed_by_its_pod() {
    let mut data = BTreeMap::new();
    data.insert("member.geth-0".into(), "{\"pod\": 42}".into());
    let rec = member("geth-0", 0);
    let next = encode(&data, &set(std::slice::from_ref(&rec)));
    let snap = decode(&next, None);
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    assert_eq!(snap.members["geth-0"], rec);
}

#[test]
fn key_pod_mismatch_is_skipped_and_kept() {
    let mut data = BTreeMap::new();
    let rec = member("geth-1", 1);
    data.insert("member.geth-0".into(), serde_json::to_string(&rec).unwrap());
    let snap = decode(&data, None);
    assert!(snap.members.is_empty());
    assert!(snap.problems[0].contains("member.geth-0"));
    assert!(snap.problems[0].contains("geth-1"));
    assert!(encode(&data, &BTreeMap::new()).contains_key("member.geth-0"));
}

#[test]
fn node_id_enode_mismatch_is_skipped() {
    let mut rec = member("geth-0", 0);
    rec.node_id = member("x", 1).node_id;
    let mut data = BTreeMap::new();
    data.insert("member.geth-0".into(), serde_json::to_string(&rec).unwrap());
    let snap = decode(&data, None);
    assert!(snap.members.is_empty());
    assert!(snap.problems[0].contains("nodeId"), "{:?}", snap.problems);
}

#[test]
fn schema_version() {
    let mut data = BTreeMap::new();
    data.insert(SCHEMA_VERSION_KEY.to_owned(), "2".to_owned());
    let snap = decode(&data, None);
    assert!(snap.problems[0].contains(SCHEMA_VERSION_KEY));
    assert_eq!(encode(&data, &BTreeMap::new())[SCHEMA_VERSION_KEY], "2");
    assert_eq!(
        encode(&BTreeMap::new(), &BTreeMap::new())[SCHEMA_VERSION_KEY],
        "1"
    );
}

#[test]
fn empty_and_missing() {
    let snap = decode(&BTreeMap::new(), None);
    assert_eq!(snap, Snapshot::default());
    assert!(!snap.exists());
}

#[test]
fn static_nodes_is_sorted_and_deduplicated() {
    let a = member("b-pod", 5);
    let mut b = a.clone();
    b.pod = "a-pod".into();
    let c = member("c-pod", 2);
    let list: Vec<String> =
        serde_json::from_str(&static_nodes(&set(&[a.clone(), b, c.clone()]))).unwrap();
    let mut want = vec![a.enode.to_string(), c.enode.to_string()];
    want.sort();
    assert_eq!(list, want);
}

#[test]
fn pod_names() {
    assert!(invalid_pod_name("geth-0").is_none());
    assert!(invalid_pod_name("geth.0_x").is_none());
    assert!(invalid_pod_name("").is_some());
    assert!(invalid_pod_name("a/b").is_some());
    assert!(invalid_pod_name(&"a".repeat(247)).is_some());
    assert!(invalid_pod_name(&"a".repeat(246)).is_none());
}

/// Measures the encoded bytes per member (record + its static-nodes.json
/// entry), for the README's member ceiling.
#[test]
fn bytes_per_member() {
    let one = encode(&BTreeMap::new(), &set(&[member("geth-0", 0)]));
    let recs: Vec<MemberRecord> = (0..100).map(|i| member(&format!("geth-{i}"), i)).collect();
    let hundred = encode(&BTreeMap::new(), &set(&recs));
    let per = (encoded_size(&hundred) - encoded_size(&one)) as f64 / 99.0;
    println!(
        "bytes per member: {per:.0}; fixed: {}; ceiling at {MAX_BYTES}: {:.0}",
        encoded_size(&one) as f64 - per,
        MAX_BYTES as f64 / per
    );
    assert!(per < 1000.0, "{per}");
}

#[test]
fn the_lease_layout_lists_lease_members_and_drops_the_entry_of_a_deleted_lease() {
    let (a, b) = (member("geth-0", 1), member("geth-1", 2));
    let legacy = format!("{}?discport=0", enode(9, "10.0.0.9"));
    let existing = BTreeMap::from([(
        STATIC_NODES_KEY.to_owned(),
        serde_json::to_string(&[&legacy]).unwrap(),
    )]);
    let data = encode_lease_members(&existing, &set(&[a.clone(), b.clone()])).unwrap();
    let listed: Vec<String> = serde_json::from_str(&data[STATIC_NODES_KEY]).unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.contains(&legacy) && listed.contains(&a.enode.to_string()));
    assert_eq!(lease_members_listed(&data).len(), 2);
    assert_eq!(
        encode_lease_members(&data, &set(&[a.clone(), b.clone()])),
        None
    );
    // b's Lease is deleted: its entry goes, the legacy entry stays.
    let after = encode_lease_members(&data, &set(std::slice::from_ref(&a))).unwrap();
    let listed: Vec<String> = serde_json::from_str(&after[STATIC_NODES_KEY]).unwrap();
    assert_eq!(listed, {
        let mut v = vec![a.enode.to_string(), legacy.clone()];
        v.sort();
        v
    });
    // And a decode of it sees no legacy entry but the real one.
    let snap = decode(&after, None);
    let lease_ids = lease_members_listed(&after);
    let legacy_seen: Vec<_> = snap
        .legacy
        .iter()
        .filter(|e| !lease_ids.contains(&e.node_id()))
        .collect();
    assert_eq!(legacy_seen.len(), 1);
}
