//! What the benches share: percentiles of a sample, the runtimes the mesh runs on, a
//! handler that times what passes through it, what the machine is (printed with each
//! run), CPU time, the addresses of a connection, an `iperf3` run and a series of pings
//! between pods.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::{async_trait, Cx, Handler, Next};
use tokio::runtime::{Builder, Runtime};

use crate::lab::run;
use crate::Ns;

/// Any failure of a bench step.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A bench step's result.
pub type Res<T> = Result<T, BoxError>;

/// A client context with a 10 s deadline (a bench call never waits for ever).
pub fn cx() -> Cx {
    Cx::client().with_timeout(Duration::from_secs(10))
}

/// The runtime every component of the mesh runs on: `current_thread`, or (anything
/// else, e.g. `multi_thread_2`) two workers, as many as the machine's cores.
pub fn runtime(kind: &str) -> std::io::Result<Runtime> {
    match kind {
        "current_thread" => Builder::new_current_thread().enable_all().build(),
        _ => Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    }
}

/// Percentiles of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// How many.
    pub n: usize,
    /// The mean.
    pub mean: Duration,
    /// The median.
    pub p50: Duration,
    /// The 99th percentile (nearest rank).
    pub p99: Duration,
    /// The largest.
    pub max: Duration,
}

impl Stats {
    /// The statistics of `samples` (all zero when there are none).
    pub fn of(samples: &[Duration]) -> Stats {
        let mut s = samples.to_vec();
        s.sort();
        let n = s.len();
        if n == 0 {
            return Stats {
                n,
                mean: Duration::ZERO,
                p50: Duration::ZERO,
                p99: Duration::ZERO,
                max: Duration::ZERO,
            };
        }
        Stats {
            n,
            mean: s.iter().sum::<Duration>() / n as u32,
            p50: s[n / 2],
            p99: s[(n * 99).div_ceil(100) - 1],
            max: s[n - 1],
        }
    }

    /// `n, mean, p50, p99, max` in ms.
    pub fn line(&self) -> String {
        format!(
            "n {}, mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            self.n,
            ms(self.mean),
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )
    }
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

/// The mean of `v` (0 when empty).
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The median of `v` (the upper one of an even count; 0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// An iperf3 server that is killed (and reaped) when dropped.
struct IperfServer(Child);

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The port [`iperf`] runs on.
const IPERF_PORT: &str = "5201";

/// One `iperf3` run (TCP, one stream, `seconds` long) from `client` to `addr`, served
/// by `iperf3 -s -1` in `server`; the receiver's Gbit/s. Needs `iperf3` and `ss`.
pub fn iperf(server: &Ns, client: &Ns, addr: &str, seconds: u32) -> Res<f64> {
    let mut srv = IperfServer(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &server.name,
                "iperf3",
                "-s",
                "-1",
                "-p",
                IPERF_PORT,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // The client fails at once when nobody listens yet.
    let sport = format!(":{IPERF_PORT}");
    let ss = [
        "netns",
        "exec",
        &server.name,
        "ss",
        "-Htln",
        "sport",
        "=",
        &sport,
    ];
    let listening = (0..100).any(|_| {
        let listens = !run("ip", &ss).1.trim().is_empty();
        if !listens {
            std::thread::sleep(Duration::from_millis(20));
        }
        listens
    });
    if !listening {
        return Err(format!("iperf3 -s in {} does not listen", server.name).into());
    }
    let secs = seconds.to_string();
    // stdout only: the JSON report (warnings go to stderr).
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.name,
            "iperf3",
            "-c",
            addr,
            "-p",
            IPERF_PORT,
            "-t",
            &secs,
            "-P",
            "1",
            "-J",
        ])
        .output()?;
    let (ok, out) = (o.status.success(), String::from_utf8_lossy(&o.stdout));
    let json: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| format!("iperf3 -c {addr} (ok={ok}): {e}: {out}"))?;
    if let Some(err) = json["error"].as_str() {
        return Err(format!("iperf3 -c {addr}: {err}").into());
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("iperf3 -c {addr}: no end.sum_received: {out}"))?;
    let retrans = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    eprintln!("    retransmits {retrans}");
    // With -1 the server exits after the test.
    let _ = srv.0.wait();
    Ok(bps / 1e9)
}

