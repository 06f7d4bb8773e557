//! Compiles the .proto with protox (pure Rust), so no protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/remocal/v1/remocal.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
