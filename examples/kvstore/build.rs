//! Generates the client API's service (`proto/kv.proto`) and the etcd client the bench's
//! side-by-side run uses (`proto/etcd.proto`), with the `protoc` binary vendored by
//! `protoc-bin-vendored`, so a fresh machine needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/kv.proto");
    println!("cargo:rerun-if-changed=proto/etcd.proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/kv.proto", "proto/etcd.proto"],
        &["proto"],
    )?;
    Ok(())
}
