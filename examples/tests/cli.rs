//! The programs' command lines: `--help` documents every `NSM_*` setting, and a
//! configuration that cannot work exits with status 2 and one line on stderr.
//!
//! (Being an integration test of this package also makes `cargo test --workspace`
//! build the binaries into `target/<profile>/`, where `nsm-tests`' process tests find
//! them.)

use std::process::{Command, Output};

fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("NSM_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("the program starts")
}

fn help_documents(bin: &str, settings: &[&str]) {
    let out = run(bin, &["--help"], &[]);
    assert!(out.status.success(), "{bin} --help: {:?}", out.status);
    let help = String::from_utf8_lossy(&out.stdout);
    for setting in settings.iter().chain(&["NSM_LOG_LEVEL"]) {
        assert!(
            help.contains(setting),
            "{bin} --help does not name {setting}:\n{help}"
        );
        let flag = format!("--{}", setting[4..].to_ascii_lowercase().replace('_', "-"));
        assert!(
            help.contains(&flag),
            "{bin} --help does not name {flag}:\n{help}"
        );
    }
}

fn fails_with_one_line(bin: &str, env: &[(&str, &str)], reason: &str) {
    let out = run(bin, &[], env);
    assert_eq!(out.status.code(), Some(2), "{bin} {env:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{bin} {env:?}: {stderr}");
    assert!(stderr.contains(reason), "{bin} {env:?}: {stderr}");
}

#[test]
fn help_names_every_setting_as_variable_and_flag() {
    help_documents(
        env!("CARGO_BIN_EXE_nsm-registry"),
        &["NSM_LISTEN_ON", "NSM_EXPIRE_AFTER"],
    );
    help_documents(
        env!("CARGO_BIN_EXE_nsmgr"),
        &["NSM_NAME", "NSM_LISTEN_ON", "NSM_REGISTRY_URL"],
    );
    help_documents(
        env!("CARGO_BIN_EXE_nsm-forwarder"),
        &[
            "NSM_NAME",
            "NSM_LISTEN_ON",
            "NSM_CONNECT_TO",
            "NSM_TUNNEL_IP",
        ],
    );
    help_documents(
        env!("CARGO_BIN_EXE_nse-icmp-responder"),
        &[
            "NSM_NAME",
            "NSM_LISTEN_ON",
            "NSM_CONNECT_TO",
            "NSM_SERVICE_NAMES",
            "NSM_LABELS",
            "NSM_CIDR_PREFIX",
        ],
    );
    help_documents(
        env!("CARGO_BIN_EXE_nsc"),
        &[
            "NSM_NAME",
            "NSM_CONNECT_TO",
            "NSM_NETWORK_SERVICES",
            "NSM_REQUEST_TIMEOUT",
            "NSM_MECHANISM",
            "NSM_LIVENESS",
        ],
    );
    help_documents(
        env!("CARGO_BIN_EXE_hello-endpoint"),
        &["NSM_NAME", "NSM_LISTEN_ON", "NSM_CONNECT_TO"],
    );
}

#[test]
fn bad_configuration_exits_2_with_one_line() {
    fails_with_one_line(env!("CARGO_BIN_EXE_nsm-registry"), &[], "--listen-on");
    fails_with_one_line(
        env!("CARGO_BIN_EXE_nsm-registry"),
        &[("NSM_LISTEN_ON", "http://x:1")],
        "unknown scheme",
    );
    fails_with_one_line(
        env!("CARGO_BIN_EXE_nsm-registry"),
        &[
            ("NSM_LISTEN_ON", "tcp://127.0.0.1:0"),
            ("NSM_EXPIRE_AFTER", "soon"),
        ],
        "bad duration",
    );
    fails_with_one_line(
        env!("CARGO_BIN_EXE_nsmgr"),
        &[
            ("NSM_LISTEN_ON", "tcp://127.0.0.1:0"),
            ("NSM_REGISTRY_URL", "tcp://127.0.0.1:1"),
        ],
        "fixed port",
    );
    fails_with_one_line(
        env!("CARGO_BIN_EXE_nse-icmp-responder"),
        &[
            ("NSM_NAME", "nse"),
            ("NSM_LISTEN_ON", "tcp://127.0.0.1:0"),
            ("NSM_SERVICE_NAMES", "icmp"),
            ("NSM_CIDR_PREFIX", "10.0.0.0/99"),
        ],
        "--cidr-prefix",
    );
    fails_with_one_line(
        env!("CARGO_BIN_EXE_nse-icmp-responder"),
        &[
            ("NSM_NAME", "nse"),
            ("NSM_LISTEN_ON", "tcp://127.0.0.1:0"),
            ("NSM_SERVICE_NAMES", "icmp"),
            ("NSM_LABELS", "app"),
        ],
        "not key=value",
    );
    fails_with_one_line(
        env!("CARGO_BIN_EXE_nsc"),
        &[("NSM_NETWORK_SERVICES", "kernel://")],
        "empty network service",
    );
    fails_with_one_line(
        env!("CARGO_BIN_EXE_nsc"),
        &[
            ("NSM_NETWORK_SERVICES", "kernel://icmp"),
            ("NSM_LOG_LEVEL", "info,="),
        ],
        "bad log level",
    );
    fails_with_one_line(
        env!("CARGO_BIN_EXE_nsc"),
        &[
            ("NSM_NETWORK_SERVICES", "kernel://icmp"),
            ("NSM_LIVENESS", "icmp"),
        ],
        "--liveness",
    );
}
