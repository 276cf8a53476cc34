//! Process metrics: a tiny Prometheus text endpoint (`NSM_METRICS_LISTEN_ON`) that the
//! programs serve when asked, and the scraper the load tool reads it with.
//!
//! What it exposes, read at each scrape (gauges unless said):
//!
//! | metric | from |
//! |---|---|
//! | `process_resident_memory_bytes` | `VmRSS` of `/proc/self/status` |
//! | `process_open_fds` | the entries of `/proc/self/fd` |
//! | `process_threads` | `Threads` of `/proc/self/status` |
//! | `process_cpu_seconds_total` (counter) | user + system time of `/proc/self/stat` |
//! | `nsm_live_tasks` | [`nsm_sdk::core::live_tasks`]: the SDK's owned tasks (timers, monitors, watches) |
//! | `nsm_live_connections` | [`nsm_sdk::core::live_handles`]: connection handles held (one per connection and `begin`) |
//! | `tokio_alive_tasks` | the tokio runtime's alive tasks (the endpoint's own task included) |
//!
//! The server is a minimal HTTP/1.1 responder on tokio, not a crate: it answers
//! `GET /metrics` (and `GET /`) with the text format 0.0.4 and closes the connection;
//! anything else gets 404 or 405. A scrape is served by the accept task itself, one
//! at a time with a 2 s limit, so the endpoint never adds tasks of its own that would
//! show in the numbers it reports, and a client that sends nothing cannot hold it
//! longer than that. State: the listener, and the task serving it, owned by
//! [`MetricsServer`] (dropping it stops the task). Failures handled: a request that is
//! malformed, too large (8 KiB) or too slow gets an error status or is dropped; a
//! `/proc` file that cannot be read leaves its metric out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nsm_sdk::transport::Url;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::process::Failure;

/// How long the scraper waits for an answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the endpoint gives one client to send its request and take the answer
/// (shorter than [`SCRAPE_TIMEOUT`]: a scraper queued behind a client that sends
/// nothing is still served in time).
const SERVE_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest request head the endpoint reads.
const MAX_REQUEST: usize = 8 * 1024;
/// The largest answer the scraper reads.
const MAX_ANSWER: usize = 1024 * 1024;
/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// The metrics option of a program: put it in its arguments with `#[command(flatten)]`
/// and call [`MetricsArgs::serve`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Serve process metrics (RSS, open fds, threads, CPU, tasks) in the Prometheus
    /// text format at GET /metrics on this address: tcp://host:port, unix:///path,
    /// http://host:port or an absolute path (a unix socket). Off without it.
    #[arg(long, env = "NSM_METRICS_LISTEN_ON", value_name = "URL", value_parser = parse_metrics_url)]
    pub metrics_listen_on: Option<Url>,
}

impl MetricsArgs {
    /// Starts the endpoint when an address was given; keep the server for as long as it
    /// should serve.
    pub async fn serve(&self) -> Result<Option<MetricsServer>, Failure> {
        match &self.metrics_listen_on {
            Some(url) => serve_metrics(url).await.map(Some),
            None => Ok(None),
        }
    }
}

/// Parses a metrics address: `tcp://host:port`, `unix:///path`, `http://host:port`
/// (an optional `/metrics` path is ignored) or an absolute path (a unix socket).
pub fn parse_metrics_url(s: &str) -> Result<Url, String> {
    let s = s.trim();
    let url = if let Some(rest) = s.strip_prefix("http://") {
        let hostport = rest.split_once('/').map_or(rest, |(hp, _)| hp);
        format!("tcp://{hostport}").parse::<Url>()
    } else if s.starts_with('/') {
        Ok(Url::Unix(PathBuf::from(s)))
    } else {
        s.parse::<Url>()
    }
    .map_err(|e| e.to_string())?;
    match url {
        Url::Memory(_) => Err(format!(
            "bad metrics address {s:?}: expected tcp://host:port, unix:///path or http://host:port"
        )),
        url => Ok(url),
    }
}

