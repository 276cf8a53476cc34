//! Where the current identity comes from: PEM files, watched.
//!
//! [`FileSource`] reads a certificate chain, a key and a trust bundle (the files named by
//! `NSM_TLS_CERT`, `NSM_TLS_KEY` and `NSM_TLS_CA`, or explicit paths), then polls them
//! (every 500 ms by default, through tokio time) and publishes each new good set as an
//! [`Identity`] on a [`tokio::sync::watch`]. The TLS configs of
//! [`crate::security::tls`] read that watch on every handshake.
//!
//! State: the last bytes read (to see a change) and the last good [`Identity`]. Failure
//! handled: a set caught half-written during rotation (new certificate, old key) or
//! otherwise unusable is logged once per content and ignored; the last good identity
//! stays until the files form a valid set again. The polling task is owned by the
//! source: dropping the [`FileSource`] cancels it. Watches handed out keep the last
//! identity after that.
//!
//! [`SecurityConfig::from_env`] is what a program calls at start: a [`FileSource`], or
//! insecure mode when `NSM_INSECURE=true` (one warning per process), or an error naming
//! the three variables (the program then exits 2 with that line).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::error::SecurityError;
use super::identity::{read_file, Svid, TrustBundle};

/// Environment variable naming the certificate chain file (PEM, leaf first).
pub const ENV_CERT: &str = "NSM_TLS_CERT";
/// Environment variable naming the private key file (PEM).
pub const ENV_KEY: &str = "NSM_TLS_KEY";
/// Environment variable naming the trust bundle file (PEM, one or more CAs).
pub const ENV_CA: &str = "NSM_TLS_CA";
/// Environment variable that, set to `true`, runs without security.
pub const ENV_INSECURE: &str = "NSM_INSECURE";

/// An SVID and the bundle its peers are checked against, as one consistent value.
#[derive(Debug, Clone)]
pub struct Identity {
    /// This process's SVID.
    pub svid: Arc<Svid>,
    /// The CAs peers must chain to.
    pub bundle: Arc<TrustBundle>,
}

impl Identity {
    /// Pairs an SVID with a bundle.
    pub fn new(svid: Svid, bundle: TrustBundle) -> Identity {
        Identity {
            svid: Arc::new(svid),
            bundle: Arc::new(bundle),
        }
    }

    /// A watch that always holds this identity: for TLS configs that need no rotation
    /// (tests, identities made in memory).
    pub fn fixed(self) -> watch::Receiver<Identity> {
        watch::channel(self).1
    }
}

/// The identity read from three PEM files, re-read when they change.
#[derive(Debug)]
pub struct FileSource {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    current: watch::Receiver<Identity>,
    _poller: DropGuard,
}

impl FileSource {
    /// How often the files are compared with what was last read.
    pub const DEFAULT_POLL: Duration = Duration::from_millis(500);

    /// Reads the three files now (an error says which file and why) and starts watching
    /// them every [`FileSource::DEFAULT_POLL`]. Must be called inside a tokio runtime.
    pub fn start(cert: &Path, key: &Path, ca: &Path) -> Result<FileSource, SecurityError> {
        FileSource::start_with_poll(cert, key, ca, FileSource::DEFAULT_POLL)
    }

    /// [`FileSource::start`] with another polling period.
    pub fn start_with_poll(
        cert: &Path,
        key: &Path,
        ca: &Path,
        poll: Duration,
    ) -> Result<FileSource, SecurityError> {
        let files = Files {
            cert: read_file("certificate", cert)?,
            key: read_file("key", key)?,
            ca: read_file("trust bundle", ca)?,
        };
        let identity = files.parse()?;
        let (tx, current) = watch::channel(identity);
        let stop = CancellationToken::new();
        let poller = Poller {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: ca.to_path_buf(),
            last: files,
            tx,
            poll,
        };
        tokio::spawn(poller.run(stop.clone()));
        Ok(FileSource {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: ca.to_path_buf(),
            current,
            _poller: stop.drop_guard(),
        })
    }

    /// The current identity.
    pub fn current(&self) -> Identity {
        self.current.borrow().clone()
    }

