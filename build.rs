//! Compiles `proto/` with protox (pure Rust: no protoc on any machine), keeps the encoded
//! descriptor set for gRPC reflection, and generates prost messages and tonic services.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    let files = [
        "proto/tokend/v1/token.proto",
        "proto/tokend/v1/directory.proto",
        "proto/tokend/v1/audit.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("tokend_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    // Envoy's ext_authz API, the subset tokend uses, for reflection only: the service itself
    // is built on the `envoy-types` crate, which ships no descriptors.
    let envoy = protox::compile(
        ["proto/envoy/service/auth/v3/external_auth.proto"],
        ["proto"],
    )?;
    fs::write(out_dir.join("envoy_descriptor.bin"), envoy.encode_to_vec())?;

    // The example service of `examples/inventory.rs`: generated apart, and left out of the
    // descriptor set above, so tokend's reflection never lists it.
    let example = protox::compile(["proto/example/v1/inventory.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(example)?;
    Ok(())
}
