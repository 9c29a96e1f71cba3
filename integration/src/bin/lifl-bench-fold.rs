//! `lifl-bench-fold`: how fast an aggregator folds updates, beside an
//! in-run memcpy of the same bytes on one core, as JSON.
//!
//! The fold reads every update once and keeps one `f64` sum per parameter;
//! folding several arrived updates per pass over that sum is what lets it
//! keep up with memory bandwidth. Each batch size is measured in the same
//! run, so the ratios hold even on a noisy machine.

use std::hint::black_box;
use std::time::Instant;

use clap::Parser;
use lifl_integration::update_values;
use lifl_sdk::fedavg::Accumulator;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "Benchmark the FedAvg fold against memcpy; prints JSON")]
struct Args {
    /// Parameters (f32) per update: 11.7M is ResNet-18.
    #[arg(long, default_value_t = 11_689_512)]
    params: usize,
    /// Updates folded per measurement.
    #[arg(long, default_value_t = 16)]
    updates: usize,
    /// Repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn best_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps.max(1))
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let args = Args::parse();
    let updates: Vec<Vec<f32>> = (0..args.updates)
        .map(|k| update_values(k as u64, args.params))
        .collect();
    let update_bytes = (args.params * 4) as f64;

    // The baseline: copy one update's bytes into memory already touched.
    let mut copy = vec![0f32; args.params];
    let mut which = 0;
    let memcpy = best_secs(args.reps * 4, || {
        copy.copy_from_slice(black_box(&updates[which % updates.len()]));
        black_box(&mut copy);
        which += 1;
    });
    let memcpy_gbps = update_bytes / memcpy / 1e9;

    let mut acc = Accumulator::new(args.params);
    let mut results = Vec::new();
    for per_pass in [1usize, 2, 4, 8] {
        let secs = best_secs(args.reps, || {
            acc.reset();
            for chunk in updates.chunks(per_pass) {
                let batch: Vec<(&[f32], u64)> = chunk.iter().map(|u| (u.as_slice(), 10)).collect();
                acc.fold(&batch).expect("updates match the model");
            }
            black_box(&acc);
        });
        let fold_gbps = update_bytes * updates.len() as f64 / secs / 1e9;
        results.push(json!({
            "updates_per_pass": per_pass,
            "fold_gbps": fold_gbps,
            "vs_memcpy": fold_gbps / memcpy_gbps,
        }));
    }
    let best = results
        .iter()
        .filter_map(|r| r["vs_memcpy"].as_f64())
        .fold(0.0, f64::max);
    let report = json!({
        "bench": "fold",
        "params": args.params,
        "updates": args.updates,
        "memcpy_gbps": memcpy_gbps,
        "fold": results,
        "aims": {"fold_at_least_0_8x_memcpy": best >= 0.8},
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("JSON values serialise")
    );
}
