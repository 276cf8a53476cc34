//! The CPU cost of the security pieces that run per call.
//!
//! - `security/jwt/sign`, `security/jwt/verify`: one ES256 path token made with an SVID
//!   key (without its chain, as on a link whose handshake showed the signing
//!   certificate), and checked against the signer's certificate the first time.
//! - `security/jwt/verify_remembered`: the same token checked again (the signature is
//!   remembered per token and certificate; only `exp` is checked).
//! - `security/token/generate_same_second`: `jwt_token`'s generator asked again for the
//!   same peer within the second (the token is reused).
//! - `security/policy/server_input`: the input of the server policies for a 3-segment
//!   path (decoding every token, verifying the caller's against the peer certificate).
//! - `security/policy/server_eval`: the four server policies on that input (Rego only).
//! - `security/policy/one_eval`: one policy (`tokens_chained`) on that input.
//! - `security/authorize/server`: one server-side `authorize` of a Request with that
//!   path (input, one ES256 verify, the four policies), as a chain runs it.
//!
//! Run: `cargo bench -p nsm-sdk --features dev-ca --bench security -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::sync::Arc;

use nsm_sdk::core::Peer;
use nsm_sdk::handlers::authorize_server;
use nsm_sdk::proto::connection::{Connection, Path, PathSegment};
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::security::dev_ca::DevCa;
use nsm_sdk::security::policy::{self, path_input, PolicySet, Verify};
use nsm_sdk::security::{jwt, Identity, PeerIdentity, SpiffeId, Svid, TrustBundle};
use nsm_sdk::token::{jwt_token, TokenGenerator};
use nsm_sdk::{Chain, Cx};

const HOUR: Duration = Duration::from_secs(3600);

fn svid(ca: &DevCa, name: &str) -> Svid {
    let id = SpiffeId::parse(&format!("spiffe://bench.local/{name}")).expect("valid id");
    let issued = ca.issue(&id, HOUR).expect("issued");
    Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).expect("svid")
}

fn bench(c: &mut Criterion) {
    let ca = DevCa::new("bench.local").expect("ca");
    let (nsc, nsmgr, fwd, nse) = (
        svid(&ca, "nsc"),
        svid(&ca, "nsmgr"),
        svid(&ca, "forwarder"),
        svid(&ca, "nse"),
    );
    let sign = |from: &Svid, to: &Svid| {
        jwt::sign_to(from, Some(to.id()), None, HOUR, SystemTime::now(), false)
    };
    let token = |from: &Svid, to: &Svid| sign(from, to).expect("signed");

    c.bench_function("security/jwt/sign", |b| {
        b.iter(|| black_box(sign(&nsc, &nsmgr).expect("signed")))
    });
    // Fresh tokens (made outside the measurement): every verification checks a signature.
    c.bench_function("security/jwt/verify", |b| {
        b.iter_batched(
            || token(&nsc, &nsmgr).token,
            |t| black_box(jwt::verify(&t, nsc.leaf()).expect("verified")),
            BatchSize::SmallInput,
        )
    });
    let t = token(&nsc, &nsmgr).token;
    c.bench_function("security/jwt/verify_remembered", |b| {
        b.iter(|| black_box(jwt::verify(&t, nsc.leaf()).expect("verified")))
    });
    let generator = jwt_token(
        Identity::new(
            svid(&ca, "nsc"),
            TrustBundle::from_pem(ca.bundle_pem().as_bytes()).expect("bundle"),
        )
        .fixed(),
        Duration::from_secs(600),
    );
    let to_nsmgr = Peer {
        identity: Some(PeerIdentity::from_leaf(nsmgr.leaf().clone()).expect("peer")),
        ..Default::default()
    };
    c.bench_function("security/token/generate_same_second", |b| {
        b.iter(|| black_box(generator.generate(&to_nsmgr).expect("token")))
    });

    let segment = |name: &str, token: String| PathSegment {
        name: name.into(),
        id: format!("{name}-id"),
        token,
        ..Default::default()
    };
    // The path as the forwarder sees it: nsc, nsmgr, then its own segment.
    let path = Path {
        index: 2,
        path_segments: vec![
            segment("nsc", token(&nsc, &nsmgr).token),
            segment("nsmgr", token(&nsmgr, &fwd).token),
            segment("forwarder", token(&fwd, &nse).token),
        ],
    };
    let peer = PeerIdentity::from_leaf(nsmgr.leaf().clone()).expect("peer");
    let set = PolicySet::defaults().expect("policies");

    c.bench_function("security/policy/server_input", |b| {
        b.iter(|| {
            black_box(path_input(
                &path,
                Some(&peer),
                Verify::Previous,
                SystemTime::now(),
            ))
        })
    });
    let input = path_input(&path, Some(&peer), Verify::Previous, SystemTime::now());
    set.check(policy::SERVER, &input)
        .expect("a good path passes");
    c.bench_function("security/policy/server_eval", |b| {
        b.iter(|| {
            set.check(policy::SERVER, black_box(&input))
                .expect("passes")
        })
    });
    c.bench_function("security/policy/one_eval", |b| {
        b.iter(|| {
            set.check(&["tokens_chained"], black_box(&input))
                .expect("passes")
        })
    });

    let chain = Chain::builder()
        .push(authorize_server(Arc::new(set.clone())))
        .build();
    let req = NetworkServiceRequest {
        connection: Some(Connection {
            id: "forwarder-id".into(),
            path: Some(path.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let cx = Cx::server().with_peer(Peer {
        identity: Some(peer.clone()),
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("security/authorize/server", |b| {
        b.iter(|| {
            rt.block_on(chain.request(&mut cx.clone(), black_box(req.clone())))
                .expect("authorized")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
