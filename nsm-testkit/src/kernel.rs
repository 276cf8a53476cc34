//! The KERNEL mesh the kernel and VXLAN suites and benches build on the sandbox:
//! forwarders with the KERNEL mechanism, endpoints whose interfaces go into a pod,
//! clients whose interfaces go into a pod.

use nsm_sdk::chains::ClientOptions;
use nsm_sdk::handlers::mechanisms;
use nsm_sdk::sandbox::{EndpointSpec, Node, Sandbox, SandboxBuilder, Transport};
use nsm_sdk::wire::types;
use nsm_sdk_kernel::{kernel_client, kernel_endpoint, kernel_forwarder_mechanisms};

use crate::Ns;

/// A sandbox over unix sockets (as separate processes would talk) whose forwarders
/// have the KERNEL mechanism on both sides; give another data plane with
/// [`SandboxBuilder::forwarder_mechanisms`] (the last one given wins).
pub fn kernel_sandbox() -> SandboxBuilder {
    Sandbox::builder()
        .transport(Transport::Unix)
        .forwarder_mechanisms(|_| kernel_forwarder_mechanisms())
}

/// An endpoint `name` of `service` handing out point-to-point addresses from `prefix`,
/// its interfaces made in `pod` by `kernel_endpoint`.
///
/// # Panics
/// When `prefix` is not a CIDR (a mistake in the test).
pub fn kernel_nse(name: &str, service: &str, pod: &Ns, prefix: &str) -> EndpointSpec {
    let prefix = prefix
        .parse()
        .unwrap_or_else(|e| panic!("prefix {prefix}: {e}"));
    EndpointSpec::new(name, service)
        .ipam(prefix)
        .mechanisms(mechanisms().with(types::KERNEL, kernel_endpoint(pod.url())))
}

/// Options of a client called `nsc` on `node` whose interface goes into `pod`
/// (`kernel_client`, called `ifname` when given) and which offers nothing else, with no
/// retry (a failure reaches the test as it is).
pub fn kernel_nsc(node: &Node, pod: &Ns, ifname: Option<&str>) -> ClientOptions {
    let mut kernel = kernel_client(pod.url());
    if let Some(name) = ifname {
        kernel = kernel.ifname(name);
    }
    node.client_options("nsc")
        .retry(None)
        .mechanisms(vec![])
        .handler(kernel)
}