/// A running metrics endpoint. Dropping it stops it (a unix socket file is removed).
#[derive(Debug)]
#[must_use = "the endpoint stops when dropped"]
pub struct MetricsServer {
    url: Url,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    socket: Option<PathBuf>,
}

impl MetricsServer {
    /// Where it listens (with the port picked when the address said port 0).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Stops serving and waits for the serving task to end.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Serves this process's metrics at `url` (tcp or unix) until the returned server is
/// dropped or shut down.
pub async fn serve_metrics(url: &Url) -> Result<MetricsServer, Failure> {
    let fail =
        |e: &dyn std::fmt::Display| Failure::runtime(format!("cannot serve metrics on {url}: {e}"));
    let (listener, actual, socket) = match url {
        Url::Tcp { host, port } => {
            let l = TcpListener::bind((host.as_str(), *port))
                .await
                .map_err(|e| fail(&e))?;
            let port = l.local_addr().map_err(|e| fail(&e))?.port();
            let actual = Url::Tcp {
                host: host.clone(),
                port,
            };
            (Listener::Tcp(l), actual, None)
        }
        Url::Unix(path) => {
            remove_stale_socket(path).map_err(|e| fail(&e))?;
            let l = UnixListener::bind(path).map_err(|e| fail(&e))?;
            (Listener::Unix(l), url.clone(), Some(path.clone()))
        }
        Url::Memory(_) => return Err(Failure::config("metrics need a tcp or unix address")),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(accept_loop(listener, stop.clone()));
    info!(url = %actual, "serving metrics");
    Ok(MetricsServer {
        url: actual,
        stop,
        task: Some(task),
        socket,
    })
}

/// Removes a socket file left by an earlier run; refuses to remove anything else.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

async fn accept_loop(listener: Listener, stop: CancellationToken) {
    loop {
        let served = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = accept(&listener) => accepted,
        };
        if let Err(e) = served {
            debug!(error = %e, "metrics: a scrape failed");
            // An accept error (out of fds): do not spin.
            if e.kind() != io::ErrorKind::TimedOut {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        }
    }
}

/// Accepts one connection and answers it, within [`SERVE_TIMEOUT`].
async fn accept(listener: &Listener) -> io::Result<()> {
    match listener {
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            within(SERVE_TIMEOUT, answer(s)).await
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            within(SERVE_TIMEOUT, answer(s)).await
        }
    }
}

async fn within<T>(
    limit: Duration,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "too slow")))
}

/// Reads one request head and writes the answer.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST {
            return respond(&mut s, "431 Request Header Fields Too Large", "").await;
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics" | "/") => respond(&mut s, "200 OK", &render(&sample())).await,
        ("GET", _) => respond(&mut s, "404 Not Found", "").await,
        _ => respond(&mut s, "405 Method Not Allowed", "").await,
    }
}

async fn respond<S: AsyncWrite + Unpin>(s: &mut S, status: &str, body: &str) -> io::Result<()> {
    let out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(out.as_bytes()).await?;
    s.shutdown().await
}

/// What a scrape reports about this process; a field is `None` when its source could
/// not be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessSample {
    /// Resident memory, bytes.
    pub resident_memory_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// OS threads.
    pub threads: Option<u64>,
    /// User + system CPU time so far, seconds.
    pub cpu_seconds: Option<f64>,
    /// The SDK's owned tasks alive ([`nsm_sdk::core::live_tasks`]).
    pub nsm_live_tasks: u64,
    /// Connection handles alive ([`nsm_sdk::core::live_handles`]).
    pub nsm_live_connections: u64,
    /// Alive tasks of the current tokio runtime (`None` outside a runtime).
    pub tokio_alive_tasks: Option<u64>,
}