/// `count` echo requests from `pod` to `addr`, `interval` seconds apart (`ping -i`;
/// root may go down to `0.002`), each waiting at most 1 s: the round-trip time of each
/// answer, as `ping` measured it. Fails when `ping` cannot run or an answer is missing.
pub fn ping_rtts(pod: &Ns, addr: &str, count: u32, interval: &str) -> Res<Vec<Duration>> {
    let count_s = count.to_string();
    let o = Command::new("ip")
        .args([
            "netns", "exec", &pod.name, "ping", "-n", "-c", &count_s, "-i", interval, "-W1", addr,
        ])
        .output()?;
    let out = String::from_utf8_lossy(&o.stdout);
    let rtts = rtts_of(&out);
    if rtts.len() != count as usize {
        return Err(format!(
            "ping {addr} from {}: {} of {count} answered: {}{}",
            pod.name,
            rtts.len(),
            out.lines().last().unwrap_or_default(),
            String::from_utf8_lossy(&o.stderr)
        )
        .into());
    }
    Ok(rtts)
}

/// The `time=<ms> ms` of each answer line of `ping`'s output.
fn rtts_of(out: &str) -> Vec<Duration> {
    out.lines()
        .filter_map(|l| {
            let ms = l.split("time=").nth(1)?.split_whitespace().next()?;
            let ms: f64 = ms.parse().ok()?;
            Some(Duration::from_nanos((ms * 1e6).round() as u64))
        })
        .collect()
}

