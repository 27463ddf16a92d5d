//! Generates the peer service with the `protoc` binary vendored by `protoc-bin-vendored`, so a
//! fresh machine needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/peer.proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .bytes(".")
        .compile_with_config(config, &["proto/peer.proto"], &["proto"])?;
    Ok(())
}
