//! Generates the gRPC contract (`lifl/v1/*.proto`) into Rust with prost and
//! tonic, plus the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "lifl/v1/jobs.proto",
        "lifl/v1/nodes.proto",
        "lifl/v1/rounds.proto",
        "lifl/v1/gateway.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("lifl_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