    /// The current SVID.
    pub fn svid(&self) -> Arc<Svid> {
        self.current.borrow().svid.clone()
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.current.borrow().bundle.clone()
    }

    /// A watch of the identity: `changed()` wakes on every rotation.
    pub fn watch(&self) -> watch::Receiver<Identity> {
        self.current.clone()
    }

    /// The files watched: certificate, key, bundle.
    pub fn paths(&self) -> (&Path, &Path, &Path) {
        (&self.cert, &self.key, &self.ca)
    }
}

/// The bytes of the three files as last read.
#[derive(PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl Files {
    fn parse(&self) -> Result<Identity, SecurityError> {
        Ok(Identity::new(
            Svid::from_pem(&self.cert, &self.key)?,
            TrustBundle::from_pem(&self.ca)?,
        ))
    }
}

struct Poller {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    last: Files,
    tx: watch::Sender<Identity>,
    poll: Duration,
}

impl Poller {
    async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let read = async {
                Ok::<_, std::io::Error>(Files {
                    cert: tokio::fs::read(&self.cert).await?,
                    key: tokio::fs::read(&self.key).await?,
                    ca: tokio::fs::read(&self.ca).await?,
                })
            };
            let files = match read.await {
                Ok(files) => files,
                // A file replaced by rename can be missing for an instant; try next tick.
                Err(e) => {
                    tracing::debug!(error = %e, "identity files not readable; keeping the current identity");
                    continue;
                }
            };
            if files == self.last {
                continue;
            }
            match files.parse() {
                Ok(identity) => {
                    tracing::info!(
                        spiffe_id = %identity.svid.id(),
                        "identity reloaded from {}",
                        self.cert.display()
                    );
                    self.tx.send_replace(identity);
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "identity files changed but do not form a valid set (yet); keeping the last good identity"
                ),
            }
            self.last = files;
        }
    }
}

/// How a program secures its links, decided from its environment.
#[derive(Debug)]
pub enum SecurityConfig {
    /// mTLS, tokens and policies with the identity of these files.
    Secure(FileSource),
    /// No security at all (`NSM_INSECURE=true`).
    Insecure,
}

