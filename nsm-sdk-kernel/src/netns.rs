//! [`NetNs`]: an owned handle on a network namespace, and the way to work inside one.
//!
//! A namespace is named on the wire by the mechanism parameter `inodeURL`
//! (`file:///proc/<pid>/ns/net`, or `file:///proc/<pid>/fd/<n>` after fd passing); tests
//! and tools also use `/run/netns/<name>` or any path to a namespace file. Opening keeps
//! an owned file descriptor, so the namespace stays alive (and keeps meaning the same
//! namespace) for as long as the handle lives, even if the pod's process exits.
//!
//! Working inside a namespace ([`NetNs::run`]) happens on a fresh, short-lived OS thread
//! that `setns()`es, does its work and exits. `setns` changes only the calling thread, so
//! doing it on a tokio worker or in `spawn_blocking` would leak the namespace into
//! unrelated tasks later scheduled on that pooled thread (docs/KERNEL.md 5.3, verified).
//! A netlink socket belongs forever to the namespace of the thread that created it, so
//! [`crate::RtNetlink::open`] creates its socket through `run` and then uses it from
//! any task.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

use crate::error::{Error, Result};

/// Where named namespaces live (`ip netns add <name>`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// An open network namespace: an owned descriptor plus the path it was opened from
/// (for messages) and its identity (device and inode of the nsfs file).
///
/// Two handles name the same namespace exactly when [`NetNs::same_as`] says so; the
/// inode alone is what NSM puts on the wire (`inode://<dev>/<ino>`, `netnsInode`).
pub struct NetNs {
    file: File,
    path: String,
    dev: u64,
    ino: u64,
}

impl NetNs {
    /// Opens the namespace named by an `inodeURL`: a `file://` URL whose path is a
    /// namespace file (`file:///proc/1234/ns/net`, `file:///proc/1234/fd/7`,
    /// `file:///run/netns/blue`).
    ///
    /// A URL with another scheme (`inode://` means the fd was never received), a host,
    /// or no path is [`Error::InvalidNetnsUrl`]; a path that does not exist is
    /// [`Error::NetnsNotFound`].
    pub fn from_url(url: &str) -> Result<NetNs> {
        let bad = |reason: &str| Error::InvalidNetnsUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if parsed.scheme() != "file" {
            return Err(bad(
                "only file:// URLs name a namespace this process can open",
            ));
        }
        let path = parsed
            .to_file_path()
            .map_err(|()| bad("a file:// URL needs an absolute path and no host"))?;
        NetNs::open(path)
    }

