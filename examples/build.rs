//! Generates the gRPC example's client and server from `proto/payments.proto`, with
//! the vendored `protoc`, so a fresh machine needs no protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/payments.proto";
    println!("cargo:rerun-if-changed={proto}");
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_protos(&[proto], &["proto"])?;
    Ok(())
}
