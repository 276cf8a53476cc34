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
//! The members use short raft timings (heartbeat 50 ms, election 500 ms) so that a lost
//! leader is replaced within about a second.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

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
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
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
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
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
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &member.client_url()])
            .args(["--advertise-client-urls", &member.client_url()])
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

    /// The client URLs of every member (`http://127.0.0.1:port`), killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
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
                if let Some((me, leader)) = status(&m.client_url()).await {
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
                healthy &= status(&m.client_url()).await.is_some_and(|(_, l)| l != 0);
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
async fn status(url: &str) -> Option<(u64, u64)> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(1));
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
        assert!(status(&url).await.is_none(), "the member is gone");
        assert!(!dir.exists(), "the data directory is removed");
    }
}
