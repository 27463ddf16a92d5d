//! Per-run settings of test programs: logging and the replayable seed.

/// Installs a log subscriber once, writing through the test harness's capture (`RUST_LOG`
/// filters; default: warnings).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The seed of this run: `CONFORMANCE_SEED` if set, else random; printed so a failure replays.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("CONFORMANCE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{test}: seed {seed} (replay with CONFORMANCE_SEED={seed})");
    seed
}