/// Reads this process's numbers now.
pub fn sample() -> ProcessSample {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    ProcessSample {
        resident_memory_bytes: field("VmRSS:").map(|kb| kb * 1024),
        // Less the directory handle the count itself holds open.
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| (d.count() as u64).saturating_sub(1)),
        threads: field("Threads:"),
        cpu_seconds: cpu_seconds(),
        nsm_live_tasks: nsm_sdk::core::live_tasks() as u64,
        nsm_live_connections: nsm_sdk::core::live_handles() as u64,
        tokio_alive_tasks: tokio::runtime::Handle::try_current()
            .ok()
            .map(|h| h.metrics().num_alive_tasks() as u64),
    }
}

/// User + system time of this process (fields 14 and 15 of `/proc/self/stat`).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let after = stat.rsplit_once(')')?.1;
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The Prometheus text (format 0.0.4) of `s`.
pub fn render(s: &ProcessSample) -> String {
    let mut out = String::with_capacity(1024);
    let mut metric = |name: &str, kind: &str, help: &str, value: Option<String>| {
        if let Some(v) = value {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        }
    };
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        s.resident_memory_bytes.map(|v| v.to_string()),
    );
    metric(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        s.open_fds.map(|v| v.to_string()),
    );
    metric(
        "process_threads",
        "gauge",
        "Number of OS threads.",
        s.threads.map(|v| v.to_string()),
    );
    metric(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        s.cpu_seconds.map(|v| format!("{v:.2}")),
    );
    metric(
        "nsm_live_tasks",
        "gauge",
        "Tasks the NSM SDK owns (timers, monitors, watches of connections).",
        Some(s.nsm_live_tasks.to_string()),
    );
    metric(
        "nsm_live_connections",
        "gauge",
        "Connection handles the NSM SDK holds (one per connection and begin).",
        Some(s.nsm_live_connections.to_string()),
    );
    metric(
        "tokio_alive_tasks",
        "gauge",
        "Alive tasks of the tokio runtime.",
        s.tokio_alive_tasks.map(|v| v.to_string()),
    );
    out
}

/// Parses the Prometheus text format into `name -> value` (labels, if any, stay part
/// of the name; comments and malformed lines are skipped).
pub fn parse_text(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            // `name{labels} value [timestamp]`: the value follows the name (and labels).
            let name_end = match l.find('{') {
                Some(open) => open + l[open..].find('}')? + 1,
                None => l.find(char::is_whitespace)?,
            };
            let (name, rest) = l.split_at(name_end);
            let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((name.to_string(), value))
        })
        .collect()
}

/// Scrapes the metrics endpoint at `url` (tcp or unix): `GET /metrics`, within
/// [`SCRAPE_TIMEOUT`].
pub async fn scrape(url: &Url) -> Result<BTreeMap<String, f64>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("scraping {url}: {e}");
    let body = match url {
        Url::Tcp { host, port } => {
            within(SCRAPE_TIMEOUT, async {
                get(TcpStream::connect((host.as_str(), *port)).await?, host).await
            })
            .await
        }
        Url::Unix(path) => {
            within(SCRAPE_TIMEOUT, async {
                get(UnixStream::connect(path).await?, "localhost").await
            })
            .await
        }
        Url::Memory(_) => return Err(fail(&"not a tcp or unix address")),
    }
    .map_err(|e| fail(&e))?;
    Ok(parse_text(&body))
}

