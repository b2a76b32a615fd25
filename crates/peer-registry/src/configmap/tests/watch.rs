//! The watch: watcher events for the one object become snapshots, repeats
//! dropped.

use super::*;

fn observer() -> Observer {
    Observer {
        namespace: "ns".into(),
        name: DEFAULT_NAME.into(),
        above_warn: AtomicBool::new(false),
        problems: Mutex::new(Vec::new()),
    }
}

fn cm(rv: &str, members: &[MemberRecord]) -> ConfigMap {
    let set = members.iter().map(|m| (m.pod.clone(), m.clone())).collect();
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(DEFAULT_NAME.into()),
            resource_version: Some(rv.into()),
            ..ObjectMeta::default()
        },
        data: Some(schema::encode(&BTreeMap::new(), &set)),
        ..ConfigMap::default()
    }
}

#[test]
fn watch_events_become_snapshots() {
    use watcher::Event;
    let obs = observer();
    let mut st = WatchState::default();
    // Absent at init: an empty snapshot.
    assert!(st.on_event(Event::Init, &obs).is_none());
    let s = st.on_event(Event::InitDone, &obs).unwrap();
    assert!(!s.exists());
    // Created.
    let s = st
        .on_event(Event::Apply(cm("5", &[member("a", 0)])), &obs)
        .unwrap();
    assert_eq!(s.resource_version.as_deref(), Some("5"));
    assert!(s.members.contains_key("a"));
    // A re-list (410 Gone, reconnect) showing the same version: no repeat.
    assert!(st.on_event(Event::Init, &obs).is_none());
    assert!(
        st.on_event(Event::InitApply(cm("5", &[member("a", 0)])), &obs)
            .is_none()
    );
    assert!(st.on_event(Event::InitDone, &obs).is_none());
    // Changed while disconnected: the re-list reports it.
    assert!(st.on_event(Event::Init, &obs).is_none());
    assert!(
        st.on_event(Event::InitApply(cm("9", &[member("b", 1)])), &obs)
            .is_none()
    );
    let s = st.on_event(Event::InitDone, &obs).unwrap();
    assert_eq!(pods(&s), BTreeSet::from(["b".to_owned()]));
    // Deleted.
    let s = st.on_event(Event::Delete(cm("9", &[])), &obs).unwrap();
    assert_eq!(s, Snapshot::default());
    // Deleted while disconnected, then a re-list: no repeat of the empty one.
    assert!(st.on_event(Event::Init, &obs).is_none());
    assert!(st.on_event(Event::InitDone, &obs).is_none());
    // Other objects are ignored.
    let mut other = cm("10", &[]);
    other.metadata.name = Some("other".into());
    assert!(st.on_event(Event::Apply(other), &obs).is_none());
}
