//! A full local Request + Close between the example programs, each its own process,
//! over unix sockets; and the gRPC floor under it.
//!
//! The mesh: `nsm-registry`, `nsmgr`, `nsm-forwarder` and `nse-icmp-responder` (NOOP
//! mechanism, point-to-point addresses), started from this package's binaries on unix
//! sockets in a temp dir. The client is a `client` chain in this process (no retry,
//! fresh connection id each time). A Request goes nsc -> nsmgr -> forwarder -> nse (the
//! 4-segment local path), with the registry lookups of `discover_forwarder` (at the
//! registry) and `discover` (through the manager's registry front) on the way; Close
//! goes the same way.
//!
//! Readiness: each server's socket accepts connections, then a Find at the registry
//! shows the forwarder and the endpoint; one checked Request + Close (path, NOOP,
//! addresses) comes before any timing. Every process is stopped at the end (drop
//! guards: SIGTERM, SIGKILL after 2 s; on SIGINT/SIGTERM/SIGHUP a signal thread kills
//! them), and the bench's own child processes exit when the bench is gone.
//!
//! For each runtime configuration (`NSM_BENCH_RUNTIMES`, default `default,1`: every
//! process, this one included, on tokio's default multi-thread runtime, then with
//! `NSM_WORKER_THREADS=1`, a current-thread runtime) and each variant
//! (`NSM_BENCH_VARIANTS`, default all four) it prints on stderr:
//!
//! * `floor ...` (variant `binaries` only): single gRPC round trips between this
//!   process and one other over a unix socket: a Request and a Request + Close to a
//!   server whose chain is empty (this bench run as a child process), a registry Find at
//!   the registry, a Find through the manager's registry front (two processes), and a
//!   Request + Close straight to the endpoint (one hop with its real chain);
//! * `mesh ...`: the whole Request + Close (1,000 after 100 warm-up, fresh connection
//!   id each), the Request and the Close alone: mean / p50 / p99 / max;
//! * `cpu ...`: per operation, each process's CPU time (user + system, from
//!   `/proc/<pid>/stat`, 100 ticks per second, all threads) and context switches
//!   (`cs`, voluntary + involuntary, from `/proc/<pid>/task/*/status`).
//!
//! Variants: `binaries` is the example programs. The others are what-ifs, with the
//! manager and the forwarder replaced by this bench (as child processes) serving the
//! same chains as `chains::nsmgr` / `chains::forwarder`, assembled from the SDK's
//! public handlers: `assembled` as they are (the control: it should match
//! `binaries`), `cache-nsmgr` with a Find cache at the head of the manager's registry
//! chains (its own lookups and the forwarder's lookups through its front are answered
//! by it), `cache-both` with the forwarder's too (no registry call left on the path of
//! a Request). The cache answers a repeated Find from memory; it stands for a cache
//! kept fresh by a watching Find, which the SDK does not have.
//!
//! Settings: `NSM_BENCH_RUNTIMES` (comma-separated: `default` or a number of worker
//! threads), `NSM_BENCH_VARIANTS` (comma-separated: `binaries`, `assembled`,
//! `cache-nsmgr`, `cache-both`), `NSM_BENCH_LOG_LEVEL` (the programs' `NSM_LOG_LEVEL`,
//! default `info`, what they run with when not told), `NSM_BENCH_SAMPLES` (default
//! 1000), `NSM_BENCH_BIN_DIR` (run the programs found there instead of the ones cargo
//! built with this bench: the optimised build of `examples/build-optimized.sh` puts them
//! in `target/optimized/bin`). Target: p50 <= 1 ms.
//!
//! Run: `cargo bench -p nsm-examples --bench mesh_processes`

use std::fs::File;
use std::future::Future;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nsm_examples::{init_logging, parse_worker_threads, registry_client, runtime};
use nsm_sdk::chains::{client, ClientOptions};
use nsm_sdk::handlers::client_url;
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::proto::registry::{NetworkService, NetworkServiceEndpoint};
use nsm_sdk::registry::Registries;
use nsm_sdk::transport::{grpc_client, serve, Channels, Services, Url};
use nsm_sdk::{Chain, Cx};

