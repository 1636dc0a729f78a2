//! Compiles the Open Inference Protocol with protox (pure Rust), so building
//! needs no system `protoc`, and writes a descriptor set for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/grpc_service.proto", "proto/model_config.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set itself: it only sees the
    // already-parsed descriptors, so write them for reflection here.
    std::fs::write(out.join("inference_descriptor.bin"), fds.encode_to_vec())?;
    // Unimplemented methods answer UNIMPLEMENTED, so a test fake implements only what it needs.
    tonic_prost_build::configure()
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