    /// Opens the namespace file at an absolute `path` (`/proc/<pid>/ns/net`,
    /// `/proc/<pid>/fd/<n>`, `/run/netns/<name>`, ...).
    ///
    /// Opening `/proc/<pid>/fd/<n>` re-opens the file behind that descriptor with fresh
    /// flags, so it works even when the descriptor was received as `O_PATH` (which
    /// `setns` and `IFLA_NET_NS_FD` refuse).
    pub fn open(path: impl AsRef<Path>) -> Result<NetNs> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        if !path.is_absolute() {
            return Err(Error::InvalidNetnsUrl {
                url: shown,
                reason: "a namespace path must be absolute".into(),
            });
        }
        let file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => Error::NetnsNotFound {
                path: shown.clone(),
            },
            _ => Error::NetnsIo {
                path: shown.clone(),
                source: e,
            },
        })?;
        NetNs::from_file(file, shown)
    }

    /// Opens the named namespace `/run/netns/<name>` (as made by `ip netns add`).
    pub fn named(name: &str) -> Result<NetNs> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(Error::InvalidNetnsUrl {
                url: name.to_string(),
                reason: "not a namespace name".into(),
            });
        }
        NetNs::open(PathBuf::from(NETNS_RUN_DIR).join(name))
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<NetNs> {
        NetNs::open("/proc/thread-self/ns/net")
    }

    /// Takes ownership of a descriptor of a namespace file, for example one received
    /// over a unix socket. An `O_PATH` descriptor (what NSM's `sendfd` sends) is
    /// re-opened through `/proc/self/fd/<n>` and then closed, because the kernel refuses
    /// `O_PATH` descriptors in `setns` and `IFLA_NET_NS_FD` (EBADF).
    pub fn from_fd(fd: OwnedFd) -> Result<NetNs> {
        let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(|e| Error::NetnsIo {
            path: proc_path.clone(),
            source: io::Error::from(e),
        })?;
        if OFlag::from_bits_truncate(flags).contains(OFlag::O_PATH) {
            let reopened = NetNs::open(&proc_path)?;
            drop(fd);
            return Ok(reopened);
        }
        NetNs::from_file(File::from(fd), proc_path)
    }

    fn from_file(file: File, path: String) -> Result<NetNs> {
        // Catch a wrong path now rather than with a confusing EINVAL from setns later:
        // the file must live on nsfs and be a network namespace.
        let on_nsfs = fstatfs(&file).map(|s| s.filesystem_type() == NSFS_MAGIC);
        if !on_nsfs.map_err(|e| Error::NetnsIo {
            path: path.clone(),
            source: io::Error::from(e),
        })? {
            return Err(Error::NotANetns { path });
        }
        match ns_type(&file) {
            Ok(t) if t == CloneFlags::CLONE_NEWNET.bits() => {}
            // Kernels before 4.11 have no NS_GET_NSTYPE: setns will tell.
            Err(nix::errno::Errno::ENOTTY) => {}
            // Another namespace type.
            Ok(_) => return Err(Error::NotANetns { path }),
            Err(e) => {
                return Err(Error::NetnsIo {
                    path,
                    source: io::Error::from(e),
                })
            }
        }
        let meta = file.metadata().map_err(|e| Error::NetnsIo {
            path: path.clone(),
            source: e,
        })?;
        Ok(NetNs {
            dev: meta.dev(),
            ino: meta.ino(),
            file,
            path,
        })
    }

    /// The inode number of the namespace (what `ls -iL /proc/<pid>/ns/net` shows).
    pub fn inode(&self) -> u64 {
        self.ino
    }

    /// The device of the nsfs file system the namespace file lives on.
    pub fn dev(&self) -> u64 {
        self.dev
    }

    /// The path this handle was opened from, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether both handles name the same namespace.
    pub fn same_as(&self, other: &NetNs) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }

    /// A second handle on the same namespace (a duplicated descriptor).
    pub fn try_clone(&self) -> Result<NetNs> {
        Ok(NetNs {
            file: self.file.try_clone().map_err(|e| Error::NetnsIo {
                path: self.path.clone(),
                source: e,
            })?,
            path: self.path.clone(),
            dev: self.dev,
            ino: self.ino,
        })
    }

    /// Runs `f` inside this namespace on a fresh OS thread that exits afterwards, and
    /// returns its result without blocking the async runtime.
    ///
    /// Use it for whatever follows the *calling thread's* namespace: creating sockets
    /// (netlink, or any socket that should live in the pod) and writing
    /// `/proc/sys/net/...` sysctls. Note that `/proc/net/...` follows the process's main
    /// thread; read `/proc/thread-self/net/...` instead.
    pub async fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let file = self.file.try_clone().map_err(|e| Error::NetnsIo {
            path: self.path.clone(),
            source: e,
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("nsm-netns".into())
            .spawn(move || {
                // setns on this thread only: it is ours and exits right after `f`, so
                // nothing else ever runs in the namespace by accident.
                let entered = setns(&file, CloneFlags::CLONE_NEWNET).map(|()| f());
                let _ = tx.send(entered);
            })
            .map_err(|e| Error::NetnsIo {
                path: self.path.clone(),
                source: e,
            })?;
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(errno)) => Err(Error::NetnsIo {
                path: self.path.clone(),
                source: io::Error::from(errno),
            }),
            Err(_) => Err(Error::NetnsIo {
                path: self.path.clone(),
                source: io::Error::other("the namespace helper thread panicked"),
            }),
        }
    }
}