/// Gives each hand-made link end `(pod, dev, own, peer)` what NSM gives its own: the
/// address `own`, up, and a route to `peer` through it (`scope global proto static`).
pub fn address_by_hand(ends: [(&Ns, &str, &str, &str); 2]) {
    for (ns, dev, own, peer) in ends {
        ns.ip(&["addr", "add", own, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
        ns.ip(&[
            "route", "add", peer, "dev", dev, "scope", "global", "proto", "static",
        ]);
    }
}

/// Checks that each `(NSM pod, hand-made pod, dev)` has the same data-plane `shape` of
/// `dev` (printing the NSM one), so a throughput comparison compares like with like.
pub fn same_shape(
    pairs: [(&Ns, &Ns, &str); 2],
    shape: impl Fn(&Ns, &str) -> Vec<String>,
) -> Res<()> {
    for (nsm, hand, dev) in pairs {
        let (a, b) = (shape(nsm, dev), shape(hand, dev));
        eprintln!("shape {dev}: NSM {a:?}");
        if a != b {
            return Err(format!("{dev}: NSM {a:?} but by hand {b:?}").into());
        }
    }
    Ok(())
}

/// One side of a throughput comparison: what it is called in the summary, and the
/// pods `iperf3` runs between.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    /// Its name in the summary, e.g. `NSM Kernel2Kernel`.
    pub name: &'a str,
    /// The pod of `iperf3 -s`.
    pub server: &'a Ns,
    /// The pod of `iperf3 -c`.
    pub client: &'a Ns,
}

impl<'a> Side<'a> {
    /// The side `name` whose `iperf3 -s` runs in `server`, `-c` in `client`.
    pub fn new(name: &'a str, server: &'a Ns, client: &'a Ns) -> Self {
        Side {
            name,
            server,
            client,
        }
    }
}

/// [`throughput_against`] with the target of the Kernel2Kernel and VXLAN benches: NSM
/// >= 95 % of by hand.
pub fn throughput_ab(
    nsm: Side<'_>,
    hand: Side<'_>,
    peer: &str,
    runs: usize,
    seconds: u32,
) -> Res<()> {
    throughput_against(nsm, hand, peer, runs, seconds, 0.95).map(|_| ())
}

/// Alternates `runs` [`iperf`] runs of `seconds` to `peer`, NSM first then by hand
/// (`NSM_BENCH_RUNS` overrides `runs`), printing each run, then the summary: each
/// side's Gbit/s, mean and median, the ratio of means and of medians against
/// `target` (NSM >= `target` times by hand), and each NSM run against the hand-made run
/// right after it (a change of the machine's load between pairs cancels out). Returns
/// the ratio of means.
pub fn throughput_against(
    nsm: Side<'_>,
    hand: Side<'_>,
    peer: &str,
    runs: usize,
    seconds: u32,
    target: f64,
) -> Res<f64> {
    eprintln!("loadavg before: {}", loadavg());
    let runs = std::env::var("NSM_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(runs);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..runs {
        for (label, side, out) in [("NSM:    ", nsm, &mut a), ("by hand:", hand, &mut b)] {
            let g = iperf(side.server, side.client, peer, seconds)?;
            eprintln!(
                "run {} {label} {g:.2} Gbit/s (loadavg {})",
                i + 1,
                loadavg()
            );
            out.push(g);
        }
    }
    let width = nsm.name.len().max(hand.name.len());
    for (side, v) in [(nsm, &a), (hand, &b)] {
        eprintln!(
            "summary throughput: {:<width$} {v:.2?} Gbit/s, mean {:.2}, median {:.2}",
            side.name,
            mean(v),
            median(v)
        );
    }
    let ratio = mean(&a) / mean(&b);
    eprintln!(
        "summary throughput: ratio of means {:.1} %, of medians {:.1} %; target >= {:.0} %: {}",
        ratio * 100.0,
        median(&a) / median(&b) * 100.0,
        target * 100.0,
        if ratio >= target { "met" } else { "NOT met" }
    );
    let pairs: Vec<f64> = a.iter().zip(&b).map(|(a, b)| a / b).collect();
    eprintln!(
        "summary throughput: per pair (NSM run / the hand-made run after it) {:.1?} %, median {:.1} %",
        pairs.iter().map(|r| r * 100.0).collect::<Vec<_>>(),
        median(&pairs) * 100.0
    );
    Ok(ratio)
}

/// The `main` of a throughput bench: prints the machine, skips (saying why) without
/// root, `ip`, `ping` or `iperf3`, then runs `measure` on a two-worker runtime; a
/// failure is printed and the bench exits 1.
pub fn throughput_main(what: &str, measure: impl FnOnce(&Runtime) -> Res<()>) {
    eprintln!("machine: {}", machine());
    if !crate::can_run(what) {
        return;
    }
    if !run("iperf3", &["--version"]).0 {
        eprintln!("skipped: iperf3 is not installed (apt-get install -y iperf3)");
        return;
    }
    let result = runtime("multi_thread_2")
        .map_err(BoxError::from)
        .and_then(|rt| {
            let result = measure(&rt);
            drop(rt);
            result
        });
    if let Err(e) = result {
        eprintln!("ERROR: {e}");
        std::process::exit(1);
    }
}

/// CPU time of this process so far, all threads, user + system (clock ticks of 10 ms).
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Option<u64> { fields.get(i)?.parse::<u64>().ok() };
    Some(Duration::from_millis((tick(11)? + tick(12)?) * 10))
}

/// The machine's load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// `nproc`, `uname -r`, `rustc -V` and the load: printed at the start of each bench.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = run("uname", &["-r"]).1.trim().to_string();
    let rustc = run("rustc", &["-V"]).1.trim().to_string();
    format!(
        "nproc {cpus}, kernel {kernel}, {rustc}, loadavg {}",
        loadavg()
    )
}

/// The client's and the endpoint's address (`a.b.c.d/32`) of a connection.
pub fn addrs(conn: &Connection) -> Res<(String, String)> {
    let ipc = conn
        .context
        .as_ref()
        .and_then(|c| c.ip_context.as_ref())
        .ok_or("the connection has no IP context")?;
    let host = |s: Option<&String>| -> Res<String> {
        let s = s.ok_or("the IP context has no address")?;
        Ok(if s.contains('/') {
            s.clone()
        } else {
            format!("{s}/32")
        })
    };
    Ok((
        host(ipc.src_ip_addrs.first())?,
        host(ipc.dst_ip_addrs.first())?,
    ))
}

