//! Helpers shared by the benchmarks: how criterion was asked to run, the quick-mode switch
//! CI uses, and medians.

#![allow(dead_code)]

pub mod vmms;

/// How the bench binary was asked to run, from criterion's own arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Bench,
    Test,
    List,
}

pub fn mode_from_args() -> Mode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |f: &str| args.iter().any(|a| a == f);
    if has("--list") {
        Mode::List
    } else if has("--bench") && !has("--test") {
        Mode::Bench
    } else {
        // `cargo test --benches` passes no `--bench`; criterion runs each benchmark once.
        Mode::Test
    }
}

/// `PODVMM_BENCH_QUICK=1` (CI) or criterion's `--quick`: short runs.
pub fn quick_requested() -> bool {
    let env = std::env::var("PODVMM_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    env || std::env::args().any(|a| a == "--quick")
}

/// The median of `samples` (the mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    assert!(!v.is_empty(), "no samples");
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
