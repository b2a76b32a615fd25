//! Transient apiserver errors (5xx, 429, a refused connection) are retried
//! a bounded number of times; the lease publisher retries until it lands.

use super::*;

#[tokio::test]
async fn transient_server_errors_are_retried_a_bounded_number_of_times() {
    for protocol in [WriteProtocol::KeyPatch, WriteProtocol::WholeObjectCas] {
        let fake = Fake::default();
        let core = fake.core_with(fast(), protocol);
        core.upsert(member("geth-0", 0)).await.unwrap();
        // An etcd timeout, an overloaded apiserver, a gateway timeout.
        fake.fail_next_get(api_err(503, "ServiceUnavailable"));
        fake.fail_next_write(api_err(500, "InternalError"));
        fake.fail_next_write(api_err(504, "Timeout"));
        core.upsert(member("geth-1", 1))
            .await
            .unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
        fake.fail_next_write(api_err(429, "TooManyRequests"));
        core.remove(vec![member("geth-0", 0)])
            .await
            .unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
        let snap = core.snapshot().await.unwrap();
        assert_eq!(pods(&snap), BTreeSet::from(["geth-1".to_owned()]));
        assert!(static_nodes_current(&fake.data()), "{protocol:?}");
        // A server that keeps failing is reported, not retried for ever.
        for _ in 0..=TRANSIENT_RETRIES {
            fake.fail_next_write(api_err(503, "ServiceUnavailable"));
        }
        let err = core.upsert(member("geth-2", 2)).await.unwrap_err();
        assert_eq!(err.kind(), "unavailable", "{protocol:?}: {err}");
        assert!(fake.state().fail_writes.is_empty(), "{protocol:?}");
    }
}

/// Issue 21, defect 6: a refused connection (an apiserver restarting) is
/// transient: the write is retried, not given up at once.
#[tokio::test]
async fn a_refused_connection_is_retried_like_a_5xx() {
    for protocol in [WriteProtocol::WholeObjectCas, WriteProtocol::KeyPatch] {
        let fake = Fake::default();
        let core = fake.core_with(fast(), protocol);
        core.upsert(member("geth-0", 0)).await.unwrap();
        fake.fail_next_write(refused());
        fake.fail_next_get(refused());
        fake.fail_next_write(refused());
        let snap = core.upsert(member("geth-1", 1)).await;
        assert_eq!(snap.map(|s| s.members.len()).ok(), Some(2), "{protocol:?}");
    }
}

/// Issue 21, defect 6: the lease layout's publisher retries until
/// `static-nodes.json` matches the Leases, through more failures than one
/// call's own retries absorb (a conflict storm, an apiserver down a while).
#[tokio::test]
async fn the_lease_publisher_retries_until_static_nodes_matches_the_leases() {
    let fake = Fake::default();
    // One call: at most 3 attempts and 8 transient errors (as in production,
    // where it is 60 attempts; the outage here outlasts them).
    let core = fake.core_with(
        RetryPolicy {
            max_attempts: 3,
            ..fast()
        },
        WriteProtocol::WholeObjectCas,
    );
    core.upsert(member("geth-0", 0)).await.unwrap();
    let leases: BTreeMap<String, MemberRecord> = [member("geth-5", 5), member("geth-6", 6)]
        .into_iter()
        .map(|m| (m.pod.clone(), m))
        .collect();
    for i in 0..40 {
        match i % 3 {
            0 => fake.fail_next_write(refused()),
            1 => fake.fail_next_write(api_err(503, "ServiceUnavailable")),
            _ => fake.fail_next_write(api_err(409, "Conflict")),
        }
    }
    let backoff = RetryPolicy {
        max_attempts: u32::MAX,
        base_delay: Duration::from_micros(100),
        max_delay: Duration::from_millis(2),
    };
    let attempts = crate::lease::until_published(backoff, "test", || async {
        core.rewrite_data("publish", |data, _| {
            schema::encode_lease_members(data, &leases)
        })
        .await
        .map(drop)
    })
    .await;
    assert!(attempts > 1, "{attempts}");
    assert_eq!(
        schema::encode_lease_members(&fake.data(), &leases),
        None,
        "static-nodes.json matches the leases"
    );
    assert_eq!(
        schema::lease_members_listed(&fake.data()),
        leases.values().map(|m| m.node_id).collect::<BTreeSet<_>>()
    );
}
