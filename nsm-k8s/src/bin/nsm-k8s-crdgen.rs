//! `nsm-k8s-crdgen`: writes the CRDs of NSM's Kubernetes registry (NetworkService,
//! NetworkServiceEndpoint) as generated from nsm-k8s's Rust types to standard output,
//! or to the file given as argument (`deploy/crds.yaml`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = nsm_k8s::crd::crds_yaml();
    match std::env::args_os().nth(1) {
        None => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Some(path) => match std::fs::write(&path, yaml) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nsm-k8s-crdgen: {}: {e}", path.to_string_lossy());
                ExitCode::FAILURE
            }
        },
    }
}
