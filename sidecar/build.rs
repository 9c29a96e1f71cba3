//! Compiles the C eBPF sources in `bpf-c/` with clang into an object that the
//! sidecar embeds and loads from memory.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let bpf_dir = manifest.join("../bpf-c");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    // libbpf-sys builds libbpf and exports its headers, so the program is
    // compiled against the same bpf_helpers.h as the loader it runs under.
    let libbpf_include = env::var("DEP_BPF_INCLUDE").expect("libbpf-sys exports DEP_BPF_INCLUDE");

    let source = bpf_dir.join("sk_msg_route.c");
    let object = out.join("sk_msg_route.bpf.o");
    let status = Command::new(env::var("CLANG").unwrap_or_else(|_| "clang".into()))
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg("-I")
        .arg(bpf_dir.join("include"))
        .arg("-I")
        .arg(&libbpf_include)
        .args(["-I", "/usr/include/x86_64-linux-gnu"])
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .status()
        .expect("run clang (install clang: `just deps`)");
    assert!(
        status.success(),
        "clang failed to compile {}",
        source.display()
    );

    println!("cargo:rerun-if-changed={}", source.display());
    println!(
        "cargo:rerun-if-changed={}",
        bpf_dir.join("include/lifl.h").display()
    );
    println!("cargo:rerun-if-env-changed=CLANG");
}
