//! Fuzz enode parsing: never panics, and whatever parses prints back to a string
//! that parses to the identical enode.
#![no_main]

use geth_ipc::{Enode, Host, NodeId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = s.parse::<Host>();
    let _ = s.parse::<NodeId>();
    if let Ok(enode) = s.parse::<Enode>() {
        let printed = enode.to_string();
        let again: Enode = printed.parse().expect("a printed enode parses");
        assert!(again.identical(&enode), "{s:?} -> {printed:?}");
        assert_eq!(again.to_string(), printed);
    }
});
