//! What a run measured ([`Report`]), its summary, its JSON form with the growth per
//! connection, and [`write_json`].

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::heal_times::HealSummary;
use super::histogram::Latency;
use crate::process::Failure;

/// Errors by gRPC code name.
pub type Errors = BTreeMap<String, u64>;

/// One phase of Requests or Closes made by the tool.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Wall time of the phase, seconds.
    pub seconds: f64,
    /// Operations that succeeded.
    pub ok: u64,
    /// Latency of every operation (failed ones included).
    pub latency: Latency,
    /// Failed operations by code.
    pub errors: Errors,
}

/// The refresh phase.
#[derive(Debug, Clone, Default)]
pub struct Soak {
    /// How long it lasted, seconds.
    pub seconds: f64,
    /// Re-requests (refreshes, and heal's attempts) that went through the chain.
    pub refreshes: u64,
    /// Their latency.
    pub latency: Latency,
    /// Failed re-requests by code.
    pub errors: Errors,
    /// Connections found broken (heal started).
    pub heal_broken: u64,
    /// Connections healed.
    pub heal_healed: u64,
    /// How many times every program's and the client's identity files were rewritten
    /// with new SVIDs (`--rotate-every`).
    pub rotations: u64,
    /// After the last rotation, whether a new handshake with the manager got its newest
    /// certificate (`None` without rotations).
    pub rotated_certificate_served: Option<bool>,
    /// How long each connection took from broken to healed.
    pub heal: HealSummary,
    /// The forwarder killed and started again (`--kill-forwarder-after`).
    pub restart: Option<Restart>,
    /// The data plane checked at the end of the soak (`--ping-sample`).
    pub pings: Option<Pings>,
}

/// A forwarder SIGKILLed and started again during the soak; times in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Restart {
    /// When it was killed, into the soak.
    pub killed_at: f64,
    /// From the kill to the new process's start.
    pub started_after_kill: f64,
    /// From the new start to its metrics endpoint answering (`None`: it never did).
    pub serving_after_start: Option<f64>,
    /// From the new start to the last connection healed (`None`: none healed after
    /// it).
    pub last_healed_after_start: Option<f64>,
    /// Connections sampled for pings after their heal (`--ping-sample`).
    pub ping_sampled: usize,
    /// Of those, the ones that answered a ping after they healed, before the end of
    /// the soak.
    pub pinged: usize,
    /// From the new start to the last sampled connection answering a ping after its
    /// heal (`None`: not all answered).
    pub last_ping_after_start: Option<f64>,
}

impl Restart {
    fn json(&self) -> Value {
        json!({
            "killed_at_s": self.killed_at, "started_after_kill_s": self.started_after_kill,
            "serving_after_start_s": self.serving_after_start,
            "last_healed_after_start_s": self.last_healed_after_start,
            "ping_sampled": self.ping_sampled, "pinged_after_heal": self.pinged,
            "last_ping_after_start_s": self.last_ping_after_start,
        })
    }
}

/// The end-of-soak ping check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pings {
    /// Connections pinged.
    pub sampled: usize,
    /// Of those, the ones that answered.
    pub ok: usize,
    /// Connections picked that had no endpoint address or namespace to ping from.
    pub skipped: usize,
}

/// A whole run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The options, as JSON.
    pub options: Value,
    /// The warm-up Request + Close, ms (`None`: it failed).
    pub warmup_ms: Option<f64>,
    /// Setting the connections up.
    pub setup: Phase,
    /// Keeping them.
    pub soak: Soak,
    /// Closing them.
    pub close: Phase,
    /// With KERNEL: the links other than `lo` left in the clients' and the endpoint's
    /// namespaces after the Closes and the settle pause (each counts as an error).
    pub left_after_close: Option<u64>,
    /// Re-requests outside the soak (during setup and close) and their errors.
    pub other_refresh_errors: Errors,
    /// Samples by process, then by stage.
    pub processes: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// The stages sampled, in order.
    pub stages: Vec<String>,
    /// The run was stopped early by a signal.
    pub interrupted: bool,
    /// How each started program (`--processes`) ended after SIGTERM at the end of the
    /// run: `exit 0` when it stopped cleanly.
    pub shutdown: BTreeMap<String, String>,
}

impl Report {
    /// Failed operations of every phase, connections left unhealed, sampled
    /// connections that did not answer a ping at the end of the soak and links left
    /// after Close.
    pub fn errors_total(&self) -> u64 {
        [
            &self.setup.errors,
            &self.soak.errors,
            &self.close.errors,
            &self.other_refresh_errors,
        ]
        .iter()
        .flat_map(|e| e.values())
        .sum::<u64>()
            + u64::from(self.warmup_ms.is_none())
            + self.left_after_close.unwrap_or(0)
            + self.soak.heal.unhealed as u64
            + self
                .soak
                .pings
                .as_ref()
                .map_or(0, |p| (p.sampled - p.ok) as u64)
    }

