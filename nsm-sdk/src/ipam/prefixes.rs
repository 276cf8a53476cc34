//! [`Vl3Prefixes`]: the prefixes a vL3 endpoint holds now, shared by whoever learns them
//! (the prefix client, a test) and whoever reads them (the endpoint's handlers).
//!
//! State: a `tokio::sync::watch` value (one prefix per family, in any order); readers
//! wait for a first value or for a change. Setting the same value again wakes nobody.

use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Clone)]
pub struct Vl3Prefixes {
    tx: Arc<watch::Sender<Vec<IpNet>>>,
}

impl fmt::Debug for Vl3Prefixes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Vl3Prefixes").field(&self.get()).finish()
    }
}

impl Default for Vl3Prefixes {
    fn default() -> Self {
        Self::new()
    }
}

impl Vl3Prefixes {
    /// None known yet.
    pub fn new() -> Self {
        Vl3Prefixes {
            tx: Arc::new(watch::Sender::new(Vec::new())),
        }
    }

    /// Known from the start (an endpoint configured with its prefixes).
    ///
    /// ```
    /// use nsm_sdk::ipam::Vl3Prefixes;
    /// let p = Vl3Prefixes::fixed(vec!["10.1.2.0/24".parse().unwrap()]);
    /// assert_eq!(p.get().len(), 1);
    /// ```
    pub fn fixed(prefixes: Vec<IpNet>) -> Self {
        let p = Self::new();
        p.set(prefixes);
        p
    }

    /// Replaces all prefixes (truncated to their networks).
    pub fn set(&self, prefixes: Vec<IpNet>) {
        let prefixes: Vec<IpNet> = prefixes.into_iter().map(|p| p.trunc()).collect();
        self.tx.send_if_modified(|cur| {
            if *cur == prefixes {
                return false;
            }
            *cur = prefixes;
            true
        });
    }

    /// Replaces the prefix of `prefix`'s family (adds it when the family has none).
    pub fn set_family(&self, prefix: IpNet) {
        let prefix = prefix.trunc();
        let mut all = self.get();
        all.retain(|p| p.max_prefix_len() != prefix.max_prefix_len());
        all.push(prefix);
        all.sort_by_key(|p| p.max_prefix_len());
        self.set(all);
    }

    /// The prefixes now (empty while none is known).
    pub fn get(&self) -> Vec<IpNet> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Vec<IpNet>> {
        self.tx.subscribe()
    }

    /// The prefixes, once at least one is known; Unavailable at `deadline` (no
    /// deadline: waits as long as it takes).
    pub async fn known(&self, deadline: Option<Instant>) -> Result<Vec<IpNet>> {
        let mut rx = self.subscribe();
        let wait = rx.wait_for(|p| !p.is_empty());
        let got = match deadline {
            Some(d) => tokio::time::timeout_at(d, wait).await.map_err(|_| {
                Error::unavailable("the vL3 prefix of this endpoint is not known yet")
            })?,
            None => wait.await,
        };
        got.map(|p| p.clone())
            .map_err(|_| Error::internal("vL3 prefixes dropped"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn readers_wait_for_the_first_prefix_or_their_deadline() {
        let p = Vl3Prefixes::new();
        let deadline = Instant::now() + Duration::from_millis(100);
        let err = p.known(Some(deadline)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        let setter = p.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            setter.set_family("10.0.1.7/24".parse().unwrap());
        });
        let got = p.known(None).await.unwrap();
        assert_eq!(got, ["10.0.1.0/24".parse::<IpNet>().unwrap()]);
        p.set_family("fd00::/120".parse().unwrap());
        p.set_family("10.0.2.0/24".parse().unwrap());
        assert_eq!(
            p.get(),
            [
                "10.0.2.0/24".parse::<IpNet>().unwrap(),
                "fd00::/120".parse().unwrap()
            ]
        );
    }
}
