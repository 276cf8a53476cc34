//! The example programs with the KERNEL data plane, as separate processes, as root.
//!
//! The "pods" are network namespaces made by the test (`ip netns add nsmt-<pid>-<n>`,
//! deleted by a guard even when the test fails, after it killed what runs inside).
//! `nsm-registry`, `nsmgr` and `nsm-forwarder` run in the host namespace; the endpoint
//! (`nse-icmp-responder`) and the client (`nsc`) each run inside a pod
//! (`ip netns exec <pod> ...`). They all talk over unix sockets in the test's temp
//! directory: a socket is a file, reachable from every network namespace. The
//! forwarder opens the pods' namespaces by the `file:///proc/<pid>/ns/net` URLs the
//! client and the endpoint send, and makes one veth pair per connection.
//!
//! What the kernel holds is read with `ip -j` (an independent observer), traffic is
//! checked with `ping` from inside the client's pod. Only 172.16.x.x addresses, only
//! inside the test's namespaces. Heal times are printed (`-- --nocapture`).
//!
//! The binaries are looked up in `target/<profile>/` (run `cargo build -p
//! nsm-examples --bins` after changing the examples; a missing one is built). Without
//! root (or without `ip`/`ping`) each test prints a skip line and passes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nsm_testkit::Ns as Pod;
use nsm_tests::{poll, Proc, TempDir};
use serde_json::Value;

/// How long a process may take to get ready, or to do what a step waits for.
const READY: Duration = Duration::from_secs(15);
/// How long a process may take to exit after SIGTERM.
/// How long a heal may take before the test fails.
const HEAL_WITHIN: Duration = Duration::from_secs(10);

const SERVICE_URL: &str = "kernel://icmp-responder/nsm-1";

macro_rules! require_root {
    () => {
        nsm_testkit::require_root!("kernel process tests")
    };
}

/// What these tests read of a pod beyond what the kit's [`Pod`] reads.
trait PodExt {
    fn mesh_links(&self) -> Vec<(String, u64)>;
    fn index_of(&self, dev: &str) -> Option<u64>;
    fn until_ping(&self, addr: &str, since: Instant, what: &str) -> Duration;
    fn until_empty(&self, what: &str);
}

