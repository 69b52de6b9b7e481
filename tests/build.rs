//! Generates the gRPC tests' client and server from the example's `payments.proto`, with
//! the vendored `protoc`, so a fresh machine needs no protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../examples/proto/payments.proto";
    println!("cargo:rerun-if-changed={proto}");
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_protos(&[proto], &["../examples/proto"])?;
    Ok(())
}
