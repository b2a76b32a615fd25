//! One test per rule, named by the behaviour, in one file per part of the
//! engine (`engine/*.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use geth_ipc::{Enode, Host, NodeId};
use jiff::Timestamp;
use peer_registry::Snapshot;

use crate::testkit::{
    World, at, dialled, identity, node, record, removed_pods, snapshot, t0, upserts,
};
use crate::{
    Config, GethAction, Observation, PeerObservation, Plan, Problem, RegistryAction, RemovalReason,
    plan,
};

use GethAction::{AddPeer, AddTrustedPeer, RemovePeer, RemoveTrustedPeer};

mod geth;
mod liveness;
mod members;
mod pods;
mod register;
mod report;