impl SecurityConfig {
    /// Reads `NSM_INSECURE`, `NSM_TLS_CERT`, `NSM_TLS_KEY` and `NSM_TLS_CA` from the
    /// process environment. Must be called inside a tokio runtime.
    pub fn from_env() -> Result<SecurityConfig, SecurityError> {
        SecurityConfig::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`SecurityConfig::from_env`] with the variables from `lookup` (for tests and for
    /// programs that take them from flags).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<SecurityConfig, SecurityError> {
        if lookup(ENV_INSECURE).as_deref() == Some("true") {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "NSM_INSECURE=true: no mTLS, no token signatures, no policies; anyone who can reach a socket can use the mesh"
                );
            });
            return Ok(SecurityConfig::Insecure);
        }
        let var = |name| lookup(name).filter(|v| !v.is_empty());
        let (cert, key, ca) = (var(ENV_CERT), var(ENV_KEY), var(ENV_CA));
        match (cert, key, ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(SecurityConfig::Secure(FileSource::start(
                Path::new(&cert),
                Path::new(&key),
                Path::new(&ca),
            )?)),
            (cert, key, ca) => {
                let missing: Vec<&str> = [(ENV_CERT, cert), (ENV_KEY, key), (ENV_CA, ca)]
                    .into_iter()
                    .filter(|(_, v)| v.is_none())
                    .map(|(name, _)| name)
                    .collect();
                Err(SecurityError::MissingConfig {
                    missing: missing.join(", "),
                })
            }
        }
    }

    /// The identity source, unless insecure.
    pub fn source(&self) -> Option<&FileSource> {
        match self {
            SecurityConfig::Secure(source) => Some(source),
            SecurityConfig::Insecure => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::dev_ca::{tempdir, DevCa, SvidFiles};
    use crate::security::identity::SpiffeId;
    use std::collections::HashMap;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// A fresh directory with a CA and the files of `spiffe://example.org/<name>`.
    fn svid_files(name: &str) -> (std::path::PathBuf, DevCa, SvidFiles) {
        let dir = tempdir();
        let ca = DevCa::new("example.org").unwrap();
        let files = ca
            .issue(&id(&format!("spiffe://example.org/{name}")), secs(3600))
            .unwrap()
            .write(&dir, "svid")
            .unwrap();
        (dir, ca, files)
    }

    fn fast_source(files: &SvidFiles) -> FileSource {
        let poll = Duration::from_millis(20);
        FileSource::start_with_poll(&files.cert, &files.key, &files.ca, poll).unwrap()
    }

    #[tokio::test]
    async fn a_rewritten_set_is_published_on_the_watch() {
        let (dir, ca, files) = svid_files("a");
        let source = fast_source(&files);
        assert_eq!(source.svid().id(), &id("spiffe://example.org/a"));
        let mut watch = source.watch();
        ca.issue(&id("spiffe://example.org/b"), secs(3600))
            .unwrap()
            .write(&dir, "svid")
            .unwrap();
        tokio::time::timeout(secs(10), watch.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(watch.borrow().svid.id(), &id("spiffe://example.org/b"));
        assert_eq!(source.current().svid.id(), &id("spiffe://example.org/b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_half_written_set_keeps_the_last_good_identity_until_it_matches_again() {
        let (dir, ca, files) = svid_files("a");
        let source = fast_source(&files);
        let next = ca.issue(&id("spiffe://example.org/b"), secs(3600)).unwrap();
        // Only the certificate so far: it does not match the old key.
        std::fs::write(&files.cert, &next.cert_pem).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(source.svid().id(), &id("spiffe://example.org/a"));
        std::fs::write(&files.key, &next.key_pem).unwrap();
        let mut watch = source.watch();
        tokio::time::timeout(secs(10), watch.wait_for(|i| i.svid.id().path() == "/b"))
            .await
            .unwrap()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_polling_task_ends_with_the_source() {
        let (dir, _ca, files) = svid_files("a");
        let source = FileSource::start(&files.cert, &files.key, &files.ca).unwrap();
        let mut watch = source.watch();
        drop(source);
        // The sender lives in the polling task: closed means the task has ended.
        tokio::time::timeout(secs(5), watch.changed())
            .await
            .expect("the task ends")
            .expect_err("no change, the sender is gone");
        assert_eq!(watch.borrow().svid.id(), &id("spiffe://example.org/a"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn from_lookup_names_the_missing_variables_or_starts_the_source() {
        let none = HashMap::<&str, String>::new();
        let err = SecurityConfig::from_lookup(|k| none.get(k).cloned()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("missing: NSM_TLS_CERT, NSM_TLS_KEY, NSM_TLS_CA"),
            "{msg}"
        );

        let (dir, _ca, files) = svid_files("nsc");
        let path = |p: &Path| p.display().to_string();
        let mut vars = HashMap::from([
            (ENV_CERT, path(&files.cert)),
            (ENV_KEY, path(&files.key)),
            (ENV_CA, String::new()),
        ]);
        let err = SecurityConfig::from_lookup(|k| vars.get(k).cloned()).unwrap_err();
        assert!(err.to_string().contains("missing: NSM_TLS_CA"), "{err}");
        vars.insert(ENV_CA, path(&files.ca));
        let config = SecurityConfig::from_lookup(|k| vars.get(k).cloned()).unwrap();
        assert_eq!(
            config.source().unwrap().svid().id(),
            &id("spiffe://example.org/nsc")
        );
        vars.insert(ENV_KEY, path(&dir.join("absent.key")));
        let err = SecurityConfig::from_lookup(|k| vars.get(k).cloned()).unwrap_err();
        assert!(err.to_string().contains("absent.key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn insecure_mode_needs_no_files() {
        let config =
            SecurityConfig::from_lookup(|k| (k == ENV_INSECURE).then(|| "true".to_string()))
                .unwrap();
        assert!(config.source().is_none());
        let not_true =
            SecurityConfig::from_lookup(|k| (k == ENV_INSECURE).then(|| "yes".to_string()));
        assert!(not_true.is_err());
    }
}