/// The namespace type (`CLONE_NEW*`) of a namespace file.
fn ns_type(file: &File) -> nix::Result<i32> {
    // NS_GET_NSTYPE = _IO(0xb7, 0x3) (linux/nsfs.h).
    mod ioctl {
        #![allow(unreachable_pub)]
        nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor, which
    // `file` keeps open for the whole call; it returns an integer and never touches
    // our memory.
    unsafe { ioctl::ns_get_nstype(file.as_raw_fd()) }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetNs")
            .field("path", &self.path)
            .field("inode", &self.ino)
            .finish()
    }
}

impl fmt::Display for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (net:[{}])", self.path, self.ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn opens_own_namespace_from_a_file_url_and_a_path_with_the_same_identity() {
        let by_url = NetNs::from_url("file:///proc/self/ns/net").unwrap();
        let by_path = NetNs::open("/proc/thread-self/ns/net").unwrap();
        assert!(by_url.same_as(&by_path));
        assert_ne!(by_url.inode(), 0);
        let meta = std::fs::metadata("/proc/self/ns/net").unwrap();
        assert_eq!(by_url.inode(), meta.ino());
    }

    #[test]
    fn an_o_path_descriptor_is_reopened_into_a_usable_one() {
        let opath = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_PATH.bits())
            .open("/proc/self/ns/net")
            .unwrap();
        let ns = NetNs::from_fd(OwnedFd::from(opath)).unwrap();
        let flags = fcntl(ns.as_fd(), FcntlArg::F_GETFL).unwrap();
        assert!(!OFlag::from_bits_truncate(flags).contains(OFlag::O_PATH));
        assert!(ns.same_as(&NetNs::current().unwrap()));
    }

    #[test]
    fn a_url_that_is_not_file_is_invalid_argument() {
        for url in [
            "inode://4/4026531840",
            "http://host/proc/1/ns/net",
            "file://host/proc/1/ns/net",
            "not a url",
        ] {
            let err = NetNs::from_url(url).unwrap_err();
            assert!(
                matches!(err, Error::InvalidNetnsUrl { .. }),
                "{url}: {err:?}"
            );
            assert!(matches!(
                nsm_sdk::Error::from(err),
                nsm_sdk::Error::InvalidArgument(_)
            ));
        }
        assert!(matches!(
            NetNs::open("proc/1/ns/net").unwrap_err(),
            Error::InvalidNetnsUrl { .. }
        ));
        assert!(matches!(
            NetNs::named("../etc").unwrap_err(),
            Error::InvalidNetnsUrl { .. }
        ));
    }

    #[test]
    fn a_missing_namespace_is_not_found() {
        let err = NetNs::from_url("file:///proc/999999999/ns/net").unwrap_err();
        assert!(matches!(err, Error::NetnsNotFound { .. }), "{err:?}");
        assert!(matches!(
            nsm_sdk::Error::from(err),
            nsm_sdk::Error::NotFound(_)
        ));
        assert!(matches!(
            NetNs::named("nsmt-does-not-exist").unwrap_err(),
            Error::NetnsNotFound { .. }
        ));
    }

    #[test]
    fn a_file_that_is_not_a_network_namespace_is_refused() {
        assert!(matches!(
            NetNs::open("/proc/self/ns/mnt").unwrap_err(),
            Error::NotANetns { .. }
        ));
        assert!(matches!(
            NetNs::open("/proc/self/status").unwrap_err(),
            Error::NotANetns { .. }
        ));
    }

    #[tokio::test]
    async fn run_executes_on_a_thread_that_is_not_the_callers() {
        let ns = NetNs::current().unwrap();
        let caller = std::thread::current().id();
        let ran = ns
            .run(|| {
                let ino = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
                (std::thread::current().id(), ino.unwrap_or(0))
            })
            .await;
        // setns needs CAP_SYS_ADMIN even into the caller's own namespace.
        if matches!(&ran, Err(e) if e.errno() == Some(1)) {
            eprintln!("skipped: setns needs root");
            return;
        }
        let (thread, ino) = ran.unwrap();
        assert_ne!(thread, caller);
        assert_eq!(ino, ns.inode());
    }
}
