//! Compiles the public protobuf contract with a vendored `protoc`, so a fresh
//! machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // google/protobuf/timestamp.proto and the other well-known types.
    let protos_include = protoc_bin_vendored::include_path()?
        .to_str()
        .ok_or("the vendored protoc include path is not UTF-8")?
        .to_string();
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
            &["proto", &protos_include],
        )?;
    // The workers' placement service: served by `cleanroom worker`, not by
    // the server, so it stays out of the server's descriptor set.
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/cleanroom/worker/v1/worker.proto"],
        &["proto", &protos_include],
    )?;
    // The Flight service, for reflection only: its code comes from
    // arrow-flight.
    let status = std::process::Command::new(protoc_bin_vendored::protoc_bin_path()?)
        .arg(format!(
            "--descriptor_set_out={}",
            out_dir.join("flight_descriptor.bin").display()
        ))
        .arg("--include_imports")
        .arg("-Iproto")
        .arg(format!(
            "-I{}",
            protoc_bin_vendored::include_path()?.display()
        ))
        .arg("proto/arrow/flight/protocol/flight.proto")
        .status()?;
    if !status.success() {
        return Err("protoc failed on proto/arrow/flight/protocol/flight.proto".into());
    }
    // The commit `--version` names: CLEANROOM_COMMIT when the build is
    // given one (the Docker image), else the git checkout's.
    println!("cargo:rerun-if-env-changed=CLEANROOM_COMMIT");
    if let Ok(commit) = std::env::var("CLEANROOM_COMMIT") {
        println!("cargo:rustc-env=CLEANROOM_COMMIT={commit}");
        println!("cargo:rerun-if-changed=proto");
        return Ok(());
    }
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| !o.stdout.is_empty());
    let commit = match (commit.is_empty(), dirty) {
        (true, _) => "unknown commit".to_string(),
        (false, false) => commit,
        (false, true) => format!("{commit}, modified"),
    };
    println!("cargo:rustc-env=CLEANROOM_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    println!("cargo:rerun-if-changed=.git/index");
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
