//! The exact strings of NSM API v1 that mechanisms and payloads use on the wire
//! (`docs/WIRE.md`, "Mechanism constants"). Other implementations match on them, so
//! they are spelled here once and used everywhere else through these names; and the
//! bounds of what a peer may send ([`bounds`]).

pub mod bounds;

/// Mechanism classes (`Mechanism.cls`).
pub mod cls {
    /// A mechanism between a pod and its node's forwarder.
    pub const LOCAL: &str = "LOCAL";
    /// A mechanism between two forwarders (a tunnel across nodes).
    pub const REMOTE: &str = "REMOTE";
}

/// Mechanism types (`Mechanism.type`).
pub mod types {
    /// A kernel interface in the pod's network namespace.
    pub const KERNEL: &str = "KERNEL";
    /// A VXLAN tunnel.
    pub const VXLAN: &str = "VXLAN";
    /// No data plane at all (tests and control-plane-only meshes).
    pub const NOOP: &str = "NOOP";
    /// A shared-memory packet interface (VPP).
    pub const MEMIF: &str = "MEMIF";
    /// A WireGuard tunnel.
    pub const WIREGUARD: &str = "WIREGUARD";
    /// A VLAN sub-interface.
    pub const VLAN: &str = "VLAN";
}

/// Mechanism parameter keys (`Mechanism.parameters`).
pub mod params {
    /// Interface name (Linux limit: [`MAX_INTERFACE_NAME_LEN`](super::MAX_INTERFACE_NAME_LEN) bytes).
    pub const NAME: &str = "name";
    /// Inode number of the network namespace.
    pub const NETNS_INODE: &str = "netnsInode";
    /// URL of the network namespace file, e.g. `file:///proc/1234/ns/net`.
    pub const INODE_URL: &str = "inodeURL";
    /// Interface MTU.
    pub const MTU: &str = "MTU";
    /// Tunnel source IP.
    pub const SRC_IP: &str = "src_ip";
    /// Tunnel destination IP.
    pub const DST_IP: &str = "dst_ip";
    /// Tunnel source port.
    pub const SRC_PORT: &str = "src_port";
    /// Tunnel destination port.
    pub const DST_PORT: &str = "dst_port";
    /// VXLAN network identifier.
    pub const VNI: &str = "vni";
    /// Whether the kernel side supports VLAN sub-interfaces.
    pub const SUPPORTS_VLAN: &str = "supportsVlan";
    /// VLAN id (kernel).
    pub const VLAN: &str = "vlan";
}

/// Connection payloads (`Connection.payload`, `NetworkService.payload`).
pub mod payload {
    /// Layer 3: IP packets (the registry's default).
    pub const IP: &str = "IP";
    /// Layer 2: Ethernet frames.
    pub const ETHERNET: &str = "ETHERNET";
}

/// The longest Linux interface name, in bytes (`IFNAMSIZ` - 1).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;