    /// The started programs that did not stop cleanly (exit 0) on SIGTERM.
    pub fn unclean_stops(&self) -> Vec<(&str, &str)> {
        self.shutdown
            .iter()
            .filter(|(_, how)| how.as_str() != "exit 0")
            .map(|(name, how)| (name.as_str(), how.as_str()))
            .collect()
    }

    /// `metric` of `process` at `to` minus at `from`.
    pub fn delta(&self, process: &str, metric: &str, from: &str, to: &str) -> Option<f64> {
        let stages = self.processes.get(process)?;
        Some(stages.get(to)?.get(metric)? - stages.get(from)?.get(metric)?)
    }

    /// The report as JSON.
    pub fn json(&self) -> Value {
        let errs = |e: &Errors| json!(e);
        let per_conn = self.setup.ok.max(1) as f64;
        let mut growth = serde_json::Map::new();
        for name in self.processes.keys() {
            let mut g = serde_json::Map::new();
            for metric in GROWTH_METRICS {
                let setup = self.delta(name, metric, "start", "after_setup");
                let soak = self.delta(name, metric, "after_setup", "end_of_soak");
                let close = self.delta(name, metric, "start", "after_close");
                g.insert(
                    metric.to_string(),
                    json!({
                        "per_connection": setup.map(|d| d / per_conn),
                        "setup": setup, "soak": soak, "after_close_vs_start": close,
                    }),
                );
            }
            growth.insert(name.clone(), Value::Object(g));
        }
        json!({
            "options": self.options,
            "interrupted": self.interrupted,
            "errors_total": self.errors_total(),
            "warmup_ms": self.warmup_ms,
            "setup": {"seconds": self.setup.seconds, "ok": self.setup.ok,
                      "latency_ms": self.setup.latency.json(), "errors": errs(&self.setup.errors)},
            "soak": {"seconds": self.soak.seconds, "refreshes": self.soak.refreshes,
                     "refreshes_per_second": self.soak.refreshes as f64 / self.soak.seconds.max(1e-9),
                     "refresh_latency_ms": self.soak.latency.json(), "errors": errs(&self.soak.errors),
                     "heal_broken": self.soak.heal_broken, "heal_healed": self.soak.heal_healed,
                     "rotations": self.soak.rotations,
                     "rotated_certificate_served": self.soak.rotated_certificate_served,
                     "heal": self.soak.heal.json(),
                     "forwarder_restart": self.soak.restart.as_ref().map(Restart::json),
                     "pings": self.soak.pings.as_ref().map(|p| json!({
                         "sampled": p.sampled, "ok": p.ok, "failed": p.sampled - p.ok, "skipped": p.skipped}))},
            "close": {"seconds": self.close.seconds, "ok": self.close.ok,
                      "latency_ms": self.close.latency.json(), "errors": errs(&self.close.errors)},
            "refresh_errors_outside_soak": errs(&self.other_refresh_errors),
            "links_left_after_close": self.left_after_close,
            "stages": self.stages,
            "processes": self.processes,
            "growth": growth,
            "shutdown": self.shutdown,
        })
    }

