//! Generates the Rust code for Arca's protocols with `protox` (a pure-Rust
//! protobuf compiler), so a fresh machine needs no system `protoc`.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "protos/tvix/castore/v1/castore.proto",
        "protos/tvix/castore/v1/rpc_blobstore.proto",
        "protos/tvix/castore/v1/rpc_directory.proto",
        "protos/tvix/store/v1/pathinfo.proto",
        "protos/tvix/store/v1/rpc_pathinfo.proto",
        "protos/arca/castore/v1/batch.proto",
        "protos/arca/castore/v1/local.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["protos"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set is served by gRPC reflection.
    std::fs::write(out_dir.join("arca_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
