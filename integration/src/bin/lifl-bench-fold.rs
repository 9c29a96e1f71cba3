//! `lifl-bench-fold`: how fast an aggregator folds updates, beside an
//! in-run memcpy of the same bytes on one core, as JSON.
//!
//! The fold reads every update once and keeps one `f64` sum per parameter;
//! folding several arrived updates per pass over that sum is what lets it
//! keep up with memory bandwidth. Each batch size is measured in the same
//! run, so the ratios hold even on a noisy machine.

use clap::Parser;
use lifl_integration::measure_fold;
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

fn main() {
    let args = Args::parse();
    let measured = measure_fold(args.params, args.updates, args.reps);
    let best = measured["fold"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["vs_memcpy"].as_f64())
        .fold(0.0, f64::max);
    let report = json!({
        "bench": "fold",
        "params": args.params,
        "updates": args.updates,
        "memcpy_gbps": measured["memcpy_gbps"],
        "fold": measured["fold"],
        "aims": {"fold_at_least_0_8x_memcpy": best >= 0.8},
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("JSON values serialise")
    );
}
