//! Compiles the C eBPF sources in `bpf-c/` with clang into an object that the
//! sidecar embeds and loads from memory.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let bpf_dir = manifest.join("../bpf-c");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    // libbpf-sys builds libbpf and exports its headers, so the program is
    // compiled against the same bpf_helpers.h as the loader it runs under.
    let libbpf_include = env::var("DEP_BPF_INCLUDE").expect("libbpf-sys exports DEP_BPF_INCLUDE");

    let include = [bpf_dir.join("include"), PathBuf::from(libbpf_include)];
    let route = bpf_dir.join("sk_msg_route.c");
    compile(&route, &out.join("sk_msg_route.bpf.o"), &include);
    // A program the verifier refuses, for the loader's tests.
    let unchecked = bpf_dir.join("tests/sk_msg_unchecked.c");
    compile(&unchecked, &out.join("sk_msg_unchecked.bpf.o"), &include);

    println!("cargo:rerun-if-changed={}", route.display());
    println!("cargo:rerun-if-changed={}", unchecked.display());
    println!(
        "cargo:rerun-if-changed={}",
        bpf_dir.join("include/lifl.h").display()
    );
    println!("cargo:rerun-if-env-changed=CLANG");
}

fn compile(source: &Path, object: &Path, include: &[PathBuf]) {
    let mut clang = Command::new(env::var("CLANG").unwrap_or_else(|_| "clang".into()));
    clang.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"]);
    for dir in include {
        clang.arg("-I").arg(dir);
    }
    let status = clang
        .args(["-I", "/usr/include/x86_64-linux-gnu"])
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(object)
        .status()
        .expect("run clang (install clang: `just deps`)");
    assert!(
        status.success(),
        "clang failed to compile {}",
        source.display()
    );
}
