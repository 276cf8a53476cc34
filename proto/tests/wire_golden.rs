//! Golden bytes of the NSM API v1 wire contract (`docs/WIRE.md`).
//!
//! Every message type of the contract is built with a known value in every field and
//! its `encode_to_vec()` compared with bytes written here by hand from the field numbers
//! and wire types of docs/WIRE.md (tag byte = field << 3 | wire type; 0 = varint,
//! 2 = length-delimited; a map entry is an embedded message with key = 1, value = 2).
//! The golden bytes are literals, never produced by an encoder; nested messages reuse
//! the literal of the inner message. Each golden is also decoded back and compared with
//! the message. Then: enum values, gRPC service names and method paths (client and
//! server side), and the JSON mapping.
//!
//! Short strings used throughout: "k" = 0x6b, "v" = 0x76, and one letter per field.

use std::collections::HashMap;
use std::fmt::Debug;

use nsm_proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, Mechanism, MonitorScopeSelector, Path,
    PathSegment, State,
};
use nsm_proto::connectioncontext::{
    ip_family::Family, ConnectionContext, DnsConfig, DnsContext, EthernetContext,
    ExtraPrefixRequest, IpContext, IpFamily, IpNeighbor, PolicyRoute, Route,
};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{
    Destination, Match, Metadata, NetworkService, NetworkServiceEndpoint,
    NetworkServiceEndpointQuery, NetworkServiceEndpointResponse, NetworkServiceLabels,
    NetworkServiceQuery, NetworkServiceResponse,
};
use prost::Message;
use prost_types::Timestamp;