/// The address of a CIDR (`a.b.c.d/n` -> `a.b.c.d`).
pub fn ip_of(cidr: &str) -> &str {
    cidr.split('/').next().unwrap_or(cidr)
}

/// Times what passes through it (Request and Close separately), in call order. It
/// keeps every duration until [`Timer::take`]; the rest of the chain's failures pass
/// through untouched (and are timed too).
#[derive(Debug, Clone, Default)]
pub struct Timer {
    /// How long each Request took the rest of the chain.
    pub requests: Arc<Mutex<Vec<Duration>>>,
    /// How long each Close took the rest of the chain.
    pub closes: Arc<Mutex<Vec<Duration>>>,
}

impl Timer {
    /// The Request and Close durations so far; the timer starts empty again.
    pub fn take(&self) -> (Vec<Duration>, Vec<Duration>) {
        let r = std::mem::take(&mut *self.requests.lock().unwrap_or_else(|p| p.into_inner()));
        let c = std::mem::take(&mut *self.closes.lock().unwrap_or_else(|p| p.into_inner()));
        (r, c)
    }
}

#[async_trait]
impl Handler for Timer {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let t = Instant::now();
        let out = next.request(cx, req).await;
        let d = t.elapsed();
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
        out
    }
    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> nsm_sdk::Result<()> {
        let t = Instant::now();
        let out = next.close(cx, conn).await;
        let d = t.elapsed();
        self.closes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::connectioncontext::{ConnectionContext, IpContext};
    use nsm_sdk::Chain;

    #[test]
    fn stats_take_nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = Stats::of(&v);
        assert_eq!(s.n, 100);
        assert_eq!(s.p50, Duration::from_millis(51));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.max, Duration::from_millis(100));
        assert_eq!(s.mean, Duration::from_micros(50_500));
        assert_eq!(Stats::of(&[]).n, 0);
        assert!(s.line().starts_with("n 100, mean 50.500 ms"));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(mean(&[1.0, 2.0]), 1.5);
        assert_eq!((mean(&[]), median(&[])), (0.0, 0.0));
    }

    #[test]
    fn rtts_are_read_from_the_answer_lines() {
        let out = "PING 172.16.0.2 (172.16.0.2) 56(84) bytes of data.\n\
                   64 bytes from 172.16.0.2: icmp_seq=1 ttl=62 time=0.123 ms\n\
                   64 bytes from 172.16.0.2: icmp_seq=2 ttl=62 time=12.5 ms\n\
                   \n--- 172.16.0.2 ping statistics ---\n\
                   rtt min/avg/max/mdev = 0.123/6.3/12.5/6.1 ms\n";
        assert_eq!(
            rtts_of(out),
            [Duration::from_micros(123), Duration::from_micros(12_500)]
        );
        assert!(rtts_of("From 10.0.0.1 icmp_seq=1 Destination Host Unreachable").is_empty());
    }

    #[test]
    fn addrs_read_the_ip_context() {
        let mut conn = Connection::default();
        assert!(addrs(&conn).is_err());
        conn.context = Some(ConnectionContext {
            ip_context: Some(IpContext {
                src_ip_addrs: vec!["10.0.0.1/32".into()],
                dst_ip_addrs: vec!["10.0.0.2".into()],
                ..Default::default()
            }),
            ..Default::default()
        });
        let (c, e) = addrs(&conn).unwrap();
        assert_eq!((c.as_str(), e.as_str()), ("10.0.0.1/32", "10.0.0.2/32"));
        assert_eq!(ip_of(&e), "10.0.0.2");
    }

    #[tokio::test]
    async fn the_timer_records_requests_and_closes() {
        let timer = Timer::default();
        let chain = Chain::builder().push(timer.clone()).build();
        let conn = chain
            .request(&mut cx(), crate::request("svc"))
            .await
            .unwrap();
        chain.close(&mut cx(), conn).await.unwrap();
        let (r, c) = timer.take();
        assert_eq!((r.len(), c.len()), (1, 1));
        assert_eq!(timer.take(), (vec![], vec![]));
    }
}
