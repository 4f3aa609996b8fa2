//! Compiles the public protobuf contract with a vendored `protoc`, so a fresh
//! machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("cleanroom_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                "proto/cleanroom/v1/agreements.proto",
                "proto/cleanroom/v1/datasets.proto",
                "proto/cleanroom/v1/audit.proto",
                "proto/cleanroom/v1/matching.proto",
                "proto/cleanroom/v1/queries.proto",
                "proto/cleanroom/v1/governance.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
