//! Transport URLs: `tcp://host:port`, `unix:///path` and `inmem://name` (in-process).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::Error;

/// Where a gRPC peer listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Url {
    /// `tcp://host:port` (TCP_NODELAY is always on).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port (0 when listening means: pick one).
        port: u16,
    },
    /// `unix:///absolute/path` to a unix socket.
    Unix(PathBuf),
    /// `inmem://name`: the in-process transport, for tests and the sandbox.
    Memory(String),
}

impl FromStr for Url {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::invalid(format!("bad transport URL {s:?}: {why}"));
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://, one of tcp, unix, inmem"))?;
        match scheme {
            "tcp" => {
                let hostport = rest.trim_end_matches('/');
                let (host, port) = hostport
                    .rsplit_once(':')
                    .ok_or_else(|| bad("expected tcp://host:port"))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.is_empty() {
                    return Err(bad("empty host"));
                }
                let port = port
                    .parse()
                    .map_err(|_| bad("port is not a number from 0 to 65535"))?;
                Ok(Url::Tcp {
                    host: host.to_string(),
                    port,
                })
            }
            "unix" => {
                if !rest.starts_with('/') {
                    return Err(bad("expected an absolute path: unix:///path"));
                }
                Ok(Url::Unix(PathBuf::from(rest)))
            }
            "inmem" => {
                if rest.is_empty() {
                    return Err(bad("empty name"));
                }
                Ok(Url::Memory(rest.to_string()))
            }
            other => Err(bad(&format!(
                "unknown scheme {other:?}, expected tcp, unix or inmem"
            ))),
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Url::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Url::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Url::Unix(p) => write!(f, "unix://{}", p.display()),
            Url::Memory(n) => write!(f, "inmem://{n}"),
        }
    }
}

/// The URL the next hop listens on, put in [`Cx::ext`](crate::Cx::ext) by whoever chose
/// it (select, discover_forwarder, the client's own configuration) and dialled by the
/// gRPC client at the end of a client chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientUrl(pub Url);

/// The registry replicas a client may use, in order of preference: one URL or several
/// (`NSM_REGISTRY_URL=tcp://a:5002,tcp://b:5002`). A registry client over the list
/// ([`grpc_registry`](crate::transport::grpc_registry)) sends each call to its current
/// URL and moves to the next one when that one is unavailable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryUrls(Vec<Url>);

impl RegistryUrls {
    /// The list; `None` when it is empty.
    pub fn new(urls: impl IntoIterator<Item = Url>) -> Option<Self> {
        let urls: Vec<Url> = urls.into_iter().collect();
        (!urls.is_empty()).then_some(RegistryUrls(urls))
    }

    /// The URLs, first preferred.
    pub fn urls(&self) -> &[Url] {
        &self.0
    }

    /// The preferred URL.
    pub fn first(&self) -> &Url {
        // Never empty: every constructor checks.
        &self.0[0]
    }
}

impl From<Url> for RegistryUrls {
    fn from(url: Url) -> Self {
        RegistryUrls(vec![url])
    }
}

impl From<&Url> for RegistryUrls {
    fn from(url: &Url) -> Self {
        RegistryUrls(vec![url.clone()])
    }
}

impl FromStr for RegistryUrls {
    type Err = Error;

    /// Comma-separated URLs; blanks around each are ignored, an empty item is an error.
    fn from_str(s: &str) -> Result<Self, Error> {
        let urls = s
            .split(',')
            .map(|u| u.trim().parse::<Url>())
            .collect::<Result<Vec<_>, _>>()?;
        RegistryUrls::new(urls).ok_or_else(|| Error::invalid(format!("no registry URL in {s:?}")))
    }
}

impl fmt::Display for RegistryUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, url) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{url}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_scheme() {
        for s in [
            "tcp://127.0.0.1:5001",
            "tcp://[::1]:80",
            "unix:///run/nsm/nsm.io.sock",
            "inmem://nsmgr-1",
        ] {
            let u: Url = s.parse().unwrap();
            assert_eq!(u.to_string(), s);
        }
        assert_eq!(
            "tcp://localhost:0".parse::<Url>().unwrap(),
            Url::Tcp {
                host: "localhost".into(),
                port: 0
            }
        );
    }

    #[test]
    fn rejects_bad_urls_with_a_reason() {
        for s in [
            "",
            "127.0.0.1:80",
            "tcp://:80",
            "tcp://host",
            "tcp://h:99999",
            "unix://rel/path",
            "http://x:1",
            "inmem://",
        ] {
            let e = s.parse::<Url>().unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{s}: {e}");
        }
    }

    #[test]
    fn registry_urls_parse_a_comma_separated_list_in_order() {
        let list: RegistryUrls = "tcp://a:1, unix:///run/b.sock".parse().unwrap();
        assert_eq!(list.urls().len(), 2);
        assert_eq!(list.first(), &"tcp://a:1".parse::<Url>().unwrap());
        assert_eq!(list.to_string(), "tcp://a:1,unix:///run/b.sock");
        let one: RegistryUrls = "tcp://a:1".parse().unwrap();
        assert_eq!(one, RegistryUrls::from("tcp://a:1".parse::<Url>().unwrap()));
        for bad in ["", "tcp://a:1,", ",tcp://a:1", "tcp://a:1,http://b:2"] {
            let e = bad.parse::<RegistryUrls>().unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e}");
        }
        assert!(RegistryUrls::new(Vec::new()).is_none());
    }
}