/// Concatenates literal byte pieces (the golden of an outer message is its own tags and
/// lengths, written here, around the literal goldens of its inner messages).
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `msg` encodes to exactly `golden`, and `golden` decodes to `msg`.
#[track_caller]
fn check<M: Message + Default + PartialEq + Debug>(msg: &M, golden: &[u8]) {
    let got = msg.encode_to_vec();
    assert_eq!(
        hex(&got),
        hex(golden),
        "encoding of {msg:?} differs from the golden bytes"
    );
    let back = M::decode(golden).expect("golden bytes decode");
    assert_eq!(&back, msg, "golden bytes decode to another message");
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn kv() -> HashMap<String, String> {
    HashMap::from([("k".to_string(), "v".to_string())])
}

fn s(x: &str) -> String {
    x.to_string()
}

// ---------------------------------------------------------------------------------
// Golden bytes, by hand.
// ---------------------------------------------------------------------------------

/// Map entry {"k": "v"}: 1:"k", 2:"v".
const KV_ENTRY: &[u8] = &[0x0a, 0x01, 0x6b, 0x12, 0x01, 0x76];

/// IpNeighbor { 1 ip: "a", 2 hardware_address: "b" }
const IP_NEIGHBOR: &[u8] = &[0x0a, 0x01, 0x61, 0x12, 0x01, 0x62];

/// Route { 1 prefix: "p", 2 nextHop: "n" }
const ROUTE: &[u8] = &[0x0a, 0x01, 0x70, 0x12, 0x01, 0x6e];

/// IpFamily { 1 family: IPV6 (1) }
const IP_FAMILY: &[u8] = &[0x08, 0x01];

/// ExtraPrefixRequest { 1 addr_family: {IPV6}, 2 prefix_len: 24, 3 required_number: 2,
/// 4 requested_number: 3 }
const EXTRA_PREFIX_REQUEST: &[u8] = &[
    0x0a, 0x02, 0x08, 0x01, // 1: IpFamily {family: 1}
    0x10, 0x18, // 2: 24
    0x18, 0x02, // 3: 2
    0x20, 0x03, // 4: 3
];

/// PolicyRoute { 1 from: "f", 2 proto: "t", 3 dst_port: "d", 4 src_port: "s",
/// 5 routes: [ROUTE] }
const POLICY_ROUTE: &[u8] = &[
    0x0a, 0x01, 0x66, // 1: "f"
    0x12, 0x01, 0x74, // 2: "t"
    0x1a, 0x01, 0x64, // 3: "d"
    0x22, 0x01, 0x73, // 4: "s"
    0x2a, 0x06, 0x0a, 0x01, 0x70, 0x12, 0x01, 0x6e, // 5: Route {p, n}
];

/// DNSConfig { 1 dns_server_ips: ["d"], 2 search_domains: ["s"] }
const DNS_CONFIG: &[u8] = &[0x0a, 0x01, 0x64, 0x12, 0x01, 0x73];

/// EthernetContext { 1 src_mac: "s", 2 dst_mac: "d", 3 vlan_tag: 100 }
const ETHERNET_CONTEXT: &[u8] = &[0x0a, 0x01, 0x73, 0x12, 0x01, 0x64, 0x18, 0x64];

/// google.protobuf.Timestamp { 1 seconds: 300, 2 nanos: 5 } (300 = varint ac 02)
const TS_300_5: &[u8] = &[0x08, 0xac, 0x02, 0x10, 0x05];

/// Mechanism { 1 cls: "c", 2 type: "t", 3 parameters: {"k": "v"} } (14 bytes)
const MECHANISM: &[u8] = &[
    0x0a, 0x01, 0x63, // 1: "c"
    0x12, 0x01, 0x74, // 2: "t"
    0x1a, 0x06, 0x0a, 0x01, 0x6b, 0x12, 0x01, 0x76, // 3: entry {k: v}
];

/// PathSegment { 1 name: "n", 2 id: "i", 3 token: "t", 4 expires: {300 s, 5 ns},
/// 5 metrics: {"k": "v"} } (24 bytes)
const PATH_SEGMENT: &[u8] = &[
    0x0a, 0x01, 0x6e, // 1: "n"
    0x12, 0x01, 0x69, // 2: "i"
    0x1a, 0x01, 0x74, // 3: "t"
    0x22, 0x05, 0x08, 0xac, 0x02, 0x10, 0x05, // 4: Timestamp {300, 5}
    0x2a, 0x06, 0x0a, 0x01, 0x6b, 0x12, 0x01, 0x76, // 5: entry {k: v}
];

/// Metadata / NetworkServiceLabels { 1 labels: {"k": "v"} } (8 bytes)
const LABELS: &[u8] = &[0x0a, 0x06, 0x0a, 0x01, 0x6b, 0x12, 0x01, 0x76];

/// Destination { 1 destination_selector: {"k": "v"}, 2 weight: 5 } (10 bytes)
const DESTINATION: &[u8] = &[
    0x0a, 0x06, 0x0a, 0x01, 0x6b, 0x12, 0x01, 0x76, // 1: entry {k: v}
    0x10, 0x05, // 2: 5
];

fn ip_context_golden() -> Vec<u8> {
    // IPContext, 74 bytes.
    cat(&[
        &[0x0a, 0x01, 0x73],  // 1 src_ip_addrs: ["s"]
        &[0x12, 0x01, 0x64],  // 2 dst_ip_addrs: ["d"]
        &[0x18, 0x01],        // 3 src_ip_required: true
        &[0x20, 0x01],        // 4 dst_ip_required: true
        &[0x2a, 0x06],        // 5 src_routes: [Route]
        ROUTE,                //
        &[0x32, 0x06],        // 6 dst_routes: [Route]
        ROUTE,                //
        &[0x3a, 0x01, 0x65],  // 7 excluded_prefixes: ["e"]
        &[0x42, 0x06],        // 8 ip_neighbors: [IpNeighbor]
        IP_NEIGHBOR,          //
        &[0x4a, 0x0a],        // 9 extra_prefix_request: [ExtraPrefixRequest]
        EXTRA_PREFIX_REQUEST, //
        &[0x52, 0x01, 0x78],  // 10 extra_prefixes: ["x"]
        &[0x5a, 0x14],        // 11 policies: [PolicyRoute] (20 bytes)
        POLICY_ROUTE,         //
    ])
}

fn dns_context_golden() -> Vec<u8> {
    // DNSContext { 1 configs: [DNSConfig] }, 8 bytes.
    cat(&[&[0x0a, 0x06], DNS_CONFIG])
}

fn connection_context_golden() -> Vec<u8> {
    // ConnectionContext, 107 bytes.
    cat(&[
        &[0x0a, 0x4a], // 1 ip_context (74 bytes)
        &ip_context_golden(),
        &[0x12, 0x08], // 2 dns_context (8 bytes)
        &dns_context_golden(),
        &[0x1a, 0x08], // 3 ethernet_context (8 bytes)
        ETHERNET_CONTEXT,
        &[0x22, 0x06], // 4 extra_context: entry {k: v}
        KV_ENTRY,
        &[0x28, 0xdc, 0x0b], // 5 MTU: 1500 (varint dc 0b)
    ])
}

fn path_golden() -> Vec<u8> {
    // Path { 1 index: 1, 2 path_segments: [PathSegment] }, 28 bytes.
    cat(&[&[0x08, 0x01], &[0x12, 0x18], PATH_SEGMENT])
}

fn connection_golden() -> Vec<u8> {
    // Connection, 177 bytes.
    cat(&[
        &[0x0a, 0x01, 0x69], // 1 id: "i"
        &[0x12, 0x01, 0x73], // 2 network_service: "s"
        &[0x1a, 0x0e],       // 3 mechanism (14 bytes)
        MECHANISM,
        &[0x22, 0x6b], // 4 context (107 bytes)
        &connection_context_golden(),
        &[0x2a, 0x06], // 5 labels: entry {k: v}
        KV_ENTRY,
        &[0x32, 0x1c], // 6 path (28 bytes)
        &path_golden(),
        &[0x3a, 0x01, 0x65], // 7 network_service_endpoint_name: "e"
        &[0x42, 0x01, 0x70], // 8 payload: "p"
        &[0x48, 0x03],       // 9 state: RESELECT_REQUESTED (3)
    ])
}

fn match_golden() -> Vec<u8> {
    // Match, 32 bytes.
    cat(&[
        &[0x0a, 0x06], // 1 source_selector: entry {k: v}
        KV_ENTRY,
        &[0x12, 0x0a], // 2 routes: [Destination] (10 bytes)
        DESTINATION,
        &[0x18, 0x01], // 3 fallthrough: true
        &[0x22, 0x08], // 4 metadata (8 bytes)
        LABELS,
    ])
}

fn network_service_golden() -> Vec<u8> {
    // NetworkService, 43 bytes.
    cat(&[
        &[0x0a, 0x01, 0x6e], // 1 name: "n"
        &[0x12, 0x01, 0x70], // 2 payload: "p"
        &[0x1a, 0x20],       // 3 matches: [Match] (32 bytes)
        &match_golden(),
        &[0x22, 0x01, 0x69], // 4 path_ids: ["i"]
    ])
}

fn nse_golden() -> Vec<u8> {
    // NetworkServiceEndpoint, 39 bytes.
    cat(&[
        &[0x0a, 0x01, 0x6e], // 1 name: "n"
        &[0x12, 0x01, 0x73], // 2 network_service_names: ["s"]
        // 3 network_service_labels: entry {1: "s", 2: NetworkServiceLabels} (13 bytes)
        &[0x1a, 0x0d, 0x0a, 0x01, 0x73, 0x12, 0x08],
        LABELS,
        &[0x22, 0x01, 0x75],                   // 4 url: "u"
        &[0x2a, 0x04, 0x08, 0x01, 0x10, 0x02], // 5 expiration_time: {1 s, 2 ns}
        &[0x32, 0x04, 0x08, 0x03, 0x10, 0x04], // 6 initial_registration_time: {3 s, 4 ns}
        &[0x3a, 0x01, 0x69],                   // 7 path_ids: ["i"]
    ])
}

// ---------------------------------------------------------------------------------
// Messages with a known value in every field.
// ---------------------------------------------------------------------------------

fn ip_neighbor() -> IpNeighbor {
    IpNeighbor {
        ip: s("a"),
        hardware_address: s("b"),
    }
}

fn route() -> Route {
    Route {
        prefix: s("p"),
        next_hop: s("n"),
    }
}

fn ip_family() -> IpFamily {
    IpFamily {
        family: Family::Ipv6 as i32,
    }
}

fn extra_prefix_request() -> ExtraPrefixRequest {
    ExtraPrefixRequest {
        addr_family: Some(ip_family()),
        prefix_len: 24,
        required_number: 2,
        requested_number: 3,
    }
}

fn policy_route() -> PolicyRoute {
    PolicyRoute {
        from: s("f"),
        proto: s("t"),
        dst_port: s("d"),
        src_port: s("s"),
        routes: vec![route()],
    }
}

fn ip_context() -> IpContext {
    IpContext {
        src_ip_addrs: vec![s("s")],
        dst_ip_addrs: vec![s("d")],
        src_ip_required: true,
        dst_ip_required: true,
        src_routes: vec![route()],
        dst_routes: vec![route()],
        excluded_prefixes: vec![s("e")],
        ip_neighbors: vec![ip_neighbor()],
        extra_prefix_request: vec![extra_prefix_request()],
        extra_prefixes: vec![s("x")],
        policies: vec![policy_route()],
    }
}

fn dns_config() -> DnsConfig {
    DnsConfig {
        dns_server_ips: vec![s("d")],
        search_domains: vec![s("s")],
    }
}

fn dns_context() -> DnsContext {
    DnsContext {
        configs: vec![dns_config()],
    }
}

fn ethernet_context() -> EthernetContext {
    EthernetContext {
        src_mac: s("s"),
        dst_mac: s("d"),
        vlan_tag: 100,
    }
}

fn connection_context() -> ConnectionContext {
    ConnectionContext {
        ip_context: Some(ip_context()),
        dns_context: Some(dns_context()),
        ethernet_context: Some(ethernet_context()),
        extra_context: kv(),
        mtu: 1500,
    }
}

fn mechanism() -> Mechanism {
    Mechanism {
        cls: s("c"),
        r#type: s("t"),
        parameters: kv(),
    }
}

fn path_segment() -> PathSegment {
    PathSegment {
        name: s("n"),
        id: s("i"),
        token: s("t"),
        expires: Some(Timestamp {
            seconds: 300,
            nanos: 5,
        }),
        metrics: kv(),
    }
}

fn path() -> Path {
    Path {
        index: 1,
        path_segments: vec![path_segment()],
    }
}

fn connection() -> Connection {
    Connection {
        id: s("i"),
        network_service: s("s"),
        mechanism: Some(mechanism()),
        context: Some(connection_context()),
        labels: kv(),
        path: Some(path()),
        network_service_endpoint_name: s("e"),
        payload: s("p"),
        state: State::ReselectRequested as i32,
    }
}

fn labels() -> Metadata {
    Metadata { labels: kv() }
}

fn destination() -> Destination {
    Destination {
        destination_selector: kv(),
        weight: 5,
    }
}

fn r#match() -> Match {
    Match {
        source_selector: kv(),
        routes: vec![destination()],
        fallthrough: true,
        metadata: Some(labels()),
    }
}

