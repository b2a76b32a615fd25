//! Tuning knobs of the engine.

use std::time::Duration;

use crate::cidr::Cidr;

/// How the engine decides. Every field has a safe default ([`Config::default`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Also mark every desired peer trusted (`admin_addTrustedPeer`) so geth's
    /// `maxpeers` admission check never refuses a mesh member, and unmark departed
    /// peers (`admin_removeTrustedPeer`).
    pub trusted: bool,
    /// A member whose p2p endpoint has been unreachable from this observer
    /// continuously for at least this long (and that is not connected to this
    /// geth) is a candidate for removal, subject to the partition guard.
    /// Default: 120 s.
    pub dead_after: Duration,
    /// A member whose record was written less than this long ago (or this little
    /// ahead of `now`, for clock skew) is never removed: protects new and
    /// re-registered members from stale probe state and from a lagging pod cache.
    /// Default: 60 s.
    pub grace_after_register: Duration,
    /// The first dial of a new pair (one of the two records written less than
    /// this long ago) is left to one side: the member with the later record (a
    /// newcomer or a moved node: its geth has no dial history) adds the other at
    /// once; the other side adds it after this grace, by when the link is usually
    /// up. Two geths dialling each other at the same moment can each keep their
    /// own outbound connection and drop the other's, losing both, and then wait
    /// geth's ~35 s redial timer. The member with the later record that
    /// learns of the other's record from a watch's list, later than this grace
    /// (less 0.5 s) after its own record landed, waits three graces for the
    /// other's dial first.
    /// Default: 2 s.
    pub dial_grace: Duration,
    /// A peer added blind (see `Observation::blind_adds`) and still not
    /// connected this long after is cleared (`admin_removePeer`) and added
    /// again, once: geth may have ignored the add for an older address it held.
    /// No start and no steady mesh issues a removePeer otherwise. Default: 10 s.
    pub stale_entry_after: Duration,
    /// Peer with legacy members: `static-nodes.json` entries without a member
    /// record, as the original (Python) sidecar writes them, so a fleet
    /// migrating from it forms one mesh. They are removed only after
    /// `dead_after` of unreachability (with the partition guard). Default: on.
    pub legacy_members: bool,
    /// The member address allowlist. When not empty, a member record whose
    /// enode host is an IP outside every network listed is refused like a
    /// loopback one: never dialled, not counted as missing, reported as a
    /// [`Problem::MemberOutsideAllowedCidrs`](crate::Problem::MemberOutsideAllowedCidrs).
    /// A DNS-name host cannot be checked here (geth resolves it at every dial)
    /// and is allowed; external peers are never filtered. Default: empty (any
    /// routable address).
    pub member_cidrs: Vec<Cidr>,
    /// Without trusted pod evidence, a member (or legacy entry) unreachable
    /// from here is removed only when at least this many other members'
    /// sidecars, asked to probe it, answered and all of them found it
    /// unreachable too ([`Observation::confirmations`](crate::Observation::confirmations)):
    /// one observer's broken path must not remove a live member for everyone.
    /// With fewer other members reachable from here than this, nobody is
    /// removed for unreachability. 0 acts on this observer's view alone (with
    /// the partition guard), which a one-way cut between two pods turns into
    /// repeated wrong removals. Default: 2.
    pub confirmations_needed: usize,
    /// How old a round of confirmations may be and still count: an older one
    /// (from before a partition healed, or taken while the registry could
    /// not be written) is asked again, so a removal always rests on what the
    /// other members see now. The runtime asks every probe round; set it to a
    /// few probe intervals. Default: 15 s.
    pub confirmation_max_age: Duration,
}

/// A configuration the engine refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `dead_after` is shorter than two probe intervals: one late or lost
    /// probe round would count as a member being dead.
    #[error(
        "DEAD_AFTER ({dead_after:?}) must be at least twice PROBE_INTERVAL ({probe_interval:?})"
    )]
    DeadAfterTooShort {
        /// The configured `dead_after`.
        dead_after: Duration,
        /// The runtime's probe interval.
        probe_interval: Duration,
    },
}

impl Config {
    /// Checks the configuration against the runtime's probe interval (how
    /// often it probes members; the engine itself never probes): `dead_after`
    /// must cover at least two probe rounds.
    ///
    /// ```
    /// use std::time::Duration;
    /// use reconcile_core::{Config, ConfigError};
    ///
    /// let config = Config { dead_after: Duration::from_secs(20), ..Config::default() };
    /// assert!(config.validate(Duration::from_secs(10)).is_ok());
    /// assert!(matches!(
    ///     config.validate(Duration::from_secs(15)),
    ///     Err(ConfigError::DeadAfterTooShort { .. })
    /// ));
    /// ```
    pub fn validate(&self, probe_interval: Duration) -> Result<(), ConfigError> {
        if self.dead_after < probe_interval.saturating_mul(2) {
            return Err(ConfigError::DeadAfterTooShort {
                dead_after: self.dead_after,
                probe_interval,
            });
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            trusted: false,
            dead_after: Duration::from_secs(120),
            grace_after_register: Duration::from_secs(60),
            dial_grace: Duration::from_secs(2),
            stale_entry_after: Duration::from_secs(10),
            member_cidrs: Vec::new(),
            legacy_members: true,
            confirmations_needed: 2,
            confirmation_max_age: Duration::from_secs(15),
        }
    }
}