const SERVICE: &str = "icmp-responder";
const WARM_UP: usize = 100;
const TARGET_P50: Duration = Duration::from_millis(1);
/// How long a program may take to get ready.
const READY: Duration = Duration::from_secs(30);
/// The child roles of this bench (`echo`, `nsmgr`, `forwarder`), the URL they listen
/// on, the URL they talk to, and whether they cache Finds.
const ROLE_ENV: &str = "NSM_BENCH_ROLE";
const LISTEN_ENV: &str = "NSM_BENCH_LISTEN_ON";
const PEER_ENV: &str = "NSM_BENCH_PEER";
const CACHE_ENV: &str = "NSM_BENCH_FIND_CACHE";
/// How long the what-if Find cache keeps an answer: longer than the bench, so every
/// Find after the first is answered from it (what a cache kept fresh by a watch would
/// do).
const CACHE_TTL: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        return child(&role);
    }
    kill_children_on_signal();
    let runtimes = env_or("NSM_BENCH_RUNTIMES", "default,1");
    let variants: Vec<Variant> = match env_or(
        "NSM_BENCH_VARIANTS",
        "binaries,assembled,cache-nsmgr,cache-both",
    )
    .split(',')
    .map(str::trim)
    .filter(|v| !v.is_empty())
    .map(Variant::parse)
    .collect()
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("ERROR NSM_BENCH_VARIANTS: {e}");
            return ExitCode::FAILURE;
        }
    };
    let level = env_or("NSM_BENCH_LOG_LEVEL", "info");
    let samples = env_or("NSM_BENCH_SAMPLES", "1000")
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or(1000);
    eprintln!(
        "mesh_processes: {} CPUs, loadavg {}, log level {level}, {samples} samples",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    eprintln!(
        "mesh_processes: programs from {}",
        program("nsmgr", env!("CARGO_BIN_EXE_nsmgr"))
            .parent()
            .map_or_else(String::new, |d| d.display().to_string())
    );
    let mut ok = true;
    for kind in runtimes.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let threads = match kind {
            "default" => None,
            n => match parse_worker_threads(n) {
                Ok(n) => Some(n),
                Err(e) => {
                    eprintln!("ERROR NSM_BENCH_RUNTIMES: {e}");
                    return ExitCode::FAILURE;
                }
            },
        };
        let name = match threads {
            None => "multi_thread_default".to_string(),
            Some(1) => "current_thread".to_string(),
            Some(n) => format!("multi_thread_{n}"),
        };
        for variant in &variants {
            let name = format!("{name}/{}", variant.name());
            if let Err(e) = bench(&name, *variant, threads, &level, samples) {
                eprintln!("ERROR {name}: {e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Where the example program `name` is: in `NSM_BENCH_BIN_DIR` when set, else the
/// one cargo built (`built`).
fn program(name: &str, built: &str) -> PathBuf {
    match std::env::var_os("NSM_BENCH_BIN_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join(name),
        None => PathBuf::from(built),
    }
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// What serves the manager and the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// The example programs `nsmgr` and `nsm-forwarder`.
    Binaries,
    /// The same chains as `chains::nsmgr` and `chains::forwarder`, assembled in this
    /// bench (run as a child process) from the SDK's public handlers; with a Find cache
    /// at the head of the manager's registry chains and/or the forwarder's. A what-if:
    /// what the mesh would take if the registry lookups were answered locally.
    Assembled {
        nsmgr_cache: bool,
        forwarder_cache: bool,
    },
}

impl Variant {
    fn parse(s: &str) -> Result<Variant, String> {
        let assembled = |nsmgr_cache, forwarder_cache| Variant::Assembled {
            nsmgr_cache,
            forwarder_cache,
        };
        Ok(match s {
            "binaries" => Variant::Binaries,
            "assembled" => assembled(false, false),
            "cache-nsmgr" => assembled(true, false),
            "cache-both" => assembled(true, true),
            _ => {
                return Err(format!(
                    "unknown variant {s:?} (binaries, assembled, cache-nsmgr, cache-both)"
                ))
            }
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Variant::Binaries => "binaries",
            Variant::Assembled {
                nsmgr_cache: false,
                forwarder_cache: false,
            } => "assembled",
            Variant::Assembled {
                nsmgr_cache: true,
                forwarder_cache: false,
            } => "cache-nsmgr",
            Variant::Assembled {
                nsmgr_cache: true,
                forwarder_cache: true,
            } => "cache-both",
            Variant::Assembled { .. } => "cache-forwarder",
        }
    }
}

/// The mesh of one runtime configuration: starts it, times it, stops it.
fn bench(
    name: &str,
    variant: Variant,
    threads: Option<usize>,
    level: &str,
    samples: usize,
) -> Result<(), String> {
    let mut mesh = Mesh::start(name, variant, threads, level)?;
    let rt = runtime(threads).map_err(|e| format!("cannot start tokio: {e}"))?;
    let with_floors = variant == Variant::Binaries;
    let outcome = rt.block_on(measure(name, &mut mesh, samples, with_floors));
    if outcome.is_err() {
        mesh.keep_logs();
    }
    drop(rt);
    drop(mesh);
    outcome
}

/// The running processes of one mesh and where they listen. Dropping it kills them
/// (SIGKILL) and removes the temp dir (unless [`Mesh::keep_logs`]).
struct Mesh {
    dir: PathBuf,
    keep: bool,
    procs: Vec<Proc>,
    registry: Url,
    nsmgr: Url,
    nse: Url,
    echo: Url,
}

struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    /// Stops the process as its users would (SIGTERM: it closes what it holds and
    /// unregisters, and a profiling build writes its profile), then kills it when it
    /// has not exited within two seconds.
    fn drop(&mut self) {
        let asked = nsm_examples::terminate(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(2);
        while asked && Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                _ => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        children().retain(|pid| *pid != self.child.id());
    }
}

/// The pids of the processes this bench started and has not reaped yet.
fn children() -> std::sync::MutexGuard<'static, Vec<u32>> {
    static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

/// A thread that, on SIGINT, SIGTERM or SIGHUP, kills the processes this bench started
/// and removes their temp dirs (drop guards do not run when a signal ends the bench),
/// then exits.
fn kill_children_on_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(rt) = runtime(Some(1)) else {
        return;
    };
    let Ok(signals) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    }) else {
        eprintln!("cannot handle signals: the mesh's processes outlive a killed bench");
        return;
    };
    std::thread::spawn(move || {
        let (mut int, mut term, mut hup) = signals;
        rt.block_on(async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        });
        let pids: Vec<String> = children().iter().map(u32::to_string).collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-KILL").args(&pids).status();
        }
        // The meshes' temp dirs (see `Mesh::start`).
        let ours = format!("nsm-bench-procs-{}-", std::process::id());
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&ours) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        eprintln!("stopped by a signal; killed {} processes", pids.len());
        std::process::exit(130);
    });
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.procs.clear();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Mesh {
    fn start(
        name: &str,
        variant: Variant,
        threads: Option<usize>,
        level: &str,
    ) -> Result<Mesh, String> {
        let dir = std::env::temp_dir().join(format!(
            "nsm-bench-procs-{}-{}",
            std::process::id(),
            name.replace('/', "-")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
        let base = dir.clone();
        let url = |n: &str| -> Url {
            format!("unix://{}/{n}.sock", base.display())
                .parse()
                .expect("a unix URL")
        };
        let mut mesh = Mesh {
            keep: false,
            procs: Vec::new(),
            registry: url("registry"),
            nsmgr: url("nsmgr"),
            nse: url("nse"),
            echo: url("echo"),
            dir,
        };
        let (reg, mgr, nse, echo) = (
            mesh.registry.to_string(),
            mesh.nsmgr.to_string(),
            mesh.nse.to_string(),
            mesh.echo.to_string(),
        );
        let fwd = url("forwarder").to_string();
        let started = Instant::now();
        let spawn = |mesh: &mut Mesh, name: &'static str, exe: &Path, env: &[(&str, &str)]| {
            mesh.spawn(name, exe, threads, level, env)
        };
        spawn(
            &mut mesh,
            "registry",
            &program("nsm-registry", env!("CARGO_BIN_EXE_nsm-registry")),
            &[("NSM_LISTEN_ON", &reg), ("NSM_EXPIRE_AFTER", "1h")],
        )?;
        mesh.wait_listening(mesh.registry.clone())?;
        let this = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
        let flag = |on: bool| if on { "1" } else { "0" };
        match variant {
            Variant::Binaries => {
                spawn(
                    &mut mesh,
                    "nsmgr",
                    &program("nsmgr", env!("CARGO_BIN_EXE_nsmgr")),
                    &[
                        ("NSM_NAME", "nsmgr"),
                        ("NSM_LISTEN_ON", &mgr),
                        ("NSM_REGISTRY_URL", &reg),
                    ],
                )?;
                mesh.wait_listening(mesh.nsmgr.clone())?;
                spawn(
                    &mut mesh,
                    "forwarder",
                    &program("nsm-forwarder", env!("CARGO_BIN_EXE_nsm-forwarder")),
                    &[
                        ("NSM_NAME", "forwarder"),
                        ("NSM_LISTEN_ON", &fwd),
                        ("NSM_CONNECT_TO", &mgr),
                    ],
                )?;
            }
            Variant::Assembled {
                nsmgr_cache,
                forwarder_cache,
            } => {
                spawn(
                    &mut mesh,
                    "nsmgr",
                    &this,
                    &[
                        (ROLE_ENV, "nsmgr"),
                        (LISTEN_ENV, &mgr),
                        (PEER_ENV, &reg),
                        (CACHE_ENV, flag(nsmgr_cache)),
                    ],
                )?;
                mesh.wait_listening(mesh.nsmgr.clone())?;
                spawn(
                    &mut mesh,
                    "forwarder",
                    &this,
                    &[
                        (ROLE_ENV, "forwarder"),
                        (LISTEN_ENV, &fwd),
                        (PEER_ENV, &mgr),
                        (CACHE_ENV, flag(forwarder_cache)),
                    ],
                )?;
            }
        }
        spawn(
            &mut mesh,
            "nse",
            &program(
                "nse-icmp-responder",
                env!("CARGO_BIN_EXE_nse-icmp-responder"),
            ),
            &[
                ("NSM_NAME", "nse"),
                ("NSM_LISTEN_ON", &nse),
                ("NSM_CONNECT_TO", &mgr),
                ("NSM_SERVICE_NAMES", SERVICE),
                ("NSM_CIDR_PREFIX", "172.16.0.0/16"),
            ],
        )?;
        spawn(
            &mut mesh,
            "echo",
            &this,
            &[(ROLE_ENV, "echo"), (LISTEN_ENV, &echo)],
        )?;
        mesh.wait_listening(mesh.echo.clone())?;
        eprintln!(
            "{name}: processes started in {:.0} ms (logs in {})",
            ms(started.elapsed()),
            mesh.dir.display()
        );
        Ok(mesh)
    }

    /// Starts `exe` with only the given `NSM_*` settings (and the log level and worker
    /// threads); its stderr goes to `<name>.log`.
    fn spawn(
        &mut self,
        name: &'static str,
        exe: &Path,
        threads: Option<usize>,
        level: &str,
        env: &[(&str, &str)],
    ) -> Result<(), String> {
        let log = self.dir.join(format!("{name}.log"));
        let mut cmd = Command::new(exe);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("NSM_")) {
            cmd.env_remove(k);
        }
        cmd.env_remove("TOKIO_WORKER_THREADS");
        if let Some(n) = threads {
            cmd.env("NSM_WORKER_THREADS", n.to_string());
        }
        cmd.env("NSM_LOG_LEVEL", level)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        children().push(child.id());
        self.procs.push(Proc { name, child });
        Ok(())
    }

    /// Waits until something accepts connections at `url` (a unix socket), failing
    /// early when a process has exited.
    fn wait_listening(&mut self, url: Url) -> Result<(), String> {
        let Url::Unix(path) = &url else {
            return Err(format!("{url} is not a unix socket"));
        };
        let until = Instant::now() + READY;
        loop {
            if UnixStream::connect(path).is_ok() {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > until {
                return Err(format!("nothing listens at {url} after {READY:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn check_alive(&mut self) -> Result<(), String> {
        for p in &mut self.procs {
            if let Ok(Some(status)) = p.child.try_wait() {
                self.keep = true;
                return Err(format!(
                    "{} exited ({status}); its log: {}",
                    p.name,
                    self.dir.join(format!("{}.log", p.name)).display()
                ));
            }
        }
        Ok(())
    }

    fn keep_logs(&mut self) {
        self.keep = true;
        eprintln!("logs kept in {}", self.dir.display());
    }

    /// (name, pid) of each process of the mesh, and this one as `bench`.
    fn pids(&self) -> Vec<(&'static str, u32)> {
        let mut pids: Vec<_> = self.procs.iter().map(|p| (p.name, p.child.id())).collect();
        pids.push(("bench", std::process::id()));
        pids
    }
}

fn cx() -> Cx {
    Cx::client().with_timeout(Duration::from_secs(10))
}

fn request() -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            network_service: SERVICE.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Polls a Find at the registry until the forwarder and the endpoint are registered.
async fn wait_registered(mesh: &mut Mesh, registry: &Registries) -> Result<(), String> {
    let until = Instant::now() + READY;
    loop {
        let mut found = Vec::new();
        for name in ["forwarder", "nse"] {
            let template = NetworkServiceEndpoint {
                name: name.to_string(),
                ..Default::default()
            };
            if let Ok(list) = registry.nse.list(&mut cx(), template).await {
                found.extend(list.into_iter().filter(|e| e.name == name));
            }
        }
        if found.len() == 2 {
            return Ok(());
        }
        mesh.check_alive()?;
        if Instant::now() > until {
            return Err(format!(
                "the forwarder and the endpoint are not registered after {READY:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn measure(
    name: &str,
    mesh: &mut Mesh,
    samples: usize,
    with_floors: bool,
) -> Result<(), String> {
    let channels = Channels::new();
    let at_registry = registry_client(&channels, &mesh.registry);
    let at_nsmgr = registry_client(&channels, &mesh.nsmgr);
    wait_registered(mesh, &at_registry).await?;

    let nsc = client(
        ClientOptions::new("nsc", mesh.nsmgr.clone())
            .channels(channels.clone())
            .retry(None),
    );
    let to_nse = client(
        ClientOptions::new("nsc", mesh.nse.clone())
            .channels(channels.clone())
            .retry(None),
    );
    let to_echo = Chain::builder()
        .push(client_url(mesh.echo.clone()))
        .push(grpc_client(channels.clone()))
        .build();
    check(&nsc).await.map_err(|e| format!("{name}: {e}"))?;

    let pids = mesh.pids();
    let threads: Vec<String> = pids
        .iter()
        .map(|(n, pid)| format!("{n} {}", thread_count(*pid).unwrap_or(0)))
        .collect();
    eprintln!("{name}: threads per process: {}", threads.join(", "));
    if with_floors {
        let at = (&to_echo, &to_nse, &at_registry, &at_nsmgr);
        floors(name, &pids, samples, at).await?;
    }

    eprintln!("{name}: loadavg before the mesh: {}", loadavg());
    for _ in 0..WARM_UP {
        request_close(&nsc).await?;
    }
    let cpu0 = cpu_all(&pids);
    let (mut both, mut requests, mut closes) = (Samples::new(), Samples::new(), Samples::new());
    let wall = Instant::now();
    for _ in 0..samples {
        let t = Instant::now();
        let conn = nsc.request(&mut cx(), request()).await.map_err(err)?;
        let r = t.elapsed();
        nsc.close(&mut cx(), conn).await.map_err(err)?;
        let rc = t.elapsed();
        both.0.push(rc);
        requests.0.push(r);
        closes.0.push(rc - r);
    }
    let wall = wall.elapsed();
    let cpu = Cpu::between(&pids, &cpu0, &cpu_all(&pids), samples);
    let p50 = both.p50();
    let verdict = if p50 <= TARGET_P50 { "met" } else { "NOT met" };
    eprintln!(
        "mesh {name}: Request+Close: {}; target p50 <= 1 ms: {verdict}",
        both.summary()
    );
    if p50 > TARGET_P50 && std::env::var_os("NSM_BENCH_BIN_DIR").is_none() {
        eprintln!(
            "mesh {name}: these programs are cargo's build; the target is met by the \
             optimised build of them (PGO + BOLT): examples/build-optimized.sh --bench"
        );
    }
    eprintln!("mesh {name}: Request alone: {}", requests.summary());
    eprintln!("mesh {name}: Close alone: {}", closes.summary());
    eprintln!(
        "cpu {name}: per Request+Close: {cpu}; wall {:.0} us each",
        us(wall) / samples as f64
    );
    eprintln!("{name}: loadavg after: {}", loadavg());
    Ok(())
}

/// Durations of one timing loop.
struct Samples(Vec<Duration>);

impl Samples {
    fn new() -> Self {
        Samples(Vec::new())
    }

    fn p50(&mut self) -> Duration {
        self.0.sort();
        self.0[self.0.len() / 2]
    }

    /// `n N, mean / p50 / p99 / max in us`.
    fn summary(&mut self) -> String {
        let v = &mut self.0;
        v.sort();
        let n = v.len();
        let mean = v.iter().sum::<Duration>() / n as u32;
        format!(
            "n {n}, mean {:.0} us, p50 {:.0} us, p99 {:.0} us, max {:.0} us",
            us(mean),
            us(v[n / 2]),
            us(v[(n * 99).div_ceil(100) - 1]),
            us(v[n - 1])
        )
    }
}

/// The single round trips under the mesh (see the module docs).
async fn floors(
    name: &str,
    pids: &[(&'static str, u32)],
    samples: usize,
    (to_echo, to_nse, at_registry, at_nsmgr): (&Chain, &Chain, &Registries, &Registries),
) -> Result<(), String> {
    eprintln!("{name}: loadavg before the floors: {}", loadavg());
    let floors: [(&str, Timed); 6] = [
        (
            "Request to an empty chain (1 process hop)",
            time(samples, pids, || async {
                to_echo.request(&mut cx(), request()).await?;
                Ok(())
            })
            .await?,
        ),
        (
            "Request + Close to an empty chain (1 process hop each)",
            time(samples, pids, || async {
                let c = to_echo.request(&mut cx(), request()).await?;
                to_echo.close(&mut cx(), c).await
            })
            .await?,
        ),
        (
            "Find an endpoint by name at the registry (1 process hop)",
            time(samples, pids, || find_nse(at_registry, "nse")).await?,
        ),
        (
            "Find a network service by name at the registry (1 process hop)",
            time(samples, pids, || find_ns(at_registry, SERVICE)).await?,
        ),
        (
            "Find an endpoint by name through the nsmgr's front (2 process hops)",
            time(samples, pids, || find_nse(at_nsmgr, "nse")).await?,
        ),
        (
            "Request + Close straight to the endpoint (client chain, 1 hop each)",
            time(samples, pids, || async {
                let c = to_nse.request(&mut cx(), request()).await?;
                to_nse.close(&mut cx(), c).await
            })
            .await?,
        ),
    ];
    for (what, mut t) in floors {
        eprintln!("floor {name}: {what}: {}", t.samples.summary());
        eprintln!("floor {name}: {what}: CPU per call: {}", t.cpu);
    }

    Ok(())
}

/// A timing loop's durations and the CPU time its processes spent per call.
struct Timed {
    samples: Samples,
    cpu: Cpu,
}

/// Times `samples` calls of `op` after [`WARM_UP`] untimed ones, and the CPU time of
/// the processes `pids` over the timed calls.
async fn time<F, Fut>(samples: usize, pids: &[(&str, u32)], mut op: F) -> Result<Timed, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = nsm_sdk::Result<()>>,
{
    for _ in 0..WARM_UP {
        op().await.map_err(err)?;
    }
    let mut out = Vec::with_capacity(samples);
    let before = cpu_all(pids);
    for _ in 0..samples {
        let t = Instant::now();
        op().await.map_err(err)?;
        out.push(t.elapsed());
    }
    Ok(Timed {
        samples: Samples(out),
        cpu: Cpu::between(pids, &before, &cpu_all(pids), samples),
    })
}

/// What a process used so far: CPU ticks (user, system; 100 per second) and context
/// switches of all its threads (voluntary: it waited; involuntary: it was preempted).
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    user: u64,
    sys: u64,
    voluntary: u64,
    preempted: u64,
}

/// Per operation, for each process: (name, user us, system us, context switches).
struct Cpu(Vec<(String, f64, f64, f64)>);

impl Cpu {
    fn between(
        pids: &[(&str, u32)],
        before: &[Option<Usage>],
        after: &[Option<Usage>],
        ops: usize,
    ) -> Cpu {
        let per_op = |n: u64| n as f64 / ops as f64;
        let each = pids
            .iter()
            .zip(before.iter().zip(after))
            .filter_map(|((name, _), t)| match t {
                (Some(b), Some(a)) => Some((
                    name.to_string(),
                    per_op(a.user - b.user) * 10_000.0,
                    per_op(a.sys - b.sys) * 10_000.0,
                    per_op((a.voluntary + a.preempted).saturating_sub(b.voluntary + b.preempted)),
                )),
                _ => None,
            })
            .collect();
        Cpu(each)
    }
}

impl std::fmt::Display for Cpu {
    /// `registry 300+10 us 4.1 cs, ..., all 2100+500 = 2600 us 30.2 cs`: user + system
    /// CPU time and context switches, leaving out the processes that did nothing.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (mut user, mut sys, mut switches) = (0.0, 0.0, 0.0);
        for (name, u, s, cs) in &self.0 {
            user += u;
            sys += s;
            switches += cs;
            if u + s > 0.0 || *cs >= 0.5 {
                write!(f, "{name} {u:.0}+{s:.0} us {cs:.1} cs, ")?;
            }
        }
        write!(
            f,
            "all {user:.0}+{sys:.0} = {:.0} us {switches:.1} cs",
            user + sys
        )
    }
}

fn cpu_all(pids: &[(&str, u32)]) -> Vec<Option<Usage>> {
    pids.iter().map(|(_, pid)| usage(*pid)).collect()
}

async fn find_nse(registries: &Registries, name: &str) -> nsm_sdk::Result<()> {
    let template = NetworkServiceEndpoint {
        name: name.to_string(),
        ..Default::default()
    };
    let found = registries.nse.list(&mut cx(), template).await?;
    if found.iter().any(|e| e.name == name) {
        Ok(())
    } else {
        Err(nsm_sdk::Error::not_found(format!("endpoint {name}")))
    }
}

async fn find_ns(registries: &Registries, name: &str) -> nsm_sdk::Result<()> {
    let template = NetworkService {
        name: name.to_string(),
        ..Default::default()
    };
    let found = registries.ns.list(&mut cx(), template).await?;
    if found.iter().any(|s| s.name == name) {
        Ok(())
    } else {
        Err(nsm_sdk::Error::not_found(format!("network service {name}")))
    }
}

async fn request_close(client: &Chain) -> Result<Connection, String> {
    let conn = client.request(&mut cx(), request()).await.map_err(err)?;
    client.close(&mut cx(), conn.clone()).await.map_err(err)?;
    Ok(conn)
}

/// One Request + Close through the mesh, checked: the 4-segment path, NOOP, a
/// point-to-point pair of addresses.
async fn check(nsc: &Chain) -> Result<(), String> {
    let conn = request_close(nsc).await?;
    let names: Vec<_> = conn
        .path
        .as_ref()
        .map(|p| p.path_segments.iter().map(|s| s.name.as_str()).collect())
        .unwrap_or_default();
    let mechanism = conn.mechanism.as_ref().map(|m| m.r#type.as_str());
    let ip = conn
        .context
        .as_ref()
        .and_then(|c| c.ip_context.as_ref())
        .map(|ip| (ip.src_ip_addrs.clone(), ip.dst_ip_addrs.clone()));
    eprintln!("check: path {names:?}, mechanism {mechanism:?}, addresses {ip:?}");
    let addressed = ip.is_some_and(|(src, dst)| src.len() == 1 && dst.len() == 1);
    if names != ["nsc", "nsmgr", "forwarder", "nse"] || mechanism != Some("NOOP") || !addressed {
        return Err(format!("unexpected connection: {conn:?}"));
    }
    Ok(())
}

fn err(e: nsm_sdk::Error) -> String {
    format!("{e} ({e:?})")
}

/// Runs this bench as one of its child processes, until killed: `echo` serves a
/// NetworkService whose chain is empty (a Request answers with its connection, a Close
/// succeeds); `nsmgr` and `forwarder` serve the chains of the SDK's `nsmgr` and
/// `forwarder`, assembled here, with a Find cache when `NSM_BENCH_FIND_CACHE=1`.
fn child(role: &str) -> ExitCode {
    let threads = std::env::var("NSM_WORKER_THREADS")
        .ok()
        .and_then(|n| parse_worker_threads(&n).ok());
    let level = std::env::var("NSM_LOG_LEVEL").ok();
    if let Err(e) = init_logging(level.as_deref()) {
        eprintln!("{role}: {e}");
        return ExitCode::FAILURE;
    }
    let url = |key: &str| std::env::var(key).ok().and_then(|u| u.parse::<Url>().ok());
    let cache = std::env::var(CACHE_ENV).is_ok_and(|v| v == "1");
    let (Some(listen_on), Ok(rt)) = (url(LISTEN_ENV), runtime(threads)) else {
        eprintln!("{role}: no {LISTEN_ENV} URL or no runtime");
        return ExitCode::FAILURE;
    };
    let peer = url(PEER_ENV);
    // Never outlive the bench (killed, it cannot kill its children).
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(1);
        }
    });
    let served: Result<(), String> = rt.block_on(async {
        let services = match (role, peer) {
            ("echo", _) => Services::new().network_service(Chain::builder().build()),
            ("nsmgr", Some(registry)) => assembled::nsmgr(&listen_on, registry, cache),
            ("forwarder", Some(nsmgr)) => {
                let (services, entry) = assembled::forwarder(&listen_on, nsmgr.clone(), cache);
                let _server = serve(&listen_on, services).await.map_err(err)?;
                assembled::register(&nsmgr, entry).await?;
                return std::future::pending().await;
            }
            _ => return Err(format!("unknown role {role:?} or no {PEER_ENV}")),
        };
        let _server = serve(&listen_on, services).await.map_err(err)?;
        std::future::pending().await
    });
    eprintln!("{role}: {served:?}");
    ExitCode::FAILURE
}

/// The what-if: the manager's and the forwarder's chains as `chains::nsmgr` and
/// `chains::forwarder` build them, optionally with a [`FindCache`] at the head of their
/// registry chains.
mod assembled {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use futures::stream::{self, StreamExt};
    use nsm_sdk::chains::{forwarder as sdk_forwarder, ForwarderOptions};
    use nsm_sdk::core::rt::begin;
    use nsm_sdk::core::MonitorSource;
    use nsm_sdk::handlers::{
        connect, discover, discover_forwarder, mechanism_translation, mechanisms, noop_client,
        noop_server, round_robin, update_path, Monitor,
    };
    use nsm_sdk::proto::registry::{NetworkService, NetworkServiceEndpoint};
    use nsm_sdk::registry::{
        local_bypass, validate, FindStream, Found, Query, Registries, RegistryChain,
        RegistryHandler, RegistryNext, Resource,
    };
    use nsm_sdk::transport::{grpc_client, grpc_registry, Channels, Services, Url};
    use nsm_sdk::wire::types;
    use nsm_sdk::{Chain, Cx};
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    use super::{cx, CACHE_TTL, READY};

    /// Answers a Find (not a watch) from the answer to the same query within
    /// [`CACHE_TTL`]; a Register or Unregister empties the cache. Bench only: a real
    /// cache would be kept fresh by a watching Find.
    pub(super) struct FindCache<R> {
        answers: Mutex<Answers<R>>,
    }

    /// Query (its `Debug` text) -> when it was answered, and the answer.
    type Answers<R> = HashMap<String, (Instant, Vec<Found<R>>)>;

    fn cache<R: Resource>() -> FindCache<R> {
        FindCache {
            answers: Mutex::new(HashMap::new()),
        }
    }

    impl<R: Resource> FindCache<R> {
        fn clear(&self) {
            self.answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
    }

    #[async_trait::async_trait]
    impl<R: Resource> RegistryHandler<R> for FindCache<R> {
        async fn register(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> nsm_sdk::Result<R> {
            self.clear();
            next.register(cx, r).await
        }

        async fn find(
            &self,
            cx: &mut Cx,
            query: Query<R>,
            next: RegistryNext<R>,
        ) -> nsm_sdk::Result<FindStream<R>> {
            if query.watch {
                return next.find(cx, query).await;
            }
            let key = format!("{:?}", query.template);
            let hit = {
                let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
                answers
                    .get(&key)
                    .filter(|(at, _)| at.elapsed() < CACHE_TTL)
                    .map(|(_, found)| found.clone())
            };
            let found = match hit {
                Some(found) => found,
                None => {
                    let mut items = next.find(cx, query).await?;
                    let mut found = Vec::new();
                    while let Some(item) = items.next().await {
                        found.push(item?);
                    }
                    let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
                    answers.insert(key, (Instant::now(), found.clone()));
                    found
                }
            };
            Ok(stream::iter(found.into_iter().map(Ok)).boxed())
        }

        async fn unregister(
            &self,
            cx: &mut Cx,
            r: R,
            next: RegistryNext<R>,
        ) -> nsm_sdk::Result<()> {
            self.clear();
            next.unregister(cx, r).await
        }
    }

    /// `chains::nsmgr` (same handlers, same order), the cache first in its registries.
    pub(super) fn nsmgr(own_url: &Url, registry_url: Url, with_cache: bool) -> Services {
        let channels = Channels::new();
        let root = CancellationToken::new();
        let mut ns = RegistryChain::<NetworkService>::builder();
        let mut nse = RegistryChain::<NetworkServiceEndpoint>::builder();
        if with_cache {
            ns = ns.push(cache());
            nse = nse.push(cache());
        }
        let registries = Registries {
            ns: ns
                .push(validate())
                .push(grpc_registry(channels.clone(), registry_url.clone()))
                .build(),
            nse: nse
                .push(validate())
                .push(local_bypass(own_url.clone()))
                .push(grpc_registry(channels.clone(), registry_url))
                .build(),
        };
        let monitor = Monitor::builder().shutdown(root.clone()).build();
        let client = Chain::builder()
            .push(begin().root(root.clone()))
            .push(grpc_client(channels))
            .build();
        let chain = Chain::builder()
            .push(update_path("nsmgr"))
            .push(begin().root(root))
            .push(monitor.clone())
            .push(discover_forwarder(registries.clone(), own_url.clone()))
            .push(connect(client))
            .build();
        let source: Arc<dyn MonitorSource> = monitor.source();
        Services::new()
            .network_service(chain)
            .monitor(source)
            .ns_registry(registries.ns)
            .nse_registry(registries.nse)
    }

    /// `chains::forwarder` with its defaults (NOOP both sides), the cache first in its
    /// registries; and its registration.
    pub(super) fn forwarder(
        own_url: &Url,
        nsmgr_url: Url,
        with_cache: bool,
    ) -> (Services, NetworkServiceEndpoint) {
        let channels = Channels::new();
        let root = CancellationToken::new();
        let mut ns = RegistryChain::<NetworkService>::builder();
        let mut nse = RegistryChain::<NetworkServiceEndpoint>::builder();
        if with_cache {
            ns = ns.push(cache());
            nse = nse.push(cache());
        }
        let registries = Registries {
            ns: ns
                .push(grpc_registry(channels.clone(), nsmgr_url.clone()))
                .build(),
            nse: nse
                .push(grpc_registry(channels.clone(), nsmgr_url.clone()))
                .build(),
        };
        let monitor = Monitor::builder().shutdown(root.clone()).build();
        let client = Chain::builder()
            .push(begin().root(root.clone()))
            .push(mechanism_translation())
            .push(noop_client())
            .push(grpc_client(channels))
            .build();
        let chain = Chain::builder()
            .push(update_path("forwarder"))
            .push(begin().root(root))
            .push(monitor.clone())
            .push(mechanisms().with(types::NOOP, noop_server()))
            .push(discover(registries))
            .push(round_robin())
            .push(connect(client))
            .build();
        let source: Arc<dyn MonitorSource> = monitor.source();
        let services = Services::new().network_service(chain).monitor(source);
        // The SDK's own forwarder knows its registration entry.
        let entry =
            sdk_forwarder(ForwarderOptions::new("forwarder", nsmgr_url)).registration(own_url);
        (services, entry)
    }

    /// Registers `entry` through the manager at `nsmgr_url`, trying again until it is
    /// up.
    pub(super) async fn register(
        nsmgr_url: &Url,
        entry: NetworkServiceEndpoint,
    ) -> Result<(), String> {
        let registries = super::registry_client(&Channels::new(), nsmgr_url);
        let until = Instant::now() + READY;
        loop {
            match registries.nse.register(&mut cx(), entry.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > until => return Err(super::err(e)),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }
}

/// What process `pid` used so far: user and system CPU time of all its threads
/// (`/proc/<pid>/stat`) and the context switches of each thread
/// (`/proc/<pid>/task/*/status`).
fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (in parentheses): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let mut u = Usage {
        user: fields.get(11)?.parse().ok()?,
        sys: fields.get(12)?.parse().ok()?,
        ..Usage::default()
    };
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            let count = |key: &str| {
                line.strip_prefix(key)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let Some(n) = count("voluntary_ctxt_switches:") {
                u.voluntary += n;
            } else if let Some(n) = count("nonvoluntary_ctxt_switches:") {
                u.preempted += n;
            }
        }
    }
    Some(u)
}

/// How many threads process `pid` has (`/proc/<pid>/status`).
fn thread_count(pid: u32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// The machine's load average: the machine may be shared.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1_000.0
}

fn ms(d: Duration) -> f64 {
    us(d) / 1_000.0
}