fn network_service() -> NetworkService {
    NetworkService {
        name: s("n"),
        payload: s("p"),
        matches: vec![r#match()],
        path_ids: vec![s("i")],
    }
}

fn nse() -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        name: s("n"),
        network_service_names: vec![s("s")],
        network_service_labels: HashMap::from([(s("s"), NetworkServiceLabels { labels: kv() })]),
        url: s("u"),
        expiration_time: Some(Timestamp {
            seconds: 1,
            nanos: 2,
        }),
        initial_registration_time: Some(Timestamp {
            seconds: 3,
            nanos: 4,
        }),
        path_ids: vec![s("i")],
    }
}

// ---------------------------------------------------------------------------------
// connectioncontext
// ---------------------------------------------------------------------------------

#[test]
fn connectioncontext_ip_neighbor() {
    check(&ip_neighbor(), IP_NEIGHBOR);
}

#[test]
fn connectioncontext_route() {
    check(&route(), ROUTE);
}

#[test]
fn connectioncontext_ip_family() {
    check(&ip_family(), IP_FAMILY);
    // IPV4 is the default (0): proto3 leaves it off the wire.
    check(
        &IpFamily {
            family: Family::Ipv4 as i32,
        },
        &[],
    );
}

#[test]
fn connectioncontext_extra_prefix_request() {
    check(&extra_prefix_request(), EXTRA_PREFIX_REQUEST);
}

