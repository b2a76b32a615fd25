//! Who may write the registry: one pod's own projected service-account token,
//! read from the kubelet's volume of a running sidecar pod, tries what an
//! attacker holding it would; the chart's admission policy refuses every
//! write that is not that pod's own record, and the mesh keeps working.
//!
//! The observed table and `kubectl auth can-i --list` for the service account
//! are held against docs/security.md; `GPS_WRITE_DOCS=1` rewrites them there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::{KubeNode, eventually, workspace_root};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::Shared;
use crate::chart::{MESH_TIMEOUT, RELEASE, install};

/// Another application's leader-election Lease in the same namespace.
const OTHER_APP_LEASE: &str = "other-app-leader";
/// The doc the observed table is held against.
const DOC: &str = "docs/security.md";

/// What one attempt observed.
struct Outcome {
    status: u16,
    message: String,
}

fn outcome<T>(result: Result<T, kube::Error>, ok_status: u16) -> Outcome {
    match result {
        Ok(_) => Outcome {
            status: ok_status,
            message: String::new(),
        },
        Err(kube::Error::Api(s)) => Outcome {
            status: s.code,
            message: s.message,
        },
        Err(e) => panic!("the request did not reach the apiserver: {e}"),
    }
}

/// One row of the table: an attempt made with the pod's own token.
struct Row {
    attempt: &'static str,
    /// The policy expected to refuse it (`leases` or `configmap`), or `None`
    /// when the write is the pod's own and must succeed.
    refused_by: Option<&'static str>,
    seen: Outcome,
}

/// The requests of `user` the apiserver refused with 403 or 422 (audit log),
/// as "verb resource/name code": the sidecars' own writes must never be.
pub fn refused_requests(node: &KubeNode, user: &str) -> Vec<String> {
    node.control_plane()
        .audit_events(user)
        .iter()
        .filter(|e| matches!(e["responseStatus"]["code"].as_u64(), Some(403 | 422)))
        .map(|e| {
            format!(
                "{} {}/{} {}",
                e["verb"].as_str().unwrap_or_default(),
                e["objectRef"]["resource"].as_str().unwrap_or_default(),
                e["objectRef"]["name"].as_str().unwrap_or_default(),
                e["responseStatus"]["code"]
            )
        })
        .collect()
}

fn policy_name(ns: &str, which: &str) -> String {
    format!("{ns}.{RELEASE}.{which}")
}

/// The table as docs/security.md holds it (the namespace, random per run,
/// written as `<ns>`).
fn table(ns: &str, rows: &[Row]) -> String {
    let mut out = String::from(
        "| Attempt with pod A's own token | Expected | HTTP status | Refused by | Message (after `denied request:`) |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let expected = match r.refused_by {
            Some(_) => "refused",
            None => "allowed",
        };
        let (by, excerpt) = match r.seen.message.split_once("denied request: ") {
            Some((head, tail)) => (
                head.split('\'')
                    .nth(1)
                    .unwrap_or_default()
                    .replace(ns, "<ns>"),
                tail.trim().to_owned(),
            ),
            None => (String::new(), r.seen.message.clone()),
        };
        let by = if by.is_empty() {
            "-".to_owned()
        } else {
            format!("`{by}`")
        };
        let excerpt = if excerpt.is_empty() {
            "-".to_owned()
        } else {
            excerpt.replace('|', "\\|")
        };
        out.push_str(&format!(
            "| {} | {expected} | {} | {by} | {excerpt} |\n",
            r.attempt, r.seen.status
        ));
    }
    out
}

/// Replaces the text between `<!-- {marker}:begin -->` and `<!-- {marker}:end -->`.
fn with_block(doc: &str, marker: &str, body: &str) -> Option<String> {
    let begin = format!("<!-- {marker}:begin -->\n");
    let end = format!("<!-- {marker}:end -->");
    let start = doc.find(&begin)? + begin.len();
    let stop = start + doc[start..].find(&end)?;
    Some(format!("{}{body}{}", &doc[..start], &doc[stop..]))
}

