//! `validate`: rejects registry entries that no store should keep.
//!
//! What it does: a Register or Unregister of an entry with an empty name fails with
//! InvalidArgument ("... has no name"), and so does a Register of an endpoint that
//! names no network service. Find passes through untouched (an empty template is a
//! valid query).
//!
//! State: none.
//!
//! Failure handled: malformed input from the wire is refused before any handler
//! after this one sees it.

use async_trait::async_trait;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

use super::{RegistryHandler, RegistryNext, Resource};
use crate::core::Cx;
use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
#[must_use]
pub struct Validate;

/// The `validate` handler, for network services and endpoints.
pub fn validate() -> Validate {
    Validate
}

fn named<R: Resource>(r: &R) -> Result<()> {
    if r.name().is_empty() {
        return Err(Error::invalid(format!("{} has no name", R::KIND)));
    }
    Ok(())
}

#[async_trait]
impl RegistryHandler<NetworkService> for Validate {
    async fn register(
        &self,
        cx: &mut Cx,
        r: NetworkService,
        next: RegistryNext<NetworkService>,
    ) -> Result<NetworkService> {
        named(&r)?;
        next.register(cx, r).await
    }

    async fn unregister(
        &self,
        cx: &mut Cx,
        r: NetworkService,
        next: RegistryNext<NetworkService>,
    ) -> Result<()> {
        named(&r)?;
        next.unregister(cx, r).await
    }
}

#[async_trait]
impl RegistryHandler<NetworkServiceEndpoint> for Validate {
    async fn register(
        &self,
        cx: &mut Cx,
        r: NetworkServiceEndpoint,
        next: RegistryNext<NetworkServiceEndpoint>,
    ) -> Result<NetworkServiceEndpoint> {
        named(&r)?;
        if r.network_service_names.is_empty() {
            return Err(Error::invalid(format!(
                "network service endpoint {:?} has no network service names",
                r.name
            )));
        }
        next.register(cx, r).await
    }

    async fn unregister(
        &self,
        cx: &mut Cx,
        r: NetworkServiceEndpoint,
        next: RegistryNext<NetworkServiceEndpoint>,
    ) -> Result<()> {
        named(&r)?;
        next.unregister(cx, r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::memory::memory;
    use crate::registry::{Query, RegistryChain};
    use futures::StreamExt;
    use tonic::Code;

    fn nse_chain() -> RegistryChain<NetworkServiceEndpoint> {
        RegistryChain::builder()
            .push(validate())
            .push(memory::<NetworkServiceEndpoint>())
            .build()
    }

    #[tokio::test]
    async fn entries_without_a_name_are_rejected() {
        let cx = &mut Cx::server();
        let ns = RegistryChain::builder()
            .push(validate())
            .push(memory::<NetworkService>())
            .build();
        let e = ns
            .register(cx, NetworkService::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("network service has no name"), "{e}");
        assert_eq!(
            ns.unregister(cx, NetworkService::default())
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );

        let nse = nse_chain();
        let unnamed = NetworkServiceEndpoint {
            network_service_names: vec!["s".into()],
            ..Default::default()
        };
        let e = nse.register(cx, unnamed.clone()).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("network service endpoint has no name"),
            "{e}"
        );
        assert_eq!(
            nse.unregister(cx, unnamed).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn an_endpoint_must_name_a_network_service_and_then_passes() {
        let cx = &mut Cx::server();
        let nse = nse_chain();
        let bare = NetworkServiceEndpoint {
            name: "nse-1".into(),
            ..Default::default()
        };
        let e = nse.register(cx, bare.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("no network service names"), "{e}");

        let good = NetworkServiceEndpoint {
            network_service_names: vec!["s".into()],
            ..bare.clone()
        };
        nse.register(cx, good).await.unwrap();
        nse.unregister(cx, bare).await.unwrap();
    }

    #[tokio::test]
    async fn find_with_an_empty_template_passes_through() {
        let cx = &mut Cx::server();
        let nse = nse_chain();
        let good = NetworkServiceEndpoint {
            name: "nse-1".into(),
            network_service_names: vec!["s".into()],
            ..Default::default()
        };
        nse.register(cx, good).await.unwrap();
        let mut s = nse.find(cx, Query::default()).await.unwrap();
        assert_eq!(s.next().await.unwrap().unwrap().resource.name, "nse-1");
        assert!(s.next().await.is_none());
    }
}
