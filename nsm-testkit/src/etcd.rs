//! Real etcd servers for tests (feature `etcd`): one member or a cluster of several on
//! free loopback ports, each with a temporary data directory.
//!
//! [`EtcdCluster::start`] starts the members and waits (polling, no sleep) until every
//! one answers a status call and knows a leader. Members can be SIGKILLed
//! ([`EtcdCluster::kill`]) and started again on the same data and ports
//! ([`EtcdCluster::restart`]). Dropping the cluster SIGKILLs every member, also when the
//! test panics (the data directory and the members' logs are then kept and named on
//! stderr); a member also dies with the thread that started it (`PR_SET_PDEATHSIG`),
//! so a test process killed by a timeout leaves no etcd behind.
//!
//! [`EtcdCluster::start_tls`] starts members that serve clients over TLS only and ask
//! for a client certificate (`--client-cert-auth`); the certificates (a CA made for the
//! cluster, a server certificate for 127.0.0.1, a client certificate, and a second CA
//! that signed none of them) are PEM files in the cluster's directory ([`TlsFiles`]).
//!
//! The members use short raft timings (heartbeat 50 ms, election 500 ms) so that a lost
//! leader is replaced within about a second.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// How long a cluster (or a restarted member) may take to become healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

/// One member of an [`EtcdCluster`].
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// Real etcd members on loopback; see the [module docs](self).
#[derive(Debug)]
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
    tls: Option<TlsFiles>,
}

/// The PEM files of a cluster started with [`EtcdCluster::start_tls`].
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the members' and the client's certificates.
    pub ca: PathBuf,
    /// A client certificate the members accept, and its key.
    pub cert: PathBuf,
    /// The key of `cert`.
    pub key: PathBuf,
    /// A CA that signed none of them (to check that a wrong CA is refused).
    pub other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl TlsFiles {
    /// Makes the CAs and certificates and writes them under `dir`.
    fn write(dir: &Path) -> TlsFiles {
        let ca = |name: &str| {
            let key = KeyPair::generate().expect("a CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key).expect("a self-signed CA");
            (cert.pem(), Issuer::new(params, key))
        };
        let (ca_pem, issuer) = ca("nsm test etcd CA");
        let (other_pem, _) = ca("nsm test etcd CA (another)");
        let leaf = |names: &[&str], usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("a key");
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut params = CertificateParams::new(names).expect("certificate params");
            params
                .distinguished_name
                .push(DnType::CommonName, "nsm test");
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("a certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_pem, server_key_pem) = leaf(
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_pem, client_key_pem) =
            leaf(&["nsm-registry"], ExtendedKeyUsagePurpose::ClientAuth);
        let dir = dir.join("tls");
        std::fs::create_dir_all(&dir).expect("the TLS directory");
        let put = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("a PEM file");
            path
        };
        TlsFiles {
            ca: put("ca.pem", &ca_pem),
            cert: put("client.pem", &client_pem),
            key: put("client-key.pem", &client_key_pem),
            other_ca: put("other-ca.pem", &other_pem),
            server_cert: put("server.pem", &server_pem),
            server_key: put("server-key.pem", &server_key_pem),
        }
    }

    /// The client's TLS options: this CA and the client certificate.
    fn options(&self) -> TlsOptions {
        let read = |p: &Path| std::fs::read(p).expect("a PEM file");
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)))
            .identity(Identity::from_pem(read(&self.cert), read(&self.key)))
    }
}

