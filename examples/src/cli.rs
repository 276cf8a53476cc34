//! Configuration: every setting is an `NSM_*` environment variable, also accepted as a
//! `--flag` (`NSM_LISTEN_ON` <-> `--listen-on`), with `--help` listing both.
//!
//! Parsing is [clap](https://docs.rs/clap)'s; this module adds the value parsers NSM
//! settings need (durations like `60s` or `1m30s`, `key=value` labels) and one-line
//! error reporting, because the programs run under supervisors whose logs keep lines.

use std::collections::HashMap;
use std::time::Duration;

use clap::{ArgMatches, Parser};

/// Where a node's manager listens for its local clients, endpoints and forwarders.
pub const DEFAULT_NSM_SOCKET: &str = nsm_sdk::serving::DEFAULT_MANAGER_URL;

/// Settings every program has; put it in a program's arguments with
/// `#[command(flatten)]`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Common {
    /// Log level (trace, debug, info, warn, error) or tracing filter directives
    /// (`info,nsm_sdk=debug`). Without it RUST_LOG is used, else `info`. Logs go to
    /// stderr.
    #[arg(long, env = "NSM_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Worker threads of the program's tokio runtime: 1 runs everything on one thread
    /// (a current-thread runtime: no hand-off of work between threads, the lowest
    /// latency per call on a busy or small machine); N > 1 a multi-thread runtime with N
    /// workers. Without it, a multi-thread runtime with one worker per CPU.
    #[arg(long, env = "NSM_WORKER_THREADS", value_name = "N", value_parser = parse_worker_threads)]
    pub worker_threads: Option<usize>,
}

/// How an interdomain program finds other domains by DNS; put it in a program's
/// arguments with `#[command(flatten)]` and call [`DnsArgs::resolver`].
#[derive(Debug, Clone, clap::Args)]
pub struct DnsArgs {
    /// The DNS server to ask (ip:port); without it, the system's resolver.
    #[arg(long, env = "NSM_DNS_SERVER", value_name = "IP:PORT")]
    pub dns_server: Option<std::net::SocketAddr>,

    /// The bound of each DNS lookup.
    #[arg(long, env = "NSM_DNS_TIMEOUT", value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub dns_timeout: Duration,
}

impl DnsArgs {
    /// The resolver these settings describe (exit 2 when the system's configuration
    /// cannot be read).
    pub fn resolver(&self) -> Result<nsm_sdk::transport::DomainResolver, crate::Failure> {
        Ok(nsm_sdk::transport::DomainResolver::new(self.dns_server)
            .map_err(|e| crate::Failure::config(e.to_string()))?
            .timeout(self.dns_timeout))
    }
}

/// Parses a number of worker threads: a whole number of at least 1.
pub fn parse_worker_threads(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("the number of worker threads must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "bad number of worker threads {s:?} (expected 1, 2, ...)"
        )),
    }
}

/// Parses the command line and environment into `C`, and returns its [`Common`]
/// settings (when `C` has them; else the defaults).
///
/// `--help` prints to stdout and exits 0. Any other error prints one line,
/// `<program>: <reason>`, on stderr and exits with status 2.
pub(crate) fn parse<C: Parser>() -> (C, Common) {
    // Leaked once per process: clap names commands with `&'static str`s.
    let name: &'static str = Box::leak(program_name().into_boxed_str());
    let mut cmd = C::command().name(name);
    let matches = cmd.try_get_matches_from_mut(std::env::args_os());
    let parsed = matches.and_then(|m| {
        let common = common(&m);
        C::from_arg_matches(&m)
            .map(|c| (c, common))
            .map_err(|e| e.format(&mut cmd))
    });
    match parsed {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}: {}", program_name(), one_line(&e.render().to_string()));
            std::process::exit(2)
        }
    }
}

/// The [`Common`] settings in `m`, read one by one: a program without them gets the
/// defaults.
fn common(m: &ArgMatches) -> Common {
    Common {
        log_level: m.try_get_one::<String>("log_level").ok().flatten().cloned(),
        worker_threads: m
            .try_get_one::<usize>("worker_threads")
            .ok()
            .flatten()
            .copied(),
    }
}

/// A clap error message on one line: without the `error:` tag, the usage and the hint.
fn one_line(message: &str) -> String {
    let message = message.trim_start_matches("error: ");
    let end = ["\n\nUsage:", "\n\nFor more information", "\nUsage:"]
        .iter()
        .filter_map(|m| message.find(m))
        .min()
        .unwrap_or(message.len());
    message[..end]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The name this program was started as (the file name of `argv[0]`).
pub fn program_name() -> String {
    std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "nsm".to_string())
}

