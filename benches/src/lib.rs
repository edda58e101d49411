//! horde-benches: throughput and latency benchmarks that measure horde's path and its baselines
//! (plain TCP, TCP + TLS, raw quinn) in the same run and print ratios.