    /// The report for people: a few lines.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let l = &self.setup.latency;
        let fmt_errors = |e: &Errors| {
            if e.is_empty() {
                "none".to_string()
            } else {
                e.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        out += &format!(
            "setup:   {} of {} connected in {:.3} s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}; errors: {}\n",
            self.setup.ok,
            l.count,
            self.setup.seconds,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            fmt_errors(&self.setup.errors)
        );
        let s = &self.soak;
        out += &format!(
            "soak:    {:.1} s, {} refreshes ({:.1}/s), latency ms p50 {:.2} p99 {:.2} max {:.2}; errors: {}; heal: {} broken, {} healed\n",
            s.seconds,
            s.refreshes,
            s.refreshes as f64 / s.seconds.max(1e-9),
            s.latency.p50,
            s.latency.p99,
            s.latency.max,
            fmt_errors(&s.errors),
            s.heal_broken,
            s.heal_healed
        );
        let h = &s.heal;
        if h.healed + h.unhealed > 0 {
            out += &format!(
                "heal:    {} healed, {} not; broken to healed ms p50 {:.0} p99 {:.0} max {:.0}; first broken to last healed {}\n",
                h.healed,
                h.unhealed,
                h.latency.p50,
                h.latency.p99,
                h.latency.max,
                secs(h.first_broken_to_last_healed.map(|d| d.as_secs_f64())),
            );
        }
        if let Some(r) = &s.restart {
            out += &format!(
                "restart: forwarder killed at {:.1} s, started {:.3} s later, serving after {}; last connection healed {} after its start",
                r.killed_at,
                r.started_after_kill,
                secs(r.serving_after_start),
                secs(r.last_healed_after_start),
            );
            if r.ping_sampled > 0 {
                out += &format!(
                    "; {} of {} sampled ping after heal, the last {} after its start",
                    r.pinged,
                    r.ping_sampled,
                    secs(r.last_ping_after_start)
                );
            }
            out += "\n";
        }
        if let Some(p) = &s.pings {
            out += &format!(
                "pings:   {} of {} sampled connections answer at the end of the soak ({} could not be pinged)\n",
                p.ok, p.sampled, p.skipped
            );
        }
        if let Some(served) = s.rotated_certificate_served {
            out += &format!(
                "rotation: {} rotations of every SVID; the manager serves the newest: {}\n",
                s.rotations,
                if served { "yes" } else { "NO" }
            );
        }
        let c = &self.close.latency;
        out += &format!(
            "close:   {} closed in {:.3} s; latency ms p50 {:.2} p99 {:.2} max {:.2}; errors: {}\n",
            self.close.ok,
            self.close.seconds,
            c.p50,
            c.p99,
            c.max,
            fmt_errors(&self.close.errors)
        );
        if let Some(left) = self.left_after_close {
            out += &format!("left:    {left} links in the namespaces after Close\n");
        }
        if !self.other_refresh_errors.is_empty() {
            out += &format!(
                "refresh errors outside the soak: {}\n",
                fmt_errors(&self.other_refresh_errors)
            );
        }
        if !self.shutdown.is_empty() {
            let ends: Vec<String> = self
                .shutdown
                .iter()
                .map(|(name, how)| format!("{name} {how}"))
                .collect();
            out += &format!("stopped: {}\n", ends.join(", "));
        }
        let n = self.setup.ok.max(1) as f64;
        for (name, stages) in &self.processes {
            let at = |stage: &str, m: &str| stages.get(stage).and_then(|s| s.get(m)).copied();
            let mb = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}", v / 1048576.0));
            let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
            out += &format!("{name}:\n");
            out += "  stage         RSS MB   fds  threads  conns  nsm tasks  tokio tasks  CPU s\n";
            for stage in &self.stages {
                let stage = stage.as_str();
                if stages.contains_key(stage) {
                    out += &format!(
                        "  {stage:<12} {:>7} {:>5} {:>8} {:>6} {:>10} {:>12} {:>6}\n",
                        mb(at(stage, "process_resident_memory_bytes")),
                        num(at(stage, "process_open_fds")),
                        num(at(stage, "process_threads")),
                        num(at(stage, "nsm_live_connections")),
                        num(at(stage, "nsm_live_tasks")),
                        num(at(stage, "tokio_alive_tasks")),
                        at(stage, "process_cpu_seconds_total")
                            .map_or("-".into(), |v| format!("{v:.2}")),
                    );
                }
            }
            let d = |m: &str| self.delta(name, m, "start", "after_setup");
            out += &format!(
                "  per connection: RSS {} B, fds {}, nsm tasks {}, tokio tasks {}; soak growth: RSS {} KB, fds {}, tokio tasks {}\n",
                d("process_resident_memory_bytes").map_or("-".into(), |v| format!("{:.0}", v / n)),
                d("process_open_fds").map_or("-".into(), |v| format!("{:.3}", v / n)),
                d("nsm_live_tasks").map_or("-".into(), |v| format!("{:.2}", v / n)),
                d("tokio_alive_tasks").map_or("-".into(), |v| format!("{:.2}", v / n)),
                self.delta(name, "process_resident_memory_bytes", "after_setup", "end_of_soak")
                    .map_or("-".into(), |v| format!("{:.0}", v / 1024.0)),
                num(self.delta(name, "process_open_fds", "after_setup", "end_of_soak")),
                num(self.delta(name, "tokio_alive_tasks", "after_setup", "end_of_soak")),
            );
        }
        out
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3} s"))
}

/// The metrics whose growth the report computes.
pub(super) const GROWTH_METRICS: [&str; 6] = [
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_threads",
    "nsm_live_connections",
    "nsm_live_tasks",
    "tokio_alive_tasks",
];

pub(super) fn merge(into: &mut Errors, from: Errors) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// Writes `report` as JSON to `path`.
pub fn write_json(report: &Report, path: &Path) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(&report.json())
        .map_err(|e| Failure::runtime(format!("cannot encode the report: {e}")))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_computes_growth_per_connection() {
        let mut r = Report::default();
        r.setup.ok = 1000;
        let at = |rss: f64, fds: f64| {
            BTreeMap::from([
                ("process_resident_memory_bytes".to_string(), rss),
                ("process_open_fds".to_string(), fds),
            ])
        };
        r.processes.insert(
            "nsmgr".into(),
            BTreeMap::from([
                ("start".to_string(), at(10e6, 20.0)),
                ("after_setup".to_string(), at(20e6, 20.0)),
                ("end_of_soak".to_string(), at(20.5e6, 21.0)),
            ]),
        );
        r.soak.errors.insert("Unavailable".into(), 2);
        let j = r.json();
        let g = &j["growth"]["nsmgr"];
        assert_eq!(
            g["process_resident_memory_bytes"]["per_connection"],
            10_000.0
        );
        assert_eq!(g["process_resident_memory_bytes"]["soak"], 0.5e6);
        assert_eq!(g["process_open_fds"]["soak"], 1.0);
        assert_eq!(g["nsm_live_tasks"]["setup"], Value::Null);
        assert_eq!(
            j["errors_total"], 3,
            "two refreshes and the missing warm-up"
        );
        assert!(r.summary().contains("nsmgr:"));
    }
}