/// Parses a duration as NSM's Go commands write them: a sequence of numbers with units
/// (`h`, `m`, `s`, `ms`, `us`, `ns`), like `60s`, `1m30s`, `1.5s` or `500ms`. A plain
/// number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let bad = |why: &str| format!("bad duration {text:?}: {why} (expected e.g. 60s, 1m30s, 500ms)");
    let is_number = |c: char| c.is_ascii_digit() || c == '.';
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let unit_at = rest.find(|c| !is_number(c)).ok_or_else(|| bad("no unit"))?;
        let (number, tail) = rest.split_at(unit_at);
        let next_at = tail.find(is_number).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(next_at);
        let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad(&format!("unknown unit {unit:?}"))),
        };
        total += Duration::try_from_secs_f64(value * scale).map_err(|_| bad("out of range"))?;
        rest = tail;
    }
    Ok(total)
}

/// Parses one `key=value` label (the value may be empty; the key may not). `key:value`,
/// the map syntax of NSM's Go commands, is accepted too.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .or_else(|| s.split_once(':'))
        .ok_or_else(|| format!("label {s:?} is not key=value"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((key.to_string(), value.trim().to_string()))
}

/// Parses comma-separated labels, `key=value,key=value` (see [`parse_label`]); an empty
/// string is no labels.
pub fn parse_labels(s: &str) -> Result<HashMap<String, String>, String> {
    s.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(parse_label)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_go() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "s", "10x", "1.2.3s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_are_key_value() {
        assert_eq!(parse_label("app=x"), Ok(("app".into(), "x".into())));
        assert_eq!(parse_label("flag="), Ok(("flag".into(), String::new())));
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=x").is_err());
        assert_eq!(parse_label("go:style"), Ok(("go".into(), "style".into())));
        assert_eq!(parse_labels(""), Ok(HashMap::new()));
        let two = parse_labels("a=1, b=2").unwrap();
        assert_eq!((two["a"].as_str(), two["b"].as_str()), ("1", "2"));
        assert!(parse_labels("a=1,b").is_err());
    }

    #[test]
    fn worker_threads_are_at_least_one() {
        assert_eq!(parse_worker_threads("1"), Ok(1));
        assert_eq!(parse_worker_threads(" 4 "), Ok(4));
        for bad in ["0", "", "-1", "two", "1.5"] {
            assert!(parse_worker_threads(bad).is_err(), "{bad}");
        }
    }

    #[derive(Debug, clap::Parser)]
    struct WithCommon {
        #[command(flatten)]
        common: Common,
    }

    #[derive(Debug, clap::Parser)]
    struct WithoutCommon {
        #[arg(long)]
        other: Option<String>,
    }

    #[test]
    fn common_settings_come_from_the_matches() {
        let m = <WithCommon as clap::CommandFactory>::command()
            .try_get_matches_from(["p", "--worker-threads", "1", "--log-level", "debug"])
            .unwrap();
        let c = common(&m);
        assert_eq!(c.worker_threads, Some(1));
        assert_eq!(c.log_level.as_deref(), Some("debug"));
        let m = <WithCommon as clap::CommandFactory>::command().try_get_matches_from([
            "p",
            "--worker-threads",
            "0",
        ]);
        assert!(m.is_err());
        // A program without the common settings gets the defaults.
        let m = <WithoutCommon as clap::CommandFactory>::command()
            .try_get_matches_from(["p"])
            .unwrap();
        let c = common(&m);
        assert_eq!((c.worker_threads, c.log_level), (None, None));
    }

    #[test]
    fn clap_errors_fit_on_one_line() {
        let msg = "error: the following required arguments were not provided:\n  --name <NAME>\n\nUsage: nsc --name <NAME>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(msg),
            "the following required arguments were not provided: --name <NAME>"
        );
    }
}

/// The vL3 networks, a setting of `nse-vl3` and `nsm-vl3-ipam` (docs/VL3.md).
#[derive(Debug, Clone, clap::Args)]
pub struct Vl3Networks {
    /// The vL3 networks, comma-separated (one per address family).
    #[arg(
        long,
        env = "NSM_VL3_NETWORKS",
        value_name = "CIDR,...",
        value_delimiter = ',',
        required = true
    )]
    pub networks: Vec<ipnet::IpNet>,
}