/// A free loopback port (bound, then released for etcd to take).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl EtcdCluster {
    /// Starts `members` etcd members (1 or more) and waits until all are healthy.
    ///
    /// # Panics
    /// When `etcd` cannot be started or the cluster is not healthy within 30 s.
    pub async fn start(members: usize) -> EtcdCluster {
        Self::start_with(members, false).await
    }

    /// As [`EtcdCluster::start`], the members serving clients over TLS with client
    /// certificates ([`EtcdCluster::tls`] names the files).
    ///
    /// # Panics
    /// As [`EtcdCluster::start`].
    pub async fn start_tls(members: usize) -> EtcdCluster {
        Self::start_with(members, true).await
    }

    async fn start_with(members: usize, tls: bool) -> EtcdCluster {
        assert!(members >= 1, "an etcd cluster has at least one member");
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nsm-etcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("etcd temp dir");
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let tls = tls.then(|| TlsFiles::write(&dir));
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
            tls,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i);
        }
        cluster.wait_healthy().await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let member = &self.members[i];
        let data = self.dir.join(&member.name);
        let log =
            File::create(self.dir.join(format!("{}.log", member.name))).expect("etcd log file");
        let client_url = member.client_url(self.tls.is_some());
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &member.peer_url()])
            .args(["--initial-advertise-peer-urls", &member.peer_url()])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.dir.display().to_string()])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd (Debian's etcd-server): {e}"));
        self.members[i].child = Some(child);
    }

    /// The client URLs of every member (`http://127.0.0.1:port`, `https://` with TLS),
    /// killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        let tls = self.tls.is_some();
        self.members.iter().map(|m| m.client_url(tls)).collect()
    }

    /// The certificates of a cluster started with [`EtcdCluster::start_tls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Client options that reach this cluster (its TLS, if any).
    fn options(&self) -> Option<TlsOptions> {
        self.tls.as_ref().map(TlsFiles::options)
    }

    /// The client URLs, comma-separated (as `NSM_ETCD_ENDPOINTS` takes them).
    pub fn endpoints_env(&self) -> String {
        self.endpoints().join(",")
    }

    /// How many members the cluster has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member (never: [`EtcdCluster::start`] makes one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The process id of member `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Whether member `i` runs.
    pub fn running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory and ports, and waits until every
    /// running member is healthy.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy().await;
    }

    /// The index of the current leader, as the running members see it (waits for one).
    ///
    /// # Panics
    /// When no leader is known within 30 s.
    pub async fn leader(&self) -> usize {
        let until = Instant::now() + HEALTHY_WITHIN;
        loop {
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                let url = m.client_url(self.tls.is_some());
                if let Some((me, leader)) = status(&url, self.options()).await {
                    if leader != 0 && me == leader {
                        return self
                            .members
                            .iter()
                            .position(|x| x.name == m.name)
                            .unwrap_or(0);
                    }
                }
            }
            assert!(
                Instant::now() < until,
                "no etcd leader within {HEALTHY_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running member answers a status call and knows a leader.
    ///
    /// # Panics
    /// When that takes more than 30 s (the members' logs are printed).
    pub async fn wait_healthy(&self) {
        let until = Instant::now() + HEALTHY_WITHIN;
        loop {
            let mut healthy = true;
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                let url = m.client_url(self.tls.is_some());
                healthy &= status(&url, self.options())
                    .await
                    .is_some_and(|(_, l)| l != 0);
            }
            if healthy {
                return;
            }
            assert!(
                Instant::now() < until,
                "etcd not healthy within {HEALTHY_WITHIN:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every member's log.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(self.dir.join(format!("{}.log", m.name)));
                format!("----- etcd {} -----\n{}", m.name, log.unwrap_or_default())
            })
            .collect()
    }

    /// The directory of the members' data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// `(member id, leader id)` of the member at `url`, if it answers within a second.
async fn status(url: &str, tls: Option<TlsOptions>) -> Option<(u64, u64)> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(1));
    if let Some(tls) = tls {
        options = options.with_tls(tls);
    }
    let call = async {
        let mut client = Client::connect([url], Some(options)).await.ok()?;
        let st = client.status().await.ok()?;
        let me = st.header().map(|h| h.member_id())?;
        Some((me, st.leader()))
    };
    tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .ok()
        .flatten()
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            eprintln!("etcd data and logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_member_starts_serves_and_is_gone_after_drop() {
        let cluster = EtcdCluster::start(1).await;
        let url = cluster.endpoints()[0].clone();
        let mut client = Client::connect([url.as_str()], None).await.unwrap();
        client.put("k", "v", None).await.unwrap();
        let got = client.get("k", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"v");
        let dir = cluster.dir().to_path_buf();
        drop(cluster);
        assert!(status(&url, None).await.is_none(), "the member is gone");
        assert!(!dir.exists(), "the data directory is removed");
    }
}