/// Sends `GET /metrics` on `s` and returns the body of a 200 answer.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, host: &str) -> io::Result<String> {
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    (&mut s)
        .take(MAX_ANSWER as u64)
        .read_to_end(&mut answer)
        .await?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("answer {status:?}"),
        ));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_reads_this_process() {
        let s = sample();
        let rss = s.resident_memory_bytes.expect("VmRSS");
        assert!(rss > 1024 * 1024, "{rss}");
        let fds = s.open_fds.expect("fds");
        // Opening a file shows.
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(sample().open_fds, Some(fds + 1));
        drop(f);
        assert!(s.threads.expect("threads") >= 1);
        assert!(s.cpu_seconds.is_some());
        assert_eq!(s.tokio_alive_tasks, None, "no runtime here");
    }

    #[test]
    fn the_text_format_round_trips() {
        let s = ProcessSample {
            resident_memory_bytes: Some(12_345_678),
            open_fds: Some(17),
            threads: None,
            cpu_seconds: Some(1.5),
            nsm_live_tasks: 3,
            nsm_live_connections: 4,
            tokio_alive_tasks: Some(9),
        };
        let text = render(&s);
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
        assert!(
            !text.contains("process_threads"),
            "unknown values are left out"
        );
        let m = parse_text(&text);
        assert_eq!(m["process_resident_memory_bytes"], 12_345_678.0);
        assert_eq!(m["process_open_fds"], 17.0);
        assert_eq!(m["process_cpu_seconds_total"], 1.5);
        assert_eq!(m["nsm_live_tasks"], 3.0);
        assert_eq!(m["nsm_live_connections"], 4.0);
        assert_eq!(m["tokio_alive_tasks"], 9.0);
        assert_eq!(m.len(), 6);
        let other = parse_text("a{x=\"1 2\"} 3 1700000000\nbad\n# c 1\nb 2.5e3\n");
        assert_eq!(other["a{x=\"1 2\"}"], 3.0);
        assert_eq!(other["b"], 2500.0);
        assert_eq!(other.len(), 2);
    }

    #[test]
    fn metrics_addresses() {
        assert_eq!(
            parse_metrics_url("http://127.0.0.1:9090/metrics").unwrap(),
            "tcp://127.0.0.1:9090".parse::<Url>().unwrap()
        );
        assert_eq!(
            parse_metrics_url("/run/m.sock").unwrap(),
            Url::Unix("/run/m.sock".into())
        );
        assert!(parse_metrics_url("tcp://[::1]:1").is_ok());
        assert!(parse_metrics_url("inmem://x").is_err());
        assert!(parse_metrics_url("nonsense").is_err());
    }

    #[tokio::test]
    async fn a_scrape_over_tcp_reads_live_numbers() {
        let server = serve_metrics(&"tcp://127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let m = scrape(server.url()).await.unwrap();
        assert!(m["process_resident_memory_bytes"] > 1e6);
        assert!(m["process_open_fds"] >= 3.0);
        // The accept task itself is alive.
        assert!(m["tokio_alive_tasks"] >= 1.0);
        assert!(m.contains_key("nsm_live_tasks"));
        // An owned task shows in nsm_live_tasks.
        let token = CancellationToken::new();
        let before = scrape(server.url()).await.unwrap()["nsm_live_tasks"];
        let t = nsm_sdk::core::spawn_owned(token.clone(), std::future::pending());
        let during = scrape(server.url()).await.unwrap()["nsm_live_tasks"];
        token.cancel();
        let _ = t.await;
        assert!(during >= before + 1.0, "{before} -> {during}");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_unix_endpoint_answers_only_get_metrics() {
        let dir = std::env::temp_dir().join(format!("nsm-metrics-test-{}", std::process::id()));
        let path = dir.join("m.sock");
        let server = serve_metrics(&Url::Unix(path.clone())).await.unwrap();
        assert!(scrape(server.url()).await.is_ok());
        let ask = |req: &'static str| {
            let path = path.clone();
            async move {
                let mut s = UnixStream::connect(&path).await.unwrap();
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                out
            }
        };
        assert!(ask("GET /other HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(ask("POST /metrics HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        // A client that sends nothing is dropped after the limit; others are served.
        let _idle = UnixStream::connect(&path).await.unwrap();
        assert!(scrape(server.url()).await.is_ok());
        drop(server);
        assert!(!path.exists(), "the socket file is removed with the server");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