impl PodExt for Pod {
    /// The links other than `lo`: (name, ifindex), sorted.
    fn mesh_links(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .json(&["link", "show"])
            .iter()
            .filter(|l| l["ifname"] != "lo")
            .map(|l| {
                (
                    l["ifname"].as_str().unwrap_or("?").to_string(),
                    l["ifindex"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// The ifindex of `dev`, if the pod has it.
    fn index_of(&self, dev: &str) -> Option<u64> {
        self.mesh_links()
            .into_iter()
            .find(|(n, _)| n == dev)
            .map(|(_, i)| i)
    }

    /// Polls until a ping to `addr` succeeds; fails the test after [`HEAL_WITHIN`].
    /// Prints and returns the time since `since`.
    fn until_ping(&self, addr: &str, since: Instant, what: &str) -> Duration {
        poll(
            HEAL_WITHIN,
            &format!("{what}: a working ping to {addr}"),
            || self.ping_with(&[addr]).then(|| since.elapsed()),
        );
        let took = since.elapsed();
        eprintln!("heal time ({what}): {took:?}");
        took
    }

    /// Polls until the pod has no link but `lo`.
    fn until_empty(&self, what: &str) {
        poll(
            READY,
            &format!("{what}: only lo left in {}", self.name),
            || self.mesh_links().is_empty().then_some(()),
        );
    }
}

/// The connections a client program prints on stdout, one JSON object a line.
trait Connections {
    fn next_connection(&mut self) -> Value;
    fn connection_where(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Value;
}

impl Connections for Proc {
    /// The next connection the process prints on stdout, parsed.
    fn next_connection(&mut self) -> Value {
        let line = self.next_stdout_line();
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{} printed no JSON ({e}): {line}", self.name()))
    }

    /// Reads printed connections until one satisfies `pred`, for at most `within`.
    fn connection_where(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let until = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.stdout_within(left) {
                Ok(line) => {
                    let conn: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                        panic!("{} printed no JSON ({e}): {line}", self.name())
                    });
                    if pred(&conn) {
                        return conn;
                    }
                    seen.push(line);
                }
                Err(e) => panic!(
                    "{} printed no matching connection within {within:?} ({e}); printed {seen:#?}",
                    self.name()
                ),
            }
        }
    }
}

/// Starts programs of one test: the host-side ones (registry, manager, forwarder) on
/// unix sockets in the test's directory, endpoints and clients inside pods.
struct Mesh {
    dir: TempDir,
    nsmgr_url: String,
    forwarder_url: String,
}

impl Mesh {
    fn new(test: &str) -> Mesh {
        let dir = TempDir::new("nsm-kernel", test);
        Mesh {
            nsmgr_url: dir.unix("nsmgr.sock"),
            forwarder_url: dir.unix("forwarder.sock"),
            dir,
        }
    }

    /// Starts `program` as `name` (inside `pod` when given) with `env`; its stderr goes
    /// to `<name>.log`, its stdout (when `capture_stdout`) to the connection readers.
    fn start(
        &self,
        program: &str,
        name: &str,
        pod: Option<&Pod>,
        env: &[(&str, &str)],
        capture_stdout: bool,
    ) -> Proc {
        let pod = pod.map(|p| p.name.as_str());
        nsm_tests::start_in(pod, &self.dir, program, name, env, capture_stdout, READY)
    }

    /// The registry and the manager, ready.
    fn control_plane(&self) -> (Proc, Proc) {
        let reg_url = self.dir.unix("registry.sock");
        let mut registry = self.start(
            "nsm-registry",
            "registry",
            None,
            &[("NSM_LISTEN_ON", &reg_url)],
            false,
        );
        registry.wait_for_log(&["serving", &reg_url]);
        let mut nsmgr = self.start(
            "nsmgr",
            "nsmgr",
            None,
            &[
                ("NSM_NAME", "nsmgr"),
                ("NSM_LISTEN_ON", &self.nsmgr_url),
                ("NSM_REGISTRY_URL", &reg_url),
            ],
            false,
        );
        nsmgr.wait_for_log(&["serving", &self.nsmgr_url]);
        (registry, nsmgr)
    }

    /// A forwarder in the host namespace on the forwarder URL, registered; `log` names
    /// its log file (a restarted forwarder gets a new one).
    fn forwarder(&self, log: &str) -> Proc {
        let mut p = self.start(
            "nsm-forwarder",
            log,
            None,
            &[
                ("NSM_NAME", "forwarder"),
                ("NSM_LISTEN_ON", &self.forwarder_url),
                ("NSM_CONNECT_TO", &self.nsmgr_url),
            ],
            false,
        );
        p.wait_for_log(&["registered endpoint", "name=forwarder"]);
        p
    }

    /// `nse-icmp-responder` named `name` inside `pod`, handing out `prefix`, registered.
    fn nse(&self, name: &str, pod: &Pod, prefix: &str) -> Proc {
        self.nse_with(name, pod, prefix, &[])
    }

    /// [`Mesh::nse`] with `extra` settings.
    fn nse_with(&self, name: &str, pod: &Pod, prefix: &str, extra: &[(&str, &str)]) -> Proc {
        let listen_on = self.dir.unix(&format!("{name}.sock"));
        let mut env = vec![
            ("NSM_NAME", name),
            ("NSM_LISTEN_ON", listen_on.as_str()),
            ("NSM_CONNECT_TO", self.nsmgr_url.as_str()),
            ("NSM_SERVICE_NAMES", "icmp-responder"),
            ("NSM_CIDR_PREFIX", prefix),
        ];
        env.extend_from_slice(extra);
        let mut p = self.start("nse-icmp-responder", name, Some(pod), &env, false);
        p.wait_for_log(&["registered endpoint", &format!("name={name}")]);
        p
    }

    /// `nsc` inside `pod`, requesting `url`, with `extra` settings.
    fn nsc(&self, pod: &Pod, url: &str, extra: &[(&str, &str)]) -> Proc {
        self.nsc_as("nsc", pod, url, extra)
    }

    /// [`Mesh::nsc`] whose log is `<log>.log` (its name and identity stay `nsc`).
    fn nsc_as(&self, log: &str, pod: &Pod, url: &str, extra: &[(&str, &str)]) -> Proc {
        let mut env = vec![
            ("NSM_NAME", "nsc"),
            ("NSM_CONNECT_TO", self.nsmgr_url.as_str()),
            ("NSM_NETWORK_SERVICES", url),
            ("NSM_REQUEST_TIMEOUT", "10s"),
        ];
        env.extend_from_slice(extra);
        self.start("nsc", log, Some(pod), &env, true)
    }
}

/// What runs a program as in a Kubernetes pod without privileges: in a pid namespace
/// of its own (its pid is 1 there, with its own `/proc`), with root's uid but every
/// capability dropped. `--kill-child`: the program dies with the wrapper.
const OWN_PID_NAMESPACE: &[&str] = &[
    "unshare",
    "--pid",
    "--fork",
    "--kill-child",
    "--mount-proc",
    "setpriv",
    "--no-new-privs",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--",
];

impl Mesh {
    /// [`Mesh::nsc`] in a pid namespace of its own, unprivileged ([`OWN_PID_NAMESPACE`]).
    fn nsc_in_own_pid_namespace(&self, pod: &Pod, url: &str) -> Proc {
        let env = [
            ("NSM_NAME", "nsc"),
            ("NSM_CONNECT_TO", self.nsmgr_url.as_str()),
            ("NSM_NETWORK_SERVICES", url),
            ("NSM_REQUEST_TIMEOUT", "10s"),
        ];
        nsm_tests::start_wrapped(
            Some(&pod.name),
            OWN_PID_NAMESPACE,
            &self.dir,
            "nsc",
            "nsc",
            &env,
            true,
            READY,
        )
    }
}

/// The pid (in the test's pid namespace) of the program `wrapper` runs as its child.
fn wrapped_pid(wrapper: &Proc) -> u32 {
    let children = format!("/proc/{0}/task/{0}/children", wrapper.pid());
    poll(READY, "the wrapped program", || {
        std::fs::read_to_string(&children)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The inode of a pod's network namespace.
fn netns_inode(pod: &Pod) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/run/netns/{}", pod.name))
        .expect("the pod's namespace file")
        .ino()
}

/// The names of the connection's path segments.
fn path_names(conn: &Value) -> Vec<String> {
    conn["path"]["pathSegments"]
        .as_array()
        .unwrap_or_else(|| panic!("no path segments in {conn}"))
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The first address of `field` (`srcIpAddrs`, `dstIpAddrs`) with its prefix length.
fn address(conn: &Value, field: &str) -> String {
    conn["context"]["ipContext"][field][0]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {conn}"))
        .to_string()
}

/// An address without its prefix length.
fn host(addr: &str) -> &str {
    addr.split('/').next().unwrap_or(addr)
}

/// Asserts a KERNEL connection nsc printed: the path through the mesh to `nse`, the
/// mechanism with interface `nsm-1` in the client's namespace, addresses from the
/// endpoint's prefix (starting with `net`). Returns (client address, endpoint
/// address), with prefix lengths.
fn check_kernel_connection(conn: &Value, nsc: &Proc, nse: &str, net: &str) -> (String, String) {
    assert_eq!(
        path_names(conn),
        ["nsc", "nsmgr", "forwarder", nse],
        "{conn}"
    );
    let m = &conn["mechanism"];
    assert_eq!(m["cls"], "LOCAL", "{conn}");
    assert_eq!(m["type"], "KERNEL", "{conn}");
    assert_eq!(m["parameters"]["name"], "nsm-1", "{conn}");
    assert_eq!(
        m["parameters"]["inodeURL"],
        format!("file:///proc/{}/ns/net", nsc.pid()),
        "the client's own namespace: {conn}"
    );
    let (src, dst) = (address(conn, "srcIpAddrs"), address(conn, "dstIpAddrs"));
    assert!(src.starts_with(net) && dst.starts_with(net), "{conn}");
    (src, dst)
}

/// One KERNEL connection between two pods, from the first request to the clean exit:
/// the interface is in the client's pod with its address, the ping works, and after
/// nsc's SIGTERM nothing is left in either pod.
#[test]
fn a_kernel_connection_between_two_pods_pings_and_leaves_nothing_behind() {
    require_root!();
    let (nsc_pod, nse_pod) = (Pod::new(), Pod::new());
    let mesh = Mesh::new("connect");
    let (mut registry, mut nsmgr) = mesh.control_plane();
    let mut fwd = mesh.forwarder("forwarder");
    let mut nse = mesh.nse("nse", &nse_pod, "172.16.81.0/24");

    let started = Instant::now();
    let mut nsc = mesh.nsc(&nsc_pod, SERVICE_URL, &[]);
    let conn = nsc.next_connection();
    eprintln!("connected in {:?}", started.elapsed());
    let (src, dst) = check_kernel_connection(&conn, &nsc, "nse", "172.16.81.");

    assert!(
        nsc_pod.index_of("nsm-1").is_some(),
        "{:?}",
        nsc_pod.mesh_links()
    );
    assert_eq!(nsc_pod.addresses("nsm-1"), [src]);
    let nse_links = nse_pod.mesh_links();
    assert_eq!(nse_links.len(), 1, "{nse_links:?}");
    assert_eq!(nse_pod.addresses(&nse_links[0].0), [dst.as_str()]);
    assert!(
        nsc_pod.ping_with(&[host(&dst)]),
        "ping {dst} from the client's pod"
    );

    nsc.terminate();
    nsc_pod.until_empty("after nsc's SIGTERM");
    nse_pod.until_empty("after nsc's SIGTERM");

    nse.terminate();
    fwd.terminate();
    nsmgr.terminate();
    registry.terminate();
}

/// DNS with the programs (docs/DNS.md): the endpoint serves DNS on port 53 of its pod
/// (`NSM_DNS_LISTEN_ON`), the client writes its pod's resolv.conf (`NSM_DNS_NETNS`).
/// glibc in the client's pod resolves the client's name (`<podName>.<service>`, and
/// the short name through the search domain) while connected; after nsc's SIGTERM the
/// name is gone and so is `/etc/netns/<pod>/`.
#[test]
fn the_programs_name_the_client_in_dns_and_give_its_pod_a_resolv_conf() {
    require_root!();
    let (nsc_pod, nse_pod) = (Pod::new(), Pod::new());
    let netns_etc = std::path::PathBuf::from(format!("/etc/netns/{}", nsc_pod.name));
    let mesh = Mesh::new("dns");
    let (_registry, _nsmgr) = mesh.control_plane();
    let _fwd = mesh.forwarder("forwarder");
    let _nse = mesh.nse_with(
        "nse",
        &nse_pod,
        "172.16.82.0/24",
        &[("NSM_DNS_LISTEN_ON", "0.0.0.0:53")],
    );
    assert_eq!(nsc_pod.getent_hosts("web-1.icmp-responder"), None);
    let url = format!("{SERVICE_URL}?podName=web-1");
    let mut nsc = mesh.nsc(&nsc_pod, &url, &[("NSM_DNS_NETNS", &nsc_pod.name)]);
    let conn = nsc.next_connection();
    let (src, dst) = check_kernel_connection(&conn, &nsc, "nse", "172.16.82.");
    assert_eq!(
        conn["context"]["dnsContext"]["configs"][0]["dnsServerIps"][0],
        host(&dst),
        "{conn}"
    );
    let me = Some(vec![host(&src).to_string()]);
    assert_eq!(nsc_pod.getent_hosts("web-1.icmp-responder"), me);
    assert_eq!(nsc_pod.getent_hosts("web-1"), me, "search domain");

    nsc.terminate();
    assert!(
        !netns_etc.exists(),
        "the pod's resolv.conf and its directory are gone"
    );
    assert_eq!(nsc_pod.getent_hosts("web-1.icmp-responder"), None);
    let _ = std::fs::remove_dir_all(&netns_etc);
}

/// Heal with processes: the forwarder is killed (SIGKILL) and started again on the
/// same URL, the new one adopts the veth pair its predecessor made (same device) and
/// the ping works without the NSC doing anything; then the endpoint
/// is killed and a second one with another prefix starts in another pod: the NSC
/// reselects it, prints the new connection, and pings the new address. The pair of
/// the dead endpoint is gone from its pod.
#[test]
fn the_nsc_heals_over_a_forwarder_restart_and_an_endpoint_death() {
    require_root!();
    let (nsc_pod, nse1_pod, nse2_pod) = (Pod::new(), Pod::new(), Pod::new());
    let mesh = Mesh::new("heal");
    let (_registry, _nsmgr) = mesh.control_plane();
    let mut fwd = mesh.forwarder("forwarder");
    let mut nse1 = mesh.nse("nse-1", &nse1_pod, "172.16.81.0/24");
    let mut nsc = mesh.nsc(&nsc_pod, SERVICE_URL, &[]);
    let conn = nsc.next_connection();
    let (_, dst) = check_kernel_connection(&conn, &nsc, "nse-1", "172.16.81.");
    assert!(nsc_pod.ping_with(&[host(&dst)]));
    let old_index = nsc_pod.index_of("nsm-1").expect("nsm-1");

    // The forwarder dies; its veth pair stays in the pods. A new forwarder process
    // adopts the pair when heal re-requests the connection through it: the same
    // device (the data plane never stopped), nothing made twice.
    let killed = Instant::now();
    fwd.kill9();
    let mut fwd2 = mesh.forwarder("forwarder-2");
    fwd2.wait_for_log(&["veth pair adopted", "client=nsm-1"]);
    eprintln!("pair adopted after {:?}", killed.elapsed());
    assert_eq!(nsc_pod.index_of("nsm-1"), Some(old_index), "the same nsm-1");
    nsc_pod.until_ping(host(&dst), killed, "forwarder killed and restarted");
    assert_eq!(
        nse1_pod.mesh_links().len(),
        1,
        "{:?}",
        nse1_pod.mesh_links()
    );

    // The endpoint dies (still registered: nobody unregistered it); a second one
    // starts in another pod with another prefix.
    let killed = Instant::now();
    nse1.kill9();
    let _nse2 = mesh.nse("nse-2", &nse2_pod, "172.16.91.0/24");
    let healed = nsc.connection_where(HEAL_WITHIN, |c| c["networkServiceEndpointName"] == "nse-2");
    eprintln!("new connection printed after {:?}", killed.elapsed());
    let (src2, dst2) = check_kernel_connection(&healed, &nsc, "nse-2", "172.16.91.");
    nsc_pod.until_ping(host(&dst2), killed, "endpoint killed, reselected");
    // Strict IPAM: the client's interface has the new pair only.
    assert_eq!(nsc_pod.addresses("nsm-1"), [src2]);
    nse1_pod.until_empty("the dead endpoint's pair is deleted");
    assert_eq!(
        nse2_pod.mesh_links().len(),
        1,
        "{:?}",
        nse2_pod.mesh_links()
    );

    nsc.terminate();
    nsc_pod.until_empty("after nsc's SIGTERM");
    nse2_pod.until_empty("after nsc's SIGTERM");
}

/// `NSM_LIVENESS=ping`: the client's interface is deleted behind the mesh's back;
/// nothing in the control plane notices, nsc's ping liveness check does, heal
/// reselects, and the forwarder makes a new pair.
#[test]
fn the_ping_liveness_check_heals_a_deleted_interface() {
    require_root!();
    let (nsc_pod, nse_pod) = (Pod::new(), Pod::new());
    let mesh = Mesh::new("liveness");
    let (_registry, _nsmgr) = mesh.control_plane();
    let _fwd = mesh.forwarder("forwarder");
    let _nse = mesh.nse("nse", &nse_pod, "172.16.82.0/24");
    let mut nsc = mesh.nsc(&nsc_pod, SERVICE_URL, &[("NSM_LIVENESS", "ping")]);
    let conn = nsc.next_connection();
    let (_, dst) = check_kernel_connection(&conn, &nsc, "nse", "172.16.82.");
    let index = nsc_pod.index_of("nsm-1").expect("nsm-1");

    let broke = Instant::now();
    nsc_pod.ip(&["link", "del", "nsm-1"]);
    poll(HEAL_WITHIN, "a new nsm-1", || {
        nsc_pod
            .index_of("nsm-1")
            .filter(|i| *i != index)
            .map(|_| ())
    });
    nsc_pod.until_ping(host(&dst), broke, "deleted interface, ping liveness");
    assert_eq!(nse_pod.mesh_links().len(), 1, "{:?}", nse_pod.mesh_links());

    nsc.terminate();
    nsc_pod.until_empty("after nsc's SIGTERM");
    nse_pod.until_empty("after nsc's SIGTERM");
}

/// A `kernel://` URL for a service whose endpoint serves NOOP only (`hello-endpoint`):
/// the KERNEL attempt fails at the forwarder, which falls back to the NOOP the client
/// offered second. The connection works (NOOP) and no interface is made anywhere.
#[test]
fn a_kernel_request_to_a_noop_only_endpoint_falls_back_to_noop() {
    require_root!();
    let (nsc_pod, nse_pod) = (Pod::new(), Pod::new());
    let mesh = Mesh::new("fallback");
    let (_registry, _nsmgr) = mesh.control_plane();
    let _fwd = mesh.forwarder("forwarder");
    let listen_on = mesh.dir.unix("hello.sock");
    let mut hello = mesh.start(
        "hello-endpoint",
        "hello",
        Some(&nse_pod),
        &[
            ("NSM_NAME", "hello"),
            ("NSM_LISTEN_ON", &listen_on),
            ("NSM_CONNECT_TO", &mesh.nsmgr_url),
        ],
        false,
    );
    hello.wait_for_log(&["registered endpoint", "name=hello"]);
    let mut nsc = mesh.nsc(&nsc_pod, "kernel://hello/nsm-1", &[]);
    let conn = nsc.next_connection();
    assert_eq!(
        path_names(&conn),
        ["nsc", "nsmgr", "forwarder", "hello"],
        "{conn}"
    );
    assert_eq!(conn["mechanism"]["type"], "NOOP", "{conn}");
    assert!(
        nsc_pod.mesh_links().is_empty(),
        "{:?}",
        nsc_pod.mesh_links()
    );
    assert!(
        nse_pod.mesh_links().is_empty(),
        "{:?}",
        nse_pod.mesh_links()
    );
    nsc.terminate();
}

/// What the attacker is told about its victim (environment variable
/// [`ATTACK_PLAN`], JSON).
const ATTACK_PLAN: &str = "NSM_TEST_ATTACK_PLAN";

/// The four attacks of a local process against a working connection, by a process that
/// holds a valid SVID of its own identity (`spiffe://nsm.test/attacker`) from the
/// mesh's CA and runs without capabilities (root's uid, every capability dropped, as
/// in an unprivileged pod): each is refused, and the victim's connection keeps working.
#[test]
fn a_local_attacker_with_its_own_svid_can_neither_close_nor_plant_nor_take_over_nor_read() {
    require_root!();
    let (nsc_pod, nse_pod) = (Pod::new(), Pod::new());
    let mesh = Mesh::new("attacks");
    let (_registry, _nsmgr) = mesh.control_plane();
    let _fwd = mesh.forwarder("forwarder");
    let _nse = mesh.nse("nse", &nse_pod, "172.16.83.0/24");
    let mut nsc = mesh.nsc(&nsc_pod, SERVICE_URL, &[]);
    let conn = nsc.next_connection();
    let (_, dst) = check_kernel_connection(&conn, &nsc, "nse", "172.16.83.");
    let links = nsc_pod.mesh_links();
    let victim_netns = format!("file:///proc/{}/ns/net", nsc.pid());

    let plan = serde_json::json!({
        "nsmgr": mesh.nsmgr_url,
        "forwarder": mesh.forwarder_url,
        "registry": mesh.dir.unix("registry.sock"),
        "connection": conn,
        "netns": victim_netns,
    });
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new("setpriv")
        .args([
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(exe)
        .args(["attacker_process", "--exact", "--ignored", "--nocapture"])
        .env(ATTACK_PLAN, plan.to_string())
        .envs(mesh.dir.identity("attacker"))
        .stdin(Stdio::null())
        .output()
        .expect("setpriv runs the attacker");
    let said = Attack::of(out);
    let expect = |what: &str, outcome: &str| said.expect(what, outcome);
    // The attacker is unprivileged, and its credentials are good: its own name is its.
    expect("capabilities", "0");
    expect("register-own-name", "Ok");
    // 1. Close of the victim's connection.
    expect("close", "PermissionDenied");
    // 2. An interface into the victim's namespace, through the manager or straight at
    //    the forwarder.
    expect("request-nsmgr", "PermissionDenied");
    expect("request-forwarder", "PermissionDenied");
    // 3. The victim endpoint's name, through the manager or at the registry.
    expect("register-nsmgr", "PermissionDenied");
    expect("register-registry", "PermissionDenied");
    expect("find-nse", &mesh.nsmgr_url);
    // 4. The monitors show it nothing of others.
    expect("monitor-nsmgr", "0");
    expect("monitor-forwarder", "0");

    // Nothing new in the victim's pod, and its connection still works.
    assert_eq!(nsc_pod.mesh_links(), links, "the victim's pod changed");
    assert!(nsc_pod.ping_with(&[host(&dst)]), "the victim's ping");
    assert!(
        nsc.stdout_within(Duration::from_millis(200)).is_err(),
        "the victim's connection changed (healed or closed)"
    );
    nsc.terminate();
    nsc_pod.until_empty("after nsc's SIGTERM");
}

/// What an attacker process printed: its `ATTACK <what> <outcome>` lines, and all of
/// its stdout.
struct Attack {
    results: std::collections::HashMap<String, String>,
    said: String,
}

impl Attack {
    /// Reads the output of an attacker that must have exited 0.
    fn of(out: std::process::Output) -> Attack {
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "the attacker failed: {said}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let results = said
            .lines()
            .filter_map(|l| l.strip_prefix("ATTACK "))
            .filter_map(|l| l.split_once(' '))
            .map(|(what, outcome)| (what.to_string(), outcome.to_string()))
            .collect();
        Attack { results, said }
    }

    /// Asserts the outcome of `what`.
    fn expect(&self, what: &str, outcome: &str) {
        assert_eq!(
            self.results.get(what).map(String::as_str),
            Some(outcome),
            "{what}: {}",
            self.said
        );
    }
}

/// Runs `attack` with the plan in the environment variable `var`; nothing without one.
fn with_plan<F: std::future::Future<Output = ()>>(var: &str, attack: impl FnOnce(Value) -> F) {
    let Ok(plan) = std::env::var(var) else {
        return;
    };
    let plan: Value = serde_json::from_str(&plan).expect("the plan");
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(attack(plan));
}

/// The attacker of the test above, run by it as a separate process (it does nothing
/// without the plan). Prints `ATTACK <what> <outcome>` lines.
#[test]
#[ignore = "the attacker process of a_local_attacker_with_its_own_svid_..."]
fn attacker_process() {
    with_plan(ATTACK_PLAN, attacker::run);
}

mod attacker {
    use std::collections::HashMap;
    use std::time::{Duration, SystemTime};

    use futures::StreamExt;
    use nsm_proto::connection::{Connection, Mechanism, MonitorScopeSelector, Path, PathSegment};
    use nsm_proto::networkservice::NetworkServiceRequest;
    use nsm_proto::registry::NetworkServiceEndpoint;
    use nsm_sdk::chains::Security;
    use nsm_sdk::handlers::{client_url, update_token};
    use nsm_sdk::registry::{Query, RegistryChain};
    use nsm_sdk::transport::{grpc_client, grpc_registry, monitor_connections, Channels, Url};
    use nsm_sdk::wire::{cls, params, types};
    use nsm_sdk::{Chain, Cx};
    use serde_json::Value;

    fn say(what: &str, outcome: impl std::fmt::Display) {
        println!("ATTACK {what} {outcome}");
    }

    fn outcome<T>(r: &nsm_sdk::Result<T>) -> String {
        match r {
            Ok(_) => "Ok".into(),
            Err(e) => format!("{:?}", e.code()),
        }
    }

    fn url(plan: &Value, key: &str) -> Url {
        plan[key].as_str().expect("a URL").parse().expect("a URL")
    }

    /// A bare client hop: signs its own token for the peer, sends what it is given.
    fn raw(security: &Security, channels: &Channels, to: Url) -> Chain {
        Chain::builder()
            .push(update_token(security.tokens(Duration::from_secs(60))))
            .push(client_url(to))
            .push(grpc_client(channels.clone()))
            .build()
    }

    /// The victim's connection as it printed it, with the attacker's token in its
    /// first segment (the transport signs it).
    fn victim(plan: &Value) -> Connection {
        let c = &plan["connection"];
        let segments = c["path"]["pathSegments"]
            .as_array()
            .expect("segments")
            .iter()
            .map(|s| PathSegment {
                name: s["name"].as_str().unwrap_or_default().into(),
                id: s["id"].as_str().unwrap_or_default().into(),
                ..Default::default()
            })
            .collect();
        Connection {
            id: c["id"].as_str().unwrap_or_default().into(),
            network_service: c["networkService"].as_str().unwrap_or_default().into(),
            path: Some(Path {
                index: 0,
                path_segments: segments,
            }),
            ..Default::default()
        }
    }

    /// A request of its own for an interface in the victim's namespace.
    fn plant(plan: &Value, service: &str) -> NetworkServiceRequest {
        let id = format!("attack-{}", std::process::id());
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.clone(),
                network_service: service.into(),
                path: Some(Path {
                    index: 0,
                    path_segments: vec![PathSegment {
                        name: "attacker".into(),
                        id,
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            }),
            mechanism_preferences: vec![Mechanism {
                cls: cls::LOCAL.into(),
                r#type: types::KERNEL.into(),
                parameters: HashMap::from([
                    (params::NAME.into(), "evil-1".into()),
                    (
                        params::INODE_URL.into(),
                        plan["netns"].as_str().unwrap_or_default().into(),
                    ),
                ]),
            }],
        }
    }

    fn endpoint(name: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            url: "unix:///tmp/attacker.sock".into(),
            network_service_names: vec!["icmp-responder".into()],
            expiration_time: Some((SystemTime::now() + Duration::from_secs(60)).into()),
            ..Default::default()
        }
    }

    /// How many connections the first event of `url`'s monitor shows.
    async fn monitor_shows(channels: &Channels, url: &Url) -> String {
        match monitor_connections(channels, url, MonitorScopeSelector::default()).await {
            Ok(mut events) => {
                match tokio::time::timeout(Duration::from_secs(5), events.next()).await {
                    Ok(Some(Ok(e))) => e.connections.len().to_string(),
                    other => format!("no-event:{other:?}"),
                }
            }
            Err(e) => format!("{:?}", e.code()),
        }
    }

    /// The pid-namespace attacks: a request for an interface in the victim's namespace
    /// named by its inode with this process's own pid-1 URL, by the URL the host sees
    /// with the inode, and by the pid-1 URL alone (which names the host's namespace in
    /// the manager's pid namespace).
    pub(super) async fn run_in_own_pid_namespace(plan: Value) {
        say("pid", std::process::id());
        say("capabilities", capabilities());
        let security = Security::from_env().expect("the attacker's own SVID");
        let channels = security.channels();
        let nsmgr = url(&plan, "nsmgr");
        let service = plan["service"].as_str().unwrap_or_default();
        let inode = plan["victim_inode"].as_str().unwrap_or_default();
        let own_view = "file:///proc/1/ns/net";
        let host_view = plan["victim_url"].as_str().unwrap_or_default();
        for (what, netns, inode) in [
            ("victim-inode", own_view, Some(inode)),
            ("victim-host-url", host_view, Some(inode)),
            ("pid-1-url-alone", own_view, None),
        ] {
            let mut req = plant(&serde_json::json!({ "netns": netns }), service);
            if let Some(inode) = inode {
                req.mechanism_preferences[0]
                    .parameters
                    .insert(params::NETNS_INODE.into(), inode.into());
            }
            let r = raw(&security, &channels, nsmgr.clone())
                .request(&mut Cx::client(), req)
                .await;
            say(what, outcome(&r));
        }
    }

    /// The effective capabilities of this process.
    fn capabilities() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            })
            .unwrap_or(u64::MAX)
    }

    pub(super) async fn run(plan: Value) {
        say("capabilities", capabilities());
        let security = Security::from_env().expect("the attacker's own SVID");
        let channels = security.channels();
        let (nsmgr, forwarder, registry) = (
            url(&plan, "nsmgr"),
            url(&plan, "forwarder"),
            url(&plan, "registry"),
        );
        let service = victim(&plan).network_service;

        let close = raw(&security, &channels, nsmgr.clone())
            .close(&mut Cx::client(), victim(&plan))
            .await;
        say("close", outcome(&close));

        for (what, to) in [("request-nsmgr", &nsmgr), ("request-forwarder", &forwarder)] {
            let r = raw(&security, &channels, to.clone())
                .request(&mut Cx::client(), plant(&plan, &service))
                .await;
            say(what, outcome(&r));
        }

        let via_nsmgr = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(grpc_registry(channels.clone(), nsmgr.clone()))
            .build();
        let own = via_nsmgr
            .register(&mut Cx::client(), endpoint("attacker-nse"))
            .await;
        say("register-own-name", outcome(&own));
        let r = via_nsmgr.register(&mut Cx::client(), endpoint("nse")).await;
        say("register-nsmgr", outcome(&r));
        let at_registry = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(grpc_registry(channels.clone(), registry.clone()))
            .build();
        let r = at_registry
            .register(&mut Cx::client(), endpoint("nse"))
            .await;
        say("register-registry", outcome(&r));
        let found = at_registry
            .find(
                &mut Cx::client(),
                Query {
                    template: NetworkServiceEndpoint {
                        name: "nse".into(),
                        ..Default::default()
                    },
                    watch: false,
                },
            )
            .await;
        let url = match found {
            Ok(mut s) => match s.next().await {
                Some(Ok(f)) => f.resource.url,
                other => format!("none:{other:?}"),
            },
            Err(e) => format!("{:?}", e.code()),
        };
        say("find-nse", url);

        say("monitor-nsmgr", monitor_shows(&channels, &nsmgr).await);
        say(
            "monitor-forwarder",
            monitor_shows(&channels, &forwarder).await,
        );
    }
}

/// Kubernetes' pods (docs/KUBERNETES.md): the client runs in a pid namespace of its own
/// and without capabilities, the manager and the forwarder in the host's. `nsc` names
/// its namespace `file:///proc/1/ns/net`, which in the manager's pid namespace is
/// another process's (the host's namespace), and its inode (`netnsInode`): the manager
/// finds the namespace from the client's process (`netns_inode`), the interface lands
/// in the client's pod, the ping crosses, and SIGTERM's Close removes it. A client in
/// its own pid namespace naming another pod's namespace (by the inode, by the URL the
/// host sees, or by its pid-1 URL alone) is PermissionDenied.
#[test]
fn a_client_in_its_own_pid_namespace_gets_its_interface_in_its_pod() {
    require_root!();
    let (nsc_pod, nse_pod, other_pod) = (Pod::new(), Pod::new(), Pod::new());
    let mesh = Mesh::new("pidns");
    let (_registry, _nsmgr) = mesh.control_plane();
    let _fwd = mesh.forwarder("forwarder");
    let _nse = mesh.nse("nse", &nse_pod, "172.16.84.0/24");

    let mut nsc = mesh.nsc_in_own_pid_namespace(&nsc_pod, SERVICE_URL);
    let conn = nsc.next_connection();
    assert_eq!(
        path_names(&conn),
        ["nsc", "nsmgr", "forwarder", "nse"],
        "{conn}"
    );
    let m = &conn["mechanism"]["parameters"];
    // The client's own view comes back: pid 1 of its pid namespace, its inode.
    assert_eq!(m["inodeURL"], "file:///proc/1/ns/net", "{conn}");
    assert_eq!(m["netnsInode"], netns_inode(&nsc_pod).to_string(), "{conn}");
    let (src, dst) = (address(&conn, "srcIpAddrs"), address(&conn, "dstIpAddrs"));
    assert_eq!(
        nsc_pod.addresses("nsm-1"),
        [src],
        "{:?}",
        nsc_pod.mesh_links()
    );
    assert!(
        nsc_pod.ping_with(&[host(&dst)]),
        "ping {dst} from the client's pod"
    );

    // Another pod's client, in its own pid namespace too, naming nsc's namespace.
    let plan = serde_json::json!({
        "nsmgr": mesh.nsmgr_url,
        "service": "icmp-responder",
        "victim_inode": netns_inode(&nsc_pod).to_string(),
        "victim_url": format!("file:///run/netns/{}", nsc_pod.name),
    });
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &other_pod.name])
        .args(OWN_PID_NAMESPACE)
        .arg(std::env::current_exe().expect("the test binary"))
        .args([
            "pidns_attacker_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(PIDNS_PLAN, plan.to_string())
        .envs(mesh.dir.identity("attacker"))
        .stdin(Stdio::null());
    let out = cmd.output().expect("the attacker runs");
    let said = Attack::of(out);
    let expect = |what: &str, outcome: &str| said.expect(what, outcome);
    expect("pid", "1");
    expect("capabilities", "0");
    expect("victim-inode", "PermissionDenied");
    expect("victim-host-url", "PermissionDenied");
    expect("pid-1-url-alone", "PermissionDenied");
    assert!(
        other_pod.mesh_links().is_empty(),
        "{:?}",
        other_pod.mesh_links()
    );
    assert_eq!(nsc_pod.mesh_links().len(), 1, "{:?}", nsc_pod.mesh_links());

    // SIGTERM to nsc itself (the wrapper does not pass signals on): Close.
    let status = Command::new("kill")
        .args(["-TERM", &wrapped_pid(&nsc).to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    nsc_pod.until_empty("after nsc's SIGTERM");
    nse_pod.until_empty("after nsc's SIGTERM");
    assert_eq!(nsc.wait_exit(READY).code(), Some(0), "{}", nsc.log());
}

/// What the pid-namespace attacker is told (environment variable, JSON).
const PIDNS_PLAN: &str = "NSM_TEST_PIDNS_PLAN";

/// The attacker of the test above, run by it in a pod and a pid namespace of its own
/// (it does nothing without the plan). Prints `ATTACK <what> <outcome>` lines.
#[test]
#[ignore = "the attacker process of a_client_in_its_own_pid_namespace_..."]
fn pidns_attacker_process() {
    with_plan(PIDNS_PLAN, attacker::run_in_own_pid_namespace);
}

/// Kubernetes' init container and sidecar (docs/NSC-INIT.md): `nsc --init` requests,
/// writes the connection to the hand-over file and exits 0 leaving a working
/// interface; a sidecar `nsc` with the same name and file takes the connection over
/// (the same id: every hop sees a refresh, the pod keeps the same `nsm-1` and no second
/// interface appears) and keeps it past the init container's token lifetime (4 s here:
/// without the sidecar's refreshes the manager would close it then); its SIGTERM closes
/// it and removes the file.
#[test]
fn nsc_init_leaves_the_connection_and_the_sidecar_takes_it_over() {
    require_root!();
    let (nsc_pod, nse_pod) = (Pod::new(), Pod::new());
    let mesh = Mesh::new("init");
    let (_registry, _nsmgr) = mesh.control_plane();
    let _fwd = mesh.forwarder("forwarder");
    let _nse = mesh.nse("nse", &nse_pod, "172.16.83.0/24");
    let file = mesh.dir.0.join("connections.jsonl");
    let file_env = file.to_str().expect("utf-8 path");
    let handover = [
        ("NSM_CONNECTIONS_FILE", file_env),
        ("NSM_TOKEN_LIFETIME", "4s"),
    ];

    let mut init_env = vec![("NSM_INIT", "true")];
    init_env.extend_from_slice(&handover);
    let mut init = mesh.nsc_as("nsc-init", &nsc_pod, SERVICE_URL, &init_env);
    let conn = init.next_connection();
    let (_, dst) = check_kernel_connection(&conn, &init, "nse", "172.16.83.");
    let status = init.wait_exit(READY);
    assert_eq!(
        status.code(),
        Some(0),
        "nsc --init: {status}:\n{}",
        init.log()
    );
    let index = nsc_pod
        .index_of("nsm-1")
        .expect("nsm-1 left by the init container");
    assert!(
        nsc_pod.ping_with(&[host(&dst)]),
        "ping after the init container"
    );
    let saved = std::fs::read_to_string(&file).expect("the hand-over file");
    let id = conn["id"].as_str().expect("connection id");
    assert!(saved.contains(id), "{saved}");

    let mut sidecar = mesh.nsc(&nsc_pod, SERVICE_URL, &handover);
    let taken = sidecar.next_connection();
    assert_eq!(taken["id"], conn["id"], "the same connection: {taken}");
    // Its mechanism now names the sidecar's namespace URL (the same namespace).
    check_kernel_connection(&taken, &sidecar, "nse", "172.16.83.");
    assert_eq!(
        nsc_pod.mesh_links(),
        [("nsm-1".to_string(), index)],
        "the same interface, no second one"
    );
    // Past the init container's token lifetime: the sidecar's refreshes keep it.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(nsc_pod.mesh_links(), [("nsm-1".to_string(), index)]);
    assert!(nsc_pod.ping_with(&[host(&dst)]), "ping after the takeover");
    assert!(sidecar.running());

    sidecar.terminate();
    nsc_pod.until_empty("after the sidecar's SIGTERM");
    nse_pod.until_empty("after the sidecar's SIGTERM");
    assert!(!file.exists(), "the hand-over file is removed after Close");
}