/// Holds docs/security.md to `blocks` (or, with `GPS_WRITE_DOCS=1`, writes them).
fn check_doc(blocks: &[(&str, String)]) {
    let path = workspace_root().join(DOC);
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{DOC}: {e}"));
    let mut want = doc.clone();
    for (marker, body) in blocks {
        want = with_block(&want, marker, body)
            .unwrap_or_else(|| panic!("{DOC} has no <!-- {marker}:begin/end --> block"));
    }
    if std::env::var_os("GPS_WRITE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &want).unwrap();
        eprintln!("[trust] wrote {DOC}");
    } else {
        assert!(
            want == doc,
            "{DOC} does not show what this run observed (GPS_WRITE_DOCS=1 rewrites it):\n{}",
            blocks
                .iter()
                .map(|(m, b)| format!("<!-- {m} -->\n{b}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// A client authenticating with a TokenRequest for the service account that
/// is bound to no pod (so it carries no pod-name extra).
async fn unbound_client(node: &KubeNode, ns: &str) -> Client {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(node.admin(), ns)
        .create_token_request(RELEASE, &PostParams::default(), &request)
        .await
        .unwrap();
    let token = answer.status.and_then(|s| s.token).unwrap();
    node.control_plane()
        .client_with_token(&token, ns)
        .await
        .unwrap()
}

pub async fn one_pods_own_token_writes_only_its_own_record_and_the_admission_policy_refuses_the_rest(
    shared: Arc<Shared>,
) {
    let node = shared.node().await;
    let t0 = Instant::now();
    // The lease layout: the Role then grants Leases too, so every Lease
    // attempt below reaches admission (RBAC would stop it first otherwise).
    let release = install(
        &node,
        "trust",
        3,
        &["--set", "replicas=3", "--set", "registryLayout=leases"],
    )
    .await;
    let (pods, _) = release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    let ns = release.ns.clone();
    let (a, b) = (&pods[0], &pods[1]);
    // The sidecars' own writes to a full mesh (their Leases, the publisher's
    // static-nodes.json) met no refusal.
    let user = format!("system:serviceaccount:{ns}:{RELEASE}");
    let refused = refused_requests(&node, &user);
    assert!(
        refused.is_empty(),
        "the sidecars' own requests were refused: {refused:?}"
    );

    // Pod A's own token, as its containers read it.
    let token = node.pod_service_account_token(&a.uid).unwrap();
    let sa = node
        .control_plane()
        .client_with_token(&token, &ns)
        .await
        .unwrap();
    let sa_leases: Api<Lease> = Api::namespaced(sa.clone(), &ns);
    let sa_cms: Api<ConfigMap> = Api::namespaced(sa.clone(), &ns);
    let leases: Api<Lease> = Api::namespaced(node.admin(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(node.admin(), &ns);
    let lease_a = peer_registry::lease_name(&release.configmap, &a.name);
    let lease_b = peer_registry::lease_name(&release.configmap, &b.name);

    // The policy takes effect about a second after its binding: wait (dry
    // run, nothing written) until a forged Lease of B is refused.
    let in_effect = eventually(
        "the admission policy to refuse a forged Lease (dry run)",
        Duration::from_secs(30),
        || async {
            let mut forged = leases.get(&lease_b).await.ok()?;
            forged
                .spec
                .get_or_insert_with(Default::default)
                .holder_identity = Some(a.name.clone());
            let dry = PostParams {
                dry_run: true,
                ..PostParams::default()
            };
            match sa_leases.replace(&lease_b, &dry, &forged).await {
                Err(kube::Error::Api(s))
                    if s.code == 403 && s.message.contains("ValidatingAdmissionPolicy") =>
                {
                    Some(())
                }
                _ => None,
            }
        },
    )
    .await;
    assert!(
        in_effect.is_ok(),
        "pod {}'s own token may still rewrite pod {}'s Lease: no admission policy in effect",
        a.name,
        b.name
    );

    let mut rows = Vec::new();
    // 1. Another pod's Lease.
    let b_before = leases.get(&lease_b).await.unwrap();
    let mut forged = b_before.clone();
    forged
        .spec
        .get_or_insert_with(Default::default)
        .holder_identity = Some(a.name.clone());
    rows.push(Row {
        attempt: "update another pod's Lease (`<registry>.<pod B>`)",
        refused_by: Some("leases"),
        seen: outcome(
            sa_leases
                .replace(&lease_b, &PostParams::default(), &forged)
                .await,
            200,
        ),
    });
    let mut fake_b = b_before.clone();
    fake_b.metadata = ObjectMeta {
        name: Some(format!("{}.{}-forged", release.configmap, b.name)),
        labels: b_before.metadata.labels.clone(),
        ..ObjectMeta::default()
    };
    rows.push(Row {
        attempt: "create a labelled Lease named for another pod (`<registry>.<pod B>-forged`)",
        refused_by: Some("leases"),
        seen: outcome(sa_leases.create(&PostParams::default(), &fake_b).await, 201),
    });
    // 2. A Lease without the registry label (its own, label removed).
    let mut unlabelled = leases.get(&lease_a).await.unwrap();
    unlabelled
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .remove(peer_registry::REGISTRY_LABEL);
    rows.push(Row {
        attempt: "write its own Lease without the registry label",
        refused_by: Some("leases"),
        seen: outcome(
            sa_leases
                .replace(&lease_a, &PostParams::default(), &unlabelled)
                .await,
            200,
        ),
    });
    let mut no_owner = leases.get(&lease_a).await.unwrap();
    no_owner.metadata.owner_references = None;
    rows.push(Row {
        attempt: "write its own Lease without the ownerReference to its pod",
        refused_by: Some("leases"),
        seen: outcome(
            sa_leases
                .replace(&lease_a, &PostParams::default(), &no_owner)
                .await,
            200,
        ),
    });
    // 3. Another application's leader-election Lease (created as admin).
    let other = Lease {
        metadata: ObjectMeta {
            name: Some(OTHER_APP_LEASE.into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("other-controller-0".into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
    };
    leases.create(&PostParams::default(), &other).await.unwrap();
    let mut taken = leases.get(OTHER_APP_LEASE).await.unwrap();
    taken.spec.as_mut().unwrap().holder_identity = Some(a.name.clone());
    rows.push(Row {
        attempt: "update another application's Lease (leader election)",
        refused_by: Some("leases"),
        seen: outcome(
            sa_leases
                .replace(OTHER_APP_LEASE, &PostParams::default(), &taken)
                .await,
            200,
        ),
    });
    rows.push(Row {
        attempt: "delete another application's Lease",
        refused_by: Some("leases"),
        seen: outcome(
            sa_leases
                .delete(OTHER_APP_LEASE, &DeleteParams::default())
                .await,
            200,
        ),
    });
    // 4. Another member's ConfigMap key (put there as admin: B's own record).
    let b_record =
        b_before.metadata.annotations.as_ref().unwrap()[peer_registry::MEMBER_ANNOTATION].clone();
    let key_b = format!("member.{}", b.name);
    cms.patch(
        &release.configmap,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {key_b.clone(): b_record.clone()}})),
    )
    .await
    .unwrap();
    let ip_b = b.ip.unwrap().to_string();
    let rewritten = b_record.replace(&ip_b, "203.0.113.9");
    assert_ne!(rewritten, b_record, "B's record holds its IP");
    rows.push(Row {
        attempt: "change another member's ConfigMap key (`member.<pod B>`)",
        refused_by: Some("configmap"),
        seen: outcome(
            sa_cms
                .patch(
                    &release.configmap,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"data": {key_b.clone(): rewritten}})),
                )
                .await,
            200,
        ),
    });
    // 5. external-peers.json.
    let external =
        serde_json::to_string(&[format!("enode://{}@203.0.113.7:30303", "ab".repeat(64))]).unwrap();
    rows.push(Row {
        attempt: "write `external-peers.json`",
        refused_by: Some("configmap"),
        seen: outcome(
            sa_cms
                .patch(
                    &release.configmap,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"data": {"external-peers.json": external}})),
                )
                .await,
            200,
        ),
    });
    // 6. Another ConfigMap (RBAC's create cannot be narrowed by name).
    let stray = ConfigMap {
        metadata: ObjectMeta {
            name: Some("not-the-registry".into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    rows.push(Row {
        attempt: "create another ConfigMap",
        refused_by: Some("configmap"),
        seen: outcome(sa_cms.create(&PostParams::default(), &stray).await, 201),
    });
    // 7. The service account's token bound to no pod: no pod-name extra.
    let unbound = unbound_client(&node, &ns).await;
    let own = leases.get(&lease_a).await.unwrap();
    rows.push(Row {
        attempt: "a token of the service account bound to no pod rewrites pod A's Lease",
        refused_by: Some("leases"),
        seen: outcome(
            Api::<Lease>::namespaced(unbound, &ns)
                .replace(&lease_a, &PostParams::default(), &own)
                .await,
            200,
        ),
    });
    // 8. What the pod does write: its own Lease (as read, unchanged).
    let own = leases.get(&lease_a).await.unwrap();
    rows.push(Row {
        attempt: "update its own Lease (`<registry>.<pod A>`)",
        refused_by: None,
        seen: outcome(
            sa_leases
                .replace(&lease_a, &PostParams::default(), &own)
                .await,
            200,
        ),
    });

    let mut wrong = Vec::new();
    for r in &rows {
        let ok = match r.refused_by {
            Some(which) => {
                let policy = policy_name(&ns, which);
                r.seen.status == 403
                    && r.seen.message.contains(&format!(
                        "ValidatingAdmissionPolicy '{policy}' with binding '{policy}' denied request"
                    ))
            }
            None => r.seen.status < 300,
        };
        if !ok {
            wrong.push(format!(
                "{}: {} {}",
                r.attempt, r.seen.status, r.seen.message
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "attempts with pod {}'s own token not as expected:\n{}",
        a.name,
        wrong.join("\n")
    );
    // Nothing refused was written.
    let b_after = leases.get(&lease_b).await.unwrap();
    assert_eq!(b_after.spec, b_before.spec, "B's Lease unchanged");
    assert!(leases.get_opt(OTHER_APP_LEASE).await.unwrap().is_some());
    let data = cms.get(&release.configmap).await.unwrap().data.unwrap();
    assert_eq!(data.get(&key_b), Some(&b_record));
    assert!(!data.contains_key("external-peers.json"));
    // The admin's test key goes again; the mesh is whole.
    cms.patch(
        &release.configmap,
        &PatchParams::default(),
        &Patch::Json::<()>(
            serde_json::from_value(serde_json::json!([
                {"op": "remove", "path": format!("/data/{key_b}")}
            ]))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();

    let can_i = release
        .kubectl(&[
            "auth",
            "can-i",
            "--list",
            &format!("--as=system:serviceaccount:{ns}:{RELEASE}"),
        ])
        .unwrap()
        .replace(&ns, "<ns>");
    let can_i = format!(
        "```text\n$ kubectl -n <ns> auth can-i --list --as=system:serviceaccount:<ns>:{RELEASE}\n{}\n```\n",
        can_i.trim_end()
    );
    eprintln!(
        "[trust] {} attempts checked in {:.1} s",
        rows.len(),
        t0.elapsed().as_secs_f64()
    );
    check_doc(&[("trust-table", table(&ns, &rows)), ("can-i", can_i)]);
}

/// The policies' objects of one kind and suffix (`leases`, `configmap`),
/// without what differs on purpose between the chart and the kustomize
/// component: names, labels, how the caller and the registry are found.
fn rules_of(docs: &[serde_yaml::Value], suffix: &str) -> serde_yaml::Value {
    let policy = docs
        .iter()
        .find(|d| {
            d["kind"] == "ValidatingAdmissionPolicy"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(&format!(".{suffix}")))
        })
        .unwrap_or_else(|| panic!("no ValidatingAdmissionPolicy *.{suffix}"));
    let spec = &policy["spec"];
    let variables: Vec<serde_yaml::Value> = spec["variables"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|v| v["name"] != "registry")
        .cloned()
        .collect();
    serde_yaml::to_value((
        &spec["failurePolicy"],
        &spec["matchConstraints"],
        variables,
        &spec["validations"],
    ))
    .unwrap()
}

/// The chart's policies and the kustomize component's carry the same rules
/// (the CEL is written twice: Helm cannot read files outside the chart).
pub async fn the_chart_and_the_kustomize_component_carry_the_same_policy_rules(
    _shared: Arc<Shared>,
) {
    let root = workspace_root();
    let out = std::process::Command::new(integration_tests::testbed().bin("helm"))
        .args(["template", RELEASE])
        .arg(root.join("charts/geth-peer-sidecar"))
        .args([
            "-n",
            "ns",
            "--api-versions",
            "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parse = |text: &str| -> Vec<serde_yaml::Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &serde_yaml::Value| !v.is_null())
            .collect()
    };
    let chart = parse(&String::from_utf8(out.stdout).unwrap());
    let component = parse(
        &std::fs::read_to_string(root.join("deploy/components/admission-policy/policy.yaml"))
            .unwrap(),
    );
    for suffix in ["leases", "configmap"] {
        assert_eq!(
            rules_of(&chart, suffix),
            rules_of(&component, suffix),
            "the chart's and the kustomize component's {suffix} policies differ"
        );
    }
    // Both bind their two policies with Deny.
    for docs in [&chart, &component] {
        let bindings: Vec<&serde_yaml::Value> = docs
            .iter()
            .filter(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
            .collect();
        assert_eq!(bindings.len(), 2);
        for b in bindings {
            assert_eq!(
                b["spec"]["validationActions"],
                serde_yaml::to_value(["Deny"]).unwrap()
            );
        }
    }
}
