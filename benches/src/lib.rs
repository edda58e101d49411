//! horde-benches: throughput and latency benchmarks that measure horde's path and its baselines
//! (plain TCP, TCP + TLS, raw quinn) in the same run and print ratios.

/// The median of `values` (the mean of the middle two for an even count); NaN for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}
