//! Waiting for geth's IPC socket to accept again: the socket's directory is
//! watched (inotify) so a geth that starts is seen at once, with a poll as
//! the fallback (no inotify, the directory not there yet, events lost).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ipc;

/// The shortest pause between two tries of [`socket_accepts_again`] when the
/// socket's directory cannot be watched: a connect of a local path, a few
/// microseconds each, only while geth is down.
pub const REACHABLE_POLL: Duration = Duration::from_millis(10);
/// The longest pause between two tries of [`socket_accepts_again`], and its
/// pause while the socket's directory is watched.
pub const REACHABLE_POLL_MAX: Duration = Duration::from_secs(1);

/// How long [`socket_accepts_again`] keeps its shortest pause: a geth that
/// starts or restarts within it (a pod's start, a crash, a rollout; the
/// kubelet's own restart back-off is 10 s to 5 min) is seen at once.
pub const REACHABLE_FAST_FOR: Duration = Duration::from_secs(60);

/// How often, and how many times, a socket just created is tried: geth binds
/// its socket and then listens, and a connect in between is refused.
const JUST_CREATED_TRIES: u32 = 20;
const JUST_CREATED_PAUSE: Duration = Duration::from_millis(1);

/// The pause [`socket_accepts_again`] makes between two tries once geth has
/// been down for `down_for`, when it cannot watch the socket's directory:
/// [`REACHABLE_POLL`] for the first [`REACHABLE_FAST_FOR`], then 1 % of the
/// time beyond it, up to [`REACHABLE_POLL_MAX`]. A start or restart is seen
/// within 10 ms; a geth down for long (or a wrong `IPC_PATH`) costs one
/// connect a second, not a hundred.
///
/// ```
/// use std::time::Duration;
/// use geth_ipc::{REACHABLE_POLL, REACHABLE_POLL_MAX, reachable_poll};
/// assert_eq!(reachable_poll(Duration::from_secs(30)), REACHABLE_POLL);
/// assert_eq!(reachable_poll(Duration::from_secs(80)), Duration::from_millis(200));
/// assert_eq!(reachable_poll(Duration::from_secs(3600)), REACHABLE_POLL_MAX);
/// ```
pub fn reachable_poll(down_for: Duration) -> Duration {
    (down_for.saturating_sub(REACHABLE_FAST_FOR) / 100).clamp(REACHABLE_POLL, REACHABLE_POLL_MAX)
}

/// Resolves once geth's IPC socket at `path`, refusing connections (or absent)
/// when called, accepts one: a caller waiting on a geth that is down (since
/// `down_since`) notices its start at once instead of at its next retry.
///
/// On Linux the socket's directory is watched (inotify): geth creating its
/// socket wakes the wait, which then tries it (a few times: geth binds, then
/// listens), and otherwise tries once every [`REACHABLE_POLL_MAX`]. Where the
/// directory cannot be watched (no inotify, or it does not exist yet: geth
/// creates its data directory), the socket is tried every [`reachable_poll`]
/// and the watch set up again at each try. A socket that already accepts
/// (geth up but failing calls) never resolves it: the caller's own retry
/// timer covers that.
pub async fn socket_accepts_again(path: &Path, down_since: tokio::time::Instant) {
    // The watch is set up before the socket is tried: a socket created in
    // between still wakes it (set up after, it would be seen a second late).
    let mut watch = DirWatch::new(path);
    if ipc::accepts(path).await {
        return std::future::pending::<()>().await;
    }
    loop {
        let created = match watch.as_mut() {
            Some(w) => {
                tokio::select! {
                    created = w.created() => created,
                    () = tokio::time::sleep(REACHABLE_POLL_MAX) => false,
                }
            }
            None => {
                tokio::time::sleep(reachable_poll(down_since.elapsed())).await;
                false
            }
        };
        if created {
            for _ in 0..JUST_CREATED_TRIES {
                if ipc::accepts(path).await {
                    return;
                }
                tokio::time::sleep(JUST_CREATED_PAUSE).await;
            }
        } else if ipc::accepts(path).await {
            return;
        }
        if watch.as_ref().is_none_or(DirWatch::ended) {
            watch = DirWatch::new(path);
            // As at the start: a socket created before this watch was set
            // up wakes nothing, so it is tried now.
            if watch.is_some() && ipc::accepts(path).await {
                return;
            }
        }
    }
}

/// An inotify watch of the socket's directory for the socket's creation.
#[cfg(target_os = "linux")]
struct DirWatch {
    events: inotify::EventStream<Vec<u8>>,
    name: std::ffi::OsString,
    ended: bool,
}

#[cfg(target_os = "linux")]
impl DirWatch {
    /// A watch of `path`'s directory, or `None` when it cannot be set up.
    fn new(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_owned();
        let dir: PathBuf = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let inotify = inotify::Inotify::init().ok()?;
        inotify
            .watches()
            .add(
                &dir,
                inotify::WatchMask::CREATE
                    | inotify::WatchMask::MOVED_TO
                    | inotify::WatchMask::ATTRIB,
            )
            .ok()?;
        let events = inotify.into_event_stream(vec![0; 4096]).ok()?;
        Some(Self {
            events,
            name,
            ended: false,
        })
    }

    /// Resolves with `true` when the socket's name was created (or changed),
    /// `false` when the watch ended (directory gone, queue overflow, error):
    /// the caller tries the socket and sets a new watch up.
    async fn created(&mut self) -> bool {
        use futures::StreamExt as _;
        loop {
            match self.events.next().await {
                Some(Ok(ev)) => {
                    if ev.mask.contains(inotify::EventMask::Q_OVERFLOW)
                        || ev.mask.contains(inotify::EventMask::IGNORED)
                    {
                        self.ended = true;
                        return false;
                    }
                    if ev.name.as_deref() == Some(self.name.as_os_str()) {
                        return true;
                    }
                }
                Some(Err(_)) | None => {
                    self.ended = true;
                    return false;
                }
            }
        }
    }

    fn ended(&self) -> bool {
        self.ended
    }
}

/// Without inotify the socket is polled ([`reachable_poll`]).
#[cfg(not(target_os = "linux"))]
struct DirWatch;

#[cfg(not(target_os = "linux"))]
impl DirWatch {
    fn new(_path: &Path) -> Option<Self> {
        None
    }

    async fn created(&mut self) -> bool {
        std::future::pending().await
    }

    fn ended(&self) -> bool {
        true
    }
}
