//! horde-benches: throughput and latency benchmarks that measure horde's path and its baselines
//! (plain TCP, TCP + TLS, raw quinn) in the same run and print ratios. This library holds what
//! several bench binaries share: medians and quantiles, and the CPU time and load figures read
//! from `/proc`.

use anyhow::Context as _;

/// Clock ticks per second of `/proc/PID/stat` CPU times (`getconf CLK_TCK`, 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// The median of `values` (the mean of the middle two for an even count); NaN for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}

/// The `q` quantile (0..=1) of sorted `values` (nearest rank); NaN for none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

/// `n`, p50, p99, max of `values` (sorted here).
pub fn latency_summary(mut values: Vec<f64>) -> (usize, f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values.len(),
        quantile(&values, 0.5),
        quantile(&values, 0.99),
        values.last().copied().unwrap_or(f64::NAN),
    )
}

/// CPU time (user + system, seconds) of process `pid` so far, from `/proc/PID/stat`.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("no ) in stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state.
    let ticks: f64 = fields.get(11).context("no utime")?.parse::<f64>()?
        + fields.get(12).context("no stime")?.parse::<f64>()?;
    Ok(ticks / CLK_TCK)
}

/// The load average (1, 5, 15 min) of the machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 51.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert!(quantile(&[], 0.5).is_nan());
        let (n, p50, p99, max) = latency_summary(vec![3.0, 1.0, 2.0]);
        assert_eq!((n, p50, p99, max), (3, 2.0, 3.0, 3.0));
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        // Spin until the kernel has charged at least one tick.
        let start = std::time::Instant::now();
        while cpu_secs(std::process::id()).unwrap_or(0.0) <= 0.0 {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
        }
    }
}
