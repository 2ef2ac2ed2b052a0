//! Compiles EventStoreDB's client protocol (`proto/`, from the MIT-licensed `kurrentdb` client)
//! into the gRPC services Refract serves. protox parses the files in Rust, so no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "streams.proto",
        "persistent.proto",
        "serverfeatures.proto",
        "gossip.proto",
        "operations.proto",
        "projections.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_build::configure()
        .build_client(false)
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
