//! A real DNS server for the interdomain tests: Debian's `dnsmasq` on a loopback port,
//! serving the SRV records the test gives (`registry.nsm-system.<domain>` ->
//! `127.0.0.1:<port>`), each target with its own A record. Names under the domains the
//! test declares local ([`DnsServer::start`]) without a record are NXDOMAIN. The
//! configuration lives in a temporary directory; the server stops (and the directory
//! goes) on drop.

use std::io::{self, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The `dnsmasq` program, if installed (`/usr/sbin/dnsmasq` or on `PATH`); when not,
/// prints why the calling test skips (`skipped: <what> need dnsmasq`).
pub fn dnsmasq(what: &str) -> Option<PathBuf> {
    let found = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("dnsmasq"))
                    .find(|p| p.exists())
            })
        });
    if found.is_none() {
        eprintln!("skipped: {what} need dnsmasq (Debian: dnsmasq-base)");
    }
    found
}

/// A running dnsmasq; see the [module docs](self).
#[derive(Debug)]
pub struct DnsServer {
    child: Option<Child>,
    dir: PathBuf,
    addr: SocketAddr,
}

/// A loopback address whose port is free for both UDP and TCP at the time of the call.
pub fn free_addr() -> SocketAddr {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("a loopback UDP port");
        let addr = udp.local_addr().expect("its address");
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

const READY: &str = "ready.nsm-test";

impl DnsServer {
    /// Starts `dnsmasq` on `addr` (UDP and TCP) with the SRV `records` and NXDOMAIN for
    /// any other name under `local` domains; returns once it answers.
    pub fn start(
        program: &Path,
        addr: SocketAddr,
        records: &[(String, SocketAddr)],
        local: &[String],
    ) -> io::Result<DnsServer> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nsm-dns-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir)?;
        let mut conf = format!(
            "port={}\nlisten-address={}\nbind-interfaces\nno-resolv\nno-hosts\nno-negcache\n\
             host-record={READY},127.0.0.1\nlocal=/nsm-test/\n",
            addr.port(),
            addr.ip()
        );
        for d in local {
            conf.push_str(&format!("local=/{d}/\n"));
        }
        for (i, (name, target)) in records.iter().enumerate() {
            let host = format!("target-{i}.nsm-test");
            conf.push_str(&format!(
                "srv-host={name},{host},{}\nhost-record={host},{}\n",
                target.port(),
                target.ip()
            ));
        }
        let path = dir.join("dnsmasq.conf");
        std::fs::File::create(&path)?.write_all(conf.as_bytes())?;
        let mut cmd = Command::new(program);
        cmd.arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", path.display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg("--log-facility=-")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log"))?);
        // As root dnsmasq would switch to `nobody`; it needs nothing root has.
        if is_root() {
            cmd.arg("--user=root");
        }
        let child = cmd.spawn()?;
        let mut server = DnsServer {
            child: Some(child),
            dir,
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !answers(addr) {
            if Instant::now() > deadline {
                let log = server.log();
                server.stop();
                return Err(io::Error::other(format!("dnsmasq did not answer: {log}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What dnsmasq logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Stops it (the port no longer answers); idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Whether the server at `addr` answers an A query for the readiness name.
fn answers(addr: SocketAddr) -> bool {
    let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in READY.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if sock.send_to(&q, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if n > 12 && buf[0] == 0x12 && buf[3] & 0x0f == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_until_dropped() {
        let Some(program) = dnsmasq("the DNS harness test") else {
            return;
        };
        let addr = free_addr();
        let server = DnsServer::start(&program, addr, &[], &["cluster1".into()]).unwrap();
        assert!(answers(server.addr()));
        let dir = server.dir.clone();
        drop(server);
        assert!(!answers(addr), "stopped");
        assert!(!dir.exists());
    }
}
