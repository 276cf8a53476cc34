//! Compiles the NSM API v1 protos with protox (pure Rust, no system `protoc`) and
//! generates prost messages and tonic stubs. The encoded descriptor set is kept so the
//! crate can offer the protobuf JSON mapping through prost-reflect.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/connectioncontext.proto",
        "proto/connection.proto",
        "proto/networkservice.proto",
        "proto/registry.proto",
        "proto/ipam.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("nsm_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::NsmCodec")
        .compile_fds(fds)?;
    Ok(())
}
