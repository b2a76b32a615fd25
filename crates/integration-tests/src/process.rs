//! Child processes that cannot outlive their test.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::{Error, Result, TestContext, io_err};

/// The CPU time (user + system) process `pid` has used so far, from
/// `/proc/<pid>/stat` (clock ticks of 10 ms); `None` once it is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (in parentheses, which may hold
    // spaces): utime is the 14th field of the line, stime the 15th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// A running child process.
///
/// It runs in its own process group under `setpriv --pdeathsig KILL` (so it dies
/// if the test process dies), writes stdout and stderr to a log file registered
/// with the [`TestContext`], and is killed (whole process group) on drop.
pub struct Proc {
    name: String,
    child: tokio::process::Child,
    pid: i32,
    log: PathBuf,
}

impl Proc {
    /// Spawns `program args...`, optionally inside network namespace `netns`.
    pub fn spawn<I, S>(
        ctx: &TestContext,
        name: &str,
        netns: Option<&str>,
        program: &Path,
        args: I,
        envs: &[(&str, &str)],
    ) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let prefix: Vec<&str> = match netns {
            Some(ns) => vec!["ip", "netns", "exec", ns],
            None => Vec::new(),
        };
        Self::spawn_with(ctx, name, &prefix, program, args, envs)
    }

    /// Spawns `prefix... setpriv --pdeathsig KILL -- program args...`: the
    /// prefix is a command that enters namespaces and then executes the rest
    /// (e.g. `nsenter -t PID -m -n --`), so the process id is still the program's.
    pub fn spawn_with<I, S>(
        ctx: &TestContext,
        name: &str,
        prefix: &[&str],
        program: &Path,
        args: I,
        envs: &[(&str, &str)],
    ) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let log = ctx.path(&format!("logs/{name}.log"));
        ctx.register_log(log.clone());
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_err(format!("open log {}", log.display())))?;
        let err = out.try_clone().map_err(io_err("clone log handle"))?;
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = tokio::process::Command::new(first);
                c.args(rest);
                c.arg("setpriv");
                c
            }
            None => tokio::process::Command::new("setpriv"),
        };
        cmd.args(["--pdeathsig", "KILL", "--"]);
        cmd.arg(program);
        cmd.args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(io_err(format!("spawn {name} ({})", program.display())))?;
        let pid = child
            .id()
            .ok_or_else(|| Error::Setup(format!("{name} exited at once")))?
            as i32;
        Ok(Proc {
            name: name.to_owned(),
            child,
            pid,
            log,
        })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The process name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends a signal to the process (not its group).
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for exit up to `timeout`.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(|r| r.ok())
    }

    /// SIGTERM, then SIGKILL (whole group) if it has not exited within `grace`.
    /// Returns the exit status when it exited by itself.
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        match self.wait_timeout(grace).await {
            Some(status) => {
                self.kill_group();
                Some(status)
            }
            None => {
                self.kill().await;
                None
            }
        }
    }

    /// SIGKILL to the whole process group, and reap.
    pub async fn kill(&mut self) {
        self.kill_group();
        let _ = self.wait_timeout(Duration::from_secs(10)).await;
    }

    fn kill_group(&self) {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_group();
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
    }
}

/// Every running process whose command line mentions `text` (e.g. a test's
/// directory), as `pid args` lines: what a teardown must leave empty.
pub fn processes_referring_to(text: &str) -> Vec<String> {
    let ps = std::process::Command::new("ps")
        .args(["-eo", "pid,args"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    ps.lines()
        .filter(|l| l.contains(text) && !l.contains(" ps -eo "))
        .map(str::to_owned)
        .collect()
}
