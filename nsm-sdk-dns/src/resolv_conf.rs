//! `ResolvConf`: a pod's resolv.conf, written from the DNS configs of its connections
//! and given back when they are gone.
//!
//! What it does: [`ResolvConf::apply`] with the configs of all the pod's connections
//! writes the file with their nameservers first, then the nameservers of the pod's own
//! configuration (de-duplicated, in order), their search domains first, then the pod's,
//! and the pod's other lines (`options`, ...) as they were. The pod's own configuration
//! is what the file held before the first apply; for a named network namespace without
//! a file of its own, the host's `/etc/resolv.conf` (what the pod saw until then).
//! Applying no config gives the pod its own configuration back: the file's previous
//! content is written again, or the file is removed (and its directory, when this
//! created it).
//!
//! For a pod that is a named network namespace ([`ResolvConf::netns`]) the file is
//! `/etc/netns/<name>/resolv.conf`, which `ip netns exec <name>` bind-mounts over
//! `/etc/resolv.conf` for the programs it starts. A resolv.conf names nameservers by
//! address only (port 53): a DNS server IP given with another port is left out (with a
//! warning).
//!
//! State: the pod's own configuration, taken at the first apply, and whether this made
//! the directory, behind a `std::sync::Mutex` (file writes are small and happen under
//! it, so two applies never interleave).
//!
//! Failure handled: a file or directory that cannot be read, written or removed is
//! [`Error::File`](crate::Error::File); an invalid namespace name is
//! [`Error::InvalidName`](crate::Error::InvalidName).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{debug, warn};

use crate::{DnsConfig, Error, Result};

/// Where `ip netns exec` finds a namespace's own `/etc` files.
const NETNS_ETC: &str = "/etc/netns";
/// The host's resolv.conf.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// The first line of a file this writes.
const HEADER: &str = "# Written by nsm-sdk-dns from the DNS configs of this pod's NSM connections;\n# the pod's own configuration comes back when the last one closes.\n";

