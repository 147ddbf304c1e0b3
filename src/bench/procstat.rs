//! CPU seconds and memory of the server processes under test, read from
//! /proc: `utime + stime` from /proc/PID/stat, VmRSS and VmHWM from
//! /proc/PID/status (the peak is reset through /proc/PID/clear_refs).

use anyhow::Context;
use serde_json::{Value, json};

/// Kernel clock ticks per second for /proc/PID/stat times (USER_HZ is 100 on
/// every Linux the project runs on).
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu_s: f64,
    pub rss_kib: u64,
    pub peak_kib: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Notifier,
    /// nats-server, the push emulator.
    Server,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Notifier => "notifier",
            Role::Server => "server",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub role: Role,
}

/// The processes a scenario measures; empty when no pids were given.
#[derive(Debug, Clone, Default)]
pub struct Servers {
    procs: Vec<Proc>,
}

/// One reading of every process, in the order of `Servers`, and of the load
/// generator itself (this process).
#[derive(Debug, Clone)]
pub struct Snapshot(Vec<Sample>, Sample);

impl Servers {
    pub fn new(gateways: &[u32], notifiers: &[u32], others: &[u32]) -> anyhow::Result<Self> {
        let role = |pids: &[u32], role| pids.iter().map(move |&pid| Proc { pid, role }).collect::<Vec<_>>();
        let procs: Vec<Proc> =
            [role(gateways, Role::Gateway), role(notifiers, Role::Notifier), role(others, Role::Server)].concat();
        for p in &procs {
            read(p.pid).with_context(|| format!("cannot read /proc/{} (is the pid right?)", p.pid))?;
        }
        Ok(Self { procs })
    }

    pub fn gateways(&self) -> usize {
        self.count(Role::Gateway)
    }

    pub fn count(&self, role: Role) -> usize {
        self.procs.iter().filter(|p| p.role == role).count()
    }

    /// Resets every process's peak RSS to its current RSS.
    pub fn reset_peaks(&self) {
        for p in &self.procs {
            let _ = std::fs::write(format!("/proc/{}/clear_refs", p.pid), "5");
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let own = read(std::process::id()).unwrap_or_default();
        Snapshot(self.procs.iter().map(|p| read(p.pid).unwrap_or_default()).collect(), own)
    }

    /// CPU seconds used between two snapshots: (gateways, others).
    pub fn cpu_between(&self, a: &Snapshot, b: &Snapshot) -> (f64, f64) {
        let all = self.procs.iter().zip(a.0.iter().zip(&b.0)).map(|(_, (x, y))| y.cpu_s - x.cpu_s).sum::<f64>();
        let gateways = self.cpu_of(Role::Gateway, a, b);
        (gateways, all - gateways)
    }

    /// CPU seconds the processes of `role` used between two snapshots.
    pub fn cpu_of(&self, role: Role, a: &Snapshot, b: &Snapshot) -> f64 {
        self.procs
            .iter()
            .zip(a.0.iter().zip(&b.0))
            .filter(|(p, _)| p.role == role)
            .map(|(_, (x, y))| y.cpu_s - x.cpu_s)
            .sum()
    }

    /// Summed RSS of the gateways, KiB.
    pub fn gateway_rss_kib(&self, s: &Snapshot) -> u64 {
        self.procs.iter().zip(&s.0).filter(|(p, _)| p.role == Role::Gateway).map(|(_, s)| s.rss_kib).sum()
    }

    /// Per-process figures between two snapshots, for the JSON line.
    pub fn report(&self, a: &Snapshot, b: &Snapshot) -> Value {
        let procs: Vec<Value> = self
            .procs
            .iter()
            .zip(a.0.iter().zip(&b.0))
            .map(|(p, (x, y))| {
                json!({
                    "pid": p.pid,
                    "role": p.role.name(),
                    "cpu_s": super::round(y.cpu_s - x.cpu_s),
                    "rss_mib": mib(y.rss_kib),
                    "peak_rss_mib": mib(y.peak_kib),
                })
            })
            .collect();
        let (gw, other) = self.cpu_between(a, b);
        json!({
            "server_cpu_s": super::round(gw + other),
            "gateway_cpu_s": super::round(gw),
            "load_generator_cpu_s": super::round(b.1.cpu_s - a.1.cpu_s),
            "processes": procs,
        })
    }
}

fn mib(kib: u64) -> f64 {
    super::round(kib as f64 / 1024.0)
}

fn read(pid: u32) -> anyhow::Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in ")".
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks: u64 =
        fields.get(11).context("utime")?.parse::<u64>()? + fields.get(12).context("stime")?.parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok(Sample { cpu_s: ticks as f64 / TICKS_PER_SEC, rss_kib: kib("VmRSS:"), peak_kib: kib("VmHWM:") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        // Burn a little CPU so the counter moves from zero on a fresh process.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let s = read(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kib > 0, "RSS read: {s:?}");
        assert!(s.peak_kib >= s.rss_kib, "peak below current: {s:?}");
        assert!(s.cpu_s >= 0.0);
    }

    #[test]
    fn cpu_is_summed_by_role() {
        let me = std::process::id();
        let servers = Servers::new(&[me], &[me, me], &[]).expect("own /proc entry");
        assert_eq!((servers.gateways(), servers.count(Role::Notifier), servers.count(Role::Server)), (1, 2, 0));
        let a = servers.snapshot();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = servers.snapshot();
        let (gw, notifiers) = (servers.cpu_of(Role::Gateway, &a, &b), servers.cpu_of(Role::Notifier, &a, &b));
        assert!(gw > 0.0, "the loop took CPU: {gw}");
        // The same process read once per role (the snapshots read it in turn).
        assert!((notifiers - 2.0 * gw).abs() < 0.05, "{notifiers} against 2 × {gw}");
        let (g, others) = servers.cpu_between(&a, &b);
        assert_eq!(g, gw);
        assert!((others - notifiers).abs() < 1e-9, "others are the notifiers here: {others}");
        let roles: Vec<Value> =
            servers.report(&a, &b)["processes"].as_array().unwrap().iter().map(|p| p["role"].clone()).collect();
        assert_eq!(roles, [json!("gateway"), json!("notifier"), json!("notifier")]);
        let own = servers.report(&a, &b)["load_generator_cpu_s"].as_f64().unwrap();
        assert!((own - gw).abs() < 0.05, "the load generator is this process too: {own} against {gw}");
    }
}