#[test]
fn connectioncontext_policy_route() {
    check(&policy_route(), POLICY_ROUTE);
}

#[test]
fn connectioncontext_ip_context() {
    let golden = ip_context_golden();
    assert_eq!(golden.len(), 74);
    check(&ip_context(), &golden);
}

#[test]
fn connectioncontext_dns_config() {
    check(&dns_config(), DNS_CONFIG);
}

#[test]
fn connectioncontext_dns_context() {
    check(&dns_context(), &dns_context_golden());
}

#[test]
fn connectioncontext_ethernet_context() {
    check(&ethernet_context(), ETHERNET_CONTEXT);
    // vlan_tag is an int32, not a sint32: -1 is a 10-byte varint, not zigzag 01.
    check(
        &EthernetContext {
            vlan_tag: -1,
            ..Default::default()
        },
        &[
            0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
    );
}

#[test]
fn connectioncontext_connection_context() {
    let golden = connection_context_golden();
    assert_eq!(golden.len(), 107);
    check(&connection_context(), &golden);
}

// ---------------------------------------------------------------------------------
// connection
// ---------------------------------------------------------------------------------

#[test]
fn connection_mechanism() {
    check(&mechanism(), MECHANISM);
}

#[test]
fn well_known_timestamp() {
    check(
        &Timestamp {
            seconds: 300,
            nanos: 5,
        },
        TS_300_5,
    );
}

#[test]
fn connection_path_segment() {
    check(&path_segment(), PATH_SEGMENT);
}

#[test]
fn connection_path() {
    check(&path(), &path_golden());
}

#[test]
fn connection_connection() {
    let golden = connection_golden();
    assert_eq!(golden.len(), 177);
    check(&connection(), &golden);
}

#[test]
fn connection_connection_event() {
    let event = ConnectionEvent {
        r#type: ConnectionEventType::Delete as i32,
        connections: HashMap::from([(
            s("k"),
            Connection {
                id: s("i"),
                ..Default::default()
            },
        )]),
    };
    let golden = [
        0x08, 0x02, // 1 type: DELETE (2)
        0x12, 0x08, // 2 connections: entry (8 bytes)
        0x0a, 0x01, 0x6b, //   1 key: "k"
        0x12, 0x03, 0x0a, 0x01, 0x69, //   2 value: Connection {1 id: "i"}
    ];
    check(&event, &golden);

    // A full connection as the value: the entry's length takes two varint bytes.
    let event = ConnectionEvent {
        r#type: ConnectionEventType::Update as i32,
        connections: HashMap::from([(s("k"), connection())]),
    };
    let golden = cat(&[
        &[0x08, 0x01],       // 1 type: UPDATE (1)
        &[0x12, 0xb7, 0x01], // 2 connections: entry (183 bytes)
        &[0x0a, 0x01, 0x6b], //   1 key: "k"
        &[0x12, 0xb1, 0x01], //   2 value: Connection (177 bytes)
        &connection_golden(),
    ]);
    check(&event, &golden);
}

#[test]
fn connection_monitor_scope_selector() {
    let sel = MonitorScopeSelector {
        path_segments: vec![path_segment()],
        network_services: vec![s("s")],
    };
    let golden = cat(&[
        &[0x0a, 0x18], // 1 path_segments: [PathSegment] (24 bytes)
        PATH_SEGMENT,
        &[0x12, 0x01, 0x73], // 2 network_services: ["s"]
    ]);
    check(&sel, &golden);
}

// ---------------------------------------------------------------------------------
// networkservice
// ---------------------------------------------------------------------------------

#[test]
fn networkservice_network_service_request() {
    let req = NetworkServiceRequest {
        connection: Some(connection()),
        mechanism_preferences: vec![mechanism()],
    };
    let golden = cat(&[
        &[0x0a, 0xb1, 0x01], // 1 connection (177 bytes)
        &connection_golden(),
        &[0x12, 0x0e], // 2 mechanism_preferences: [Mechanism] (14 bytes)
        MECHANISM,
    ]);
    check(&req, &golden);
}

// ---------------------------------------------------------------------------------
// registry
// ---------------------------------------------------------------------------------

#[test]
fn registry_metadata_and_labels() {
    check(&labels(), LABELS);
    check(&NetworkServiceLabels { labels: kv() }, LABELS);
}

#[test]
fn registry_destination() {
    check(&destination(), DESTINATION);
}

#[test]
fn registry_match() {
    check(&r#match(), &match_golden());
}

#[test]
fn registry_network_service() {
    let golden = network_service_golden();
    assert_eq!(golden.len(), 43);
    check(&network_service(), &golden);
}

#[test]
fn registry_network_service_endpoint() {
    let golden = nse_golden();
    assert_eq!(golden.len(), 39);
    check(&nse(), &golden);
}

#[test]
fn registry_queries_and_responses() {
    let ns = cat(&[&[0x0a, 0x2b], &network_service_golden(), &[0x10, 0x01]]);
    let nse_bytes = cat(&[&[0x0a, 0x27], &nse_golden(), &[0x10, 0x01]]);
    check(
        &NetworkServiceQuery {
            network_service: Some(network_service()),
            watch: true,
        },
        &ns,
    );
    check(
        &NetworkServiceResponse {
            network_service: Some(network_service()),
            deleted: true,
        },
        &ns,
    );
    check(
        &NetworkServiceEndpointQuery {
            network_service_endpoint: Some(nse()),
            watch: true,
        },
        &nse_bytes,
    );
    check(
        &NetworkServiceEndpointResponse {
            network_service_endpoint: Some(nse()),
            deleted: true,
        },
        &nse_bytes,
    );
}

#[test]
fn empty_messages_encode_to_nothing() {
    check(&Connection::default(), &[]);
    check(&NetworkServiceRequest::default(), &[]);
    check(&NetworkServiceEndpoint::default(), &[]);
    check(&ConnectionEvent::default(), &[]);
}

// ---------------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------------

#[test]
fn enum_values() {
    assert_eq!(State::Up as i32, 0);
    assert_eq!(State::Down as i32, 1);
    assert_eq!(State::RefreshRequested as i32, 2);
    assert_eq!(State::ReselectRequested as i32, 3);
    for (v, name) in [
        (State::Up, "UP"),
        (State::Down, "DOWN"),
        (State::RefreshRequested, "REFRESH_REQUESTED"),
        (State::ReselectRequested, "RESELECT_REQUESTED"),
    ] {
        assert_eq!(v.as_str_name(), name);
        assert_eq!(State::from_str_name(name), Some(v));
    }

    assert_eq!(ConnectionEventType::InitialStateTransfer as i32, 0);
    assert_eq!(ConnectionEventType::Update as i32, 1);
    assert_eq!(ConnectionEventType::Delete as i32, 2);
    for (v, name) in [
        (
            ConnectionEventType::InitialStateTransfer,
            "INITIAL_STATE_TRANSFER",
        ),
        (ConnectionEventType::Update, "UPDATE"),
        (ConnectionEventType::Delete, "DELETE"),
    ] {
        assert_eq!(v.as_str_name(), name);
        assert_eq!(ConnectionEventType::from_str_name(name), Some(v));
    }

    assert_eq!(Family::Ipv4 as i32, 0);
    assert_eq!(Family::Ipv6 as i32, 1);
    assert_eq!(Family::Ipv4.as_str_name(), "IPV4");
    assert_eq!(Family::Ipv6.as_str_name(), "IPV6");

    // On the wire: state 1..3 and event types 1..2 as varints.
    for (state, byte) in [
        (State::Down, 1u8),
        (State::RefreshRequested, 2),
        (State::ReselectRequested, 3),
    ] {
        check(
            &Connection {
                state: state as i32,
                ..Default::default()
            },
            &[0x48, byte],
        );
    }
    check(
        &ConnectionEvent {
            r#type: ConnectionEventType::Update as i32,
            ..Default::default()
        },
        &[0x08, 0x01],
    );
}

// ---------------------------------------------------------------------------------
// gRPC services: names and method paths
// ---------------------------------------------------------------------------------

mod grpc {
    use std::convert::Infallible;
    use std::future::Future;

    use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
    use nsm_proto::connection::monitor_connection_server::{
        MonitorConnection, MonitorConnectionServer,
    };
    use nsm_proto::connection::{Connection, ConnectionEvent, MonitorScopeSelector};
    use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
    use nsm_proto::networkservice::network_service_server::{
        NetworkService as NetworkServiceRpc, NetworkServiceServer,
    };
    use nsm_proto::networkservice::NetworkServiceRequest;
    use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
    use nsm_proto::registry::network_service_endpoint_registry_server::{
        NetworkServiceEndpointRegistry, NetworkServiceEndpointRegistryServer,
    };
    use nsm_proto::registry::network_service_registry_client::NetworkServiceRegistryClient;
    use nsm_proto::registry::network_service_registry_server::{
        NetworkServiceRegistry, NetworkServiceRegistryServer,
    };
    use nsm_proto::registry::{
        NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery,
        NetworkServiceEndpointResponse, NetworkServiceQuery, NetworkServiceResponse,
    };
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::codegen::{http, tokio_stream, Service};
    use tonic::server::NamedService;
    use tonic::{Code, Request, Response, Status};
    use tonic_prost::ProstCodec;

    type Empty<T> = tokio_stream::Empty<Result<T, Status>>;

    /// Answers every method with `Internal("hit <Method>")`, so a test sees which
    /// method a path reached.
    struct Hit;

    fn hit<T>(method: &str) -> Result<T, Status> {
        Err(Status::internal(format!("hit {method}")))
    }

    #[tonic::async_trait]
    impl NetworkServiceRpc for Hit {
        async fn request(
            &self,
            _: Request<NetworkServiceRequest>,
        ) -> Result<Response<Connection>, Status> {
            hit("Request")
        }
        async fn close(&self, _: Request<Connection>) -> Result<Response<()>, Status> {
            hit("Close")
        }
    }

    #[tonic::async_trait]
    impl MonitorConnection for Hit {
        type MonitorConnectionsStream = Empty<ConnectionEvent>;
        async fn monitor_connections(
            &self,
            _: Request<MonitorScopeSelector>,
        ) -> Result<Response<Self::MonitorConnectionsStream>, Status> {
            hit("MonitorConnections")
        }
    }

    /// A registry server (`$registry`, of `$item`s) whose every method fails with
    /// "hit `$what` <method>".
    macro_rules! hit_registry {
        ($registry:ident, $item:ty, $query:ty, $response:ty, $what:literal) => {
            #[tonic::async_trait]
            impl $registry for Hit {
                type FindStream = Empty<$response>;
                async fn register(&self, _: Request<$item>) -> Result<Response<$item>, Status> {
                    hit(concat!($what, " Register"))
                }
                async fn find(
                    &self,
                    _: Request<$query>,
                ) -> Result<Response<Self::FindStream>, Status> {
                    hit(concat!($what, " Find"))
                }
                async fn unregister(&self, _: Request<$item>) -> Result<Response<()>, Status> {
                    hit(concat!($what, " Unregister"))
                }
            }
        };
    }

    hit_registry!(
        NetworkServiceRegistry,
        NetworkService,
        NetworkServiceQuery,
        NetworkServiceResponse,
        "ns"
    );
    hit_registry!(
        NetworkServiceEndpointRegistry,
        NetworkServiceEndpoint,
        NetworkServiceEndpointQuery,
        NetworkServiceEndpointResponse,
        "nse"
    );

    #[test]
    fn service_names() {
        assert_eq!(
            <NetworkServiceServer<Hit> as NamedService>::NAME,
            "networkservice.NetworkService"
        );
        assert_eq!(
            <MonitorConnectionServer<Hit> as NamedService>::NAME,
            "connection.MonitorConnection"
        );
        assert_eq!(
            <NetworkServiceRegistryServer<Hit> as NamedService>::NAME,
            "registry.NetworkServiceRegistry"
        );
        assert_eq!(
            <NetworkServiceEndpointRegistryServer<Hit> as NamedService>::NAME,
            "registry.NetworkServiceEndpointRegistry"
        );
    }

    /// Records the path of each HTTP/2 request a generated client sends, and answers
    /// Unimplemented.
    #[derive(Clone, Default)]
    struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl Service<http::Request<tonic::body::Body>> for Recorder {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            self.0.lock().unwrap().push(req.uri().path().to_string());
            let mut resp = http::Response::new(tonic::body::Body::default());
            resp.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            resp.headers_mut()
                .insert("grpc-status", "12".parse().unwrap());
            std::future::ready(Ok(resp))
        }
    }

    async fn fails<T>(f: impl Future<Output = Result<T, Status>>) {
        assert!(
            f.await.is_err(),
            "the recorder answers every call with an error"
        );
    }

    #[tokio::test]
    async fn generated_clients_call_the_method_paths_of_the_contract() {
        let rec = Recorder::default();
        let mut ns = NetworkServiceClient::new(rec.clone());
        fails(ns.request(NetworkServiceRequest::default())).await;
        fails(ns.close(Connection::default())).await;
        let mut mon = MonitorConnectionClient::new(rec.clone());
        fails(mon.monitor_connections(MonitorScopeSelector::default())).await;
        let mut nsr = NetworkServiceRegistryClient::new(rec.clone());
        fails(nsr.register(NetworkService::default())).await;
        fails(nsr.find(NetworkServiceQuery::default())).await;
        fails(nsr.unregister(NetworkService::default())).await;
        let mut nser = NetworkServiceEndpointRegistryClient::new(rec.clone());
        fails(nser.register(NetworkServiceEndpoint::default())).await;
        fails(nser.find(NetworkServiceEndpointQuery::default())).await;
        fails(nser.unregister(NetworkServiceEndpoint::default())).await;
        assert_eq!(
            *rec.0.lock().unwrap(),
            [
                "/networkservice.NetworkService/Request",
                "/networkservice.NetworkService/Close",
                "/connection.MonitorConnection/MonitorConnections",
                "/registry.NetworkServiceRegistry/Register",
                "/registry.NetworkServiceRegistry/Find",
                "/registry.NetworkServiceRegistry/Unregister",
                "/registry.NetworkServiceEndpointRegistry/Register",
                "/registry.NetworkServiceEndpointRegistry/Find",
                "/registry.NetworkServiceEndpointRegistry/Unregister",
            ]
        );
    }

    /// A generated server, as the in-process gRPC client of these tests calls it.
    trait Served:
        Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future: Send,
        > + Send
        + 'static
    {
    }

    impl<S> Served for S
    where
        S: Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send,
    {
    }

    /// Calls `server` on the literal `path` with a unary call; returns the status.
    async fn unary<S, Req, Resp>(server: S, path: &'static str, req: Req) -> Status
    where
        S: Served,
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(server);
        grpc.ready()
            .await
            .expect("a generated server is always ready");
        let out: Result<Response<Resp>, Status> = grpc
            .unary(
                Request::new(req),
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Resp>::default(),
            )
            .await;
        match out {
            Ok(_) => panic!("every method answers an error"),
            Err(status) => status,
        }
    }

    /// Calls `server` on the literal `path` with a server-streaming call; returns the
    /// status.
    async fn streaming<S, Req, Resp>(server: S, path: &'static str, req: Req) -> Status
    where
        S: Served,
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(server);
        grpc.ready()
            .await
            .expect("a generated server is always ready");
        let out = grpc
            .server_streaming(
                Request::new(req),
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Resp>::default(),
            )
            .await;
        match out {
            Ok(_) => panic!("every method answers an error"),
            Err(status) => status,
        }
    }

    #[track_caller]
    fn reached(status: Status, method: &str) {
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert_eq!(status.message(), format!("hit {method}"));
    }

    /// Register, Find and Unregister of one generated registry server (`$service`, of
    /// `$item`s) reach its handler as `$what Register` and so on.
    macro_rules! registry_reached {
        ($server:expr, $service:literal, $item:ty, $query:ty, $response:ty, $what:literal) => {{
            let server = $server;
            reached(
                unary::<_, $item, $item>(
                    server.clone(),
                    concat!("/", $service, "/Register"),
                    <$item>::default(),
                )
                .await,
                concat!($what, " Register"),
            );
            reached(
                streaming::<_, $query, $response>(
                    server.clone(),
                    concat!("/", $service, "/Find"),
                    <$query>::default(),
                )
                .await,
                concat!($what, " Find"),
            );
            reached(
                unary::<_, $item, ()>(
                    server,
                    concat!("/", $service, "/Unregister"),
                    <$item>::default(),
                )
                .await,
                concat!($what, " Unregister"),
            );
        }};
    }

    #[tokio::test]
    async fn generated_servers_answer_the_method_paths_of_the_contract() {
        let ns = NetworkServiceServer::new(Hit);
        reached(
            unary::<_, NetworkServiceRequest, Connection>(
                ns.clone(),
                "/networkservice.NetworkService/Request",
                NetworkServiceRequest::default(),
            )
            .await,
            "Request",
        );
        reached(
            unary::<_, Connection, ()>(
                ns.clone(),
                "/networkservice.NetworkService/Close",
                Connection::default(),
            )
            .await,
            "Close",
        );
        // A path outside the contract is Unimplemented.
        let other = unary::<_, Connection, ()>(
            ns,
            "/networkservice.NetworkService/Other",
            Connection::default(),
        )
        .await;
        assert_eq!(other.code(), Code::Unimplemented);

        reached(
            streaming::<_, MonitorScopeSelector, ConnectionEvent>(
                MonitorConnectionServer::new(Hit),
                "/connection.MonitorConnection/MonitorConnections",
                MonitorScopeSelector::default(),
            )
            .await,
            "MonitorConnections",
        );

        registry_reached!(
            NetworkServiceRegistryServer::new(Hit),
            "registry.NetworkServiceRegistry",
            NetworkService,
            NetworkServiceQuery,
            NetworkServiceResponse,
            "ns"
        );
        registry_reached!(
            NetworkServiceEndpointRegistryServer::new(Hit),
            "registry.NetworkServiceEndpointRegistry",
            NetworkServiceEndpoint,
            NetworkServiceEndpointQuery,
            NetworkServiceEndpointResponse,
            "nse"
        );
    }
}

// ---------------------------------------------------------------------------------
// JSON mapping
// ---------------------------------------------------------------------------------

#[test]
fn json_uses_lower_camel_case_names_and_enum_names() {
    let json = nsm_proto::json::to_json("connection.Connection", &connection()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["networkServiceEndpointName"], "e", "{json}");
    assert_eq!(v["networkService"], "s", "{json}");
    assert_eq!(v["state"], "RESELECT_REQUESTED", "{json}");
    assert_eq!(v["labels"]["k"], "v", "{json}");
    assert_eq!(v["mechanism"]["type"], "t", "{json}");
    let seg = &v["path"]["pathSegments"][0];
    assert_eq!(seg["name"], "n", "{json}");
    assert_eq!(seg["expires"], "1970-01-01T00:05:00.000000005Z", "{json}");
    let ip = &v["context"]["ipContext"];
    assert_eq!(ip["srcIpAddrs"][0], "s", "{json}");
    assert_eq!(ip["srcRoutes"][0]["nextHop"], "n", "{json}");
    assert_eq!(
        ip["extraPrefixRequest"][0]["addrFamily"]["family"], "IPV6",
        "{json}"
    );
    assert_eq!(v["context"]["ethernetContext"]["vlanTag"], 100, "{json}");
    // proto field `MTU`: its JSON name keeps the capitals (protoc's rule).
    assert_eq!(v["context"]["MTU"], 1500, "{json}");
    for snake in [
        "network_service_endpoint_name",
        "path_segments",
        "ip_context",
        "src_ip_addrs",
    ] {
        assert!(!json.contains(snake), "{snake} in {json}");
    }
    let back: Connection = nsm_proto::json::from_json("connection.Connection", &json).unwrap();
    assert_eq!(back, connection());

    // Enums by name elsewhere too; a default state (UP) is left out.
    let down = Connection {
        state: State::Down as i32,
        ..Default::default()
    };
    assert_eq!(
        nsm_proto::json::to_json("connection.Connection", &down).unwrap(),
        r#"{"state":"DOWN"}"#
    );
    let event = ConnectionEvent {
        r#type: ConnectionEventType::Update as i32,
        ..Default::default()
    };
    assert_eq!(
        nsm_proto::json::to_json("connection.ConnectionEvent", &event).unwrap(),
        r#"{"type":"UPDATE"}"#
    );
    let json = nsm_proto::json::to_json("registry.NetworkServiceEndpoint", &nse()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["networkServiceNames"][0], "s", "{json}");
    assert_eq!(v["networkServiceLabels"]["s"]["labels"]["k"], "v", "{json}");
    assert_eq!(
        v["expirationTime"], "1970-01-01T00:00:01.000000002Z",
        "{json}"
    );
}

// ---------------------------------------------------------------------------------
// ipam (optional): the vL3 prefix server
// ---------------------------------------------------------------------------------

/// `PrefixRequest { 1: Type type; 2: prefix; 3: repeated exclude_prefixes }` and
/// `PrefixResponse { 2: prefix; 3: repeated exclude_prefixes }` (no field 1), the
/// `Type` values, the service name and the JSON names.
#[test]
fn ipam_prefix_messages_and_service() {
    use nsm_proto::ipam::ipam_server::IpamServer;
    use nsm_proto::ipam::{PrefixRequest, PrefixResponse, Type};
    use tonic::server::NamedService;

    assert_eq!(Type::Undefined as i32, 0);
    assert_eq!(Type::Allocate as i32, 1);
    assert_eq!(Type::Delete as i32, 2);
    assert_eq!(Type::Allocate.as_str_name(), "ALLOCATE");
    check(
        &PrefixRequest {
            r#type: Type::Delete as i32,
            prefix: "p".into(),
            exclude_prefixes: vec!["a".into(), "b".into()],
        },
        &[
            0x08, 0x02, 0x12, 0x01, b'p', 0x1a, 0x01, b'a', 0x1a, 0x01, b'b',
        ],
    );
    check(
        &PrefixResponse {
            prefix: "p".into(),
            exclude_prefixes: vec!["e".into()],
        },
        &[0x12, 0x01, b'p', 0x1a, 0x01, b'e'],
    );
    struct Never;
    #[tonic::async_trait]
    impl nsm_proto::ipam::ipam_server::Ipam for Never {
        type ManagePrefixesStream = tonic::codegen::BoxStream<PrefixResponse>;
        async fn manage_prefixes(
            &self,
            _: tonic::Request<tonic::Streaming<PrefixRequest>>,
        ) -> Result<tonic::Response<Self::ManagePrefixesStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("never"))
        }
    }
    assert_eq!(<IpamServer<Never> as NamedService>::NAME, "ipam.IPAM");
    let json = nsm_proto::json::to_json(
        "ipam.PrefixRequest",
        &PrefixRequest {
            r#type: Type::Allocate as i32,
            prefix: "10.0.0.0/24".into(),
            exclude_prefixes: vec!["10.0.1.0/24".into()],
        },
    )
    .unwrap();
    assert!(json.contains("\"excludePrefixes\""), "{json}");
    assert!(json.contains("\"ALLOCATE\""), "{json}");
}