/// A DNS server of a `DNSConfig`: `ip` (port 53), `ip:port` or `[ipv6]:port`.
///
/// ```
/// use nsm_sdk_dns::parse_server;
/// assert_eq!(parse_server("10.0.0.1"), Some("10.0.0.1:53".parse().unwrap()));
/// assert_eq!(parse_server("[fd00::1]:5353"), Some("[fd00::1]:5353".parse().unwrap()));
/// assert_eq!(parse_server("fd00::1"), Some("[fd00::1]:53".parse().unwrap()));
/// assert_eq!(parse_server("dns.example"), None);
/// ```
pub fn parse_server(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    s.parse().ok()
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct ResolvConf {
    path: PathBuf,
    /// Read when the file does not exist at the first apply.
    fallback: Option<PathBuf>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Taken at the first apply: the file's content (None: there was no file).
    original: Option<Option<String>>,
    /// The base merged with the configs: the original, or the fallback's content.
    base: String,
    created_dir: bool,
}

impl ResolvConf {
    /// The resolv.conf of the named network namespace `name`
    /// (`/etc/netns/<name>/resolv.conf`; without it, the pod's own configuration is the
    /// host's `/etc/resolv.conf`).
    ///
    /// # Errors
    /// [`Error::InvalidName`] when `name` is empty or not a single path component.
    pub fn netns(name: &str) -> Result<ResolvConf> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(Error::InvalidName {
                name: name.to_string(),
                reason: "not a network namespace name".into(),
            });
        }
        Ok(ResolvConf {
            path: Path::new(NETNS_ETC).join(name).join("resolv.conf"),
            fallback: Some(PathBuf::from(HOST_RESOLV_CONF)),
            state: Mutex::default(),
        })
    }

    /// The resolv.conf at `path` (a pod's own file, e.g. a container's
    /// `/etc/resolv.conf`; without it, the pod's own configuration is empty).
    pub fn at(path: impl Into<PathBuf>) -> ResolvConf {
        ResolvConf {
            path: path.into(),
            fallback: None,
            state: Mutex::default(),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the file for `configs` (the configs of all the pod's connections), or
    /// gives the pod its own configuration back when there is none.
    ///
    /// # Errors
    /// [`Error::File`] when the file or its directory cannot be read, written or
    /// removed.
    pub fn apply(&self, configs: &[DnsConfig]) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if configs.is_empty() {
            return self.restore(&mut state);
        }
        if state.original.is_none() {
            let original = read_optional(&self.path)?;
            state.base = match (&original, &self.fallback) {
                (Some(content), _) => content.clone(),
                (None, Some(fallback)) => read_optional(fallback)?.unwrap_or_default(),
                (None, None) => String::new(),
            };
            if let Some(dir) = self.path.parent() {
                if !dir.as_os_str().is_empty() && !dir.exists() {
                    std::fs::create_dir_all(dir).map_err(|e| self.err(dir, e))?;
                    state.created_dir = true;
                }
            }
            state.original = Some(original);
        }
        let content = render(configs, &state.base);
        debug!(path = %self.path.display(), "resolv.conf written");
        // In place (one write of the whole file), not renamed over: a program that
        // already runs in the pod holds the bind-mounted inode and re-reads it.
        std::fs::write(&self.path, content).map_err(|e| self.err(&self.path, e))
    }

    fn restore(&self, state: &mut State) -> Result<()> {
        let Some(original) = state.original.take() else {
            return Ok(());
        };
        match original {
            Some(content) => {
                std::fs::write(&self.path, content).map_err(|e| self.err(&self.path, e))?
            }
            None => match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.err(&self.path, e)),
            },
        }
        if std::mem::take(&mut state.created_dir) {
            if let Some(dir) = self.path.parent() {
                // Only when empty: something else may have put files there since.
                if let Err(e) = std::fs::remove_dir(dir) {
                    debug!(dir = %dir.display(), error = %e, "directory kept");
                }
            }
        }
        state.base.clear();
        debug!(path = %self.path.display(), "resolv.conf given back");
        Ok(())
    }

    fn err(&self, path: &Path, source: std::io::Error) -> Error {
        Error::File {
            path: path.display().to_string(),
            source,
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::File {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// The file's content: the configs' nameservers and search domains first, then the
/// base's, then the base's other lines.
fn render(configs: &[DnsConfig], base: &str) -> String {
    let mut servers = Vec::new();
    let mut search = Vec::new();
    for c in configs {
        for s in &c.dns_server_ips {
            match parse_server(s) {
                Some(a) if a.port() == 53 => push_unique(&mut servers, a.ip().to_string()),
                Some(a) => {
                    warn!(server = %a, "a DNS server on another port than 53 cannot go into resolv.conf")
                }
                None => warn!(server = %s, "a DNS server IP that does not parse is left out"),
            }
        }
        for d in &c.search_domains {
            let d = d.trim().trim_end_matches('.');
            if !d.is_empty() && !d.contains(char::is_whitespace) {
                push_unique(&mut search, d.to_string());
            }
        }
    }
    let mut other = Vec::new();
    for line in base.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(s) = words.next() {
                    push_unique(&mut servers, s.to_string());
                }
            }
            Some("search") | Some("domain") => {
                for d in words {
                    push_unique(&mut search, d.trim_end_matches('.').to_string());
                }
            }
            Some(w) if w.starts_with('#') || w.starts_with(';') => {}
            Some(_) => other.push(line.to_string()),
            None => {}
        }
    }
    let mut out = String::from(HEADER);
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    for s in servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    for line in other {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(servers: &[&str], search: &[&str]) -> DnsConfig {
        DnsConfig {
            dns_server_ips: servers.iter().map(|s| s.to_string()).collect(),
            search_domains: search.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn temp_dir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nsm-dns-{}-{what}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect()
    }

    #[test]
    fn configs_merge_before_the_pods_own_and_the_file_goes_when_none_is_left() {
        let dir = temp_dir("merge");
        let path = dir.join("pod").join("resolv.conf");
        let rc = ResolvConf::at(&path);
        rc.apply(&[
            config(&["10.0.0.1", "10.0.0.2:5353"], &["vl3", "com."]),
            config(&["10.0.0.1", "fd00::1"], &["vl3", "other"]),
        ])
        .unwrap();
        assert_eq!(
            lines(&path),
            [
                "search vl3 com other",
                "nameserver 10.0.0.1",
                "nameserver fd00::1"
            ]
        );
        rc.apply(&[config(&["10.0.0.3"], &[])]).unwrap();
        assert_eq!(lines(&path), ["nameserver 10.0.0.3"]);
        rc.apply(&[]).unwrap();
        assert!(!path.exists(), "no file before, none after");
        assert!(
            !path.parent().unwrap().exists(),
            "the directory this made is gone"
        );
        rc.apply(&[]).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_pods_previous_file_is_kept_merged_and_given_back() {
        let dir = temp_dir("restore");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        let before = "# mine\nsearch corp\nnameserver 192.0.2.53\noptions ndots:2\n";
        std::fs::write(&path, before).unwrap();
        let rc = ResolvConf::at(&path);
        rc.apply(&[config(&["10.0.0.1"], &["vl3"])]).unwrap();
        assert_eq!(
            lines(&path),
            [
                "search vl3 corp",
                "nameserver 10.0.0.1",
                "nameserver 192.0.2.53",
                "options ndots:2"
            ]
        );
        rc.apply(&[]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        assert!(dir.exists(), "a directory this did not make stays");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_bad_namespace_name_is_refused_and_a_good_one_maps_to_etc_netns() {
        for bad in ["", ".", "..", "a/b"] {
            assert!(ResolvConf::netns(bad).is_err(), "{bad:?}");
        }
        let rc = ResolvConf::netns("pod-1").unwrap();
        assert_eq!(rc.path(), Path::new("/etc/netns/pod-1/resolv.conf"));
    }

    #[test]
    fn a_file_that_cannot_be_written_is_an_error_naming_it() {
        let dir = temp_dir("unwritable");
        std::fs::create_dir_all(&dir).unwrap();
        // A directory where the file should be: writing it fails for root too.
        let path = dir.join("resolv.conf");
        std::fs::create_dir_all(&path).unwrap();
        let rc = ResolvConf::at(&path);
        let e = rc.apply(&[config(&["10.0.0.1"], &[])]).unwrap_err();
        assert!(e.to_string().contains("resolv.conf"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
