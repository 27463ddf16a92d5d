//! Small measurements shared by the bench modes: percentiles, medians, a process's peak RSS.

/// The `p` quantile (0..=1) of sorted samples; 0 when there are none.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median of `values` (the mean of the middle two for an even count); 0 when empty.
pub(crate) fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Peak resident set size (`VmHWM`) of process `pid` (`None`: this one), in MiB; 0 when
/// unknown.
pub(crate) fn peak_rss_mib(pid: Option<u32>) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Resident set size (`VmRSS`) of process `pid` (`None`: this one), in MiB; 0 when unknown.
pub(crate) fn rss_mib(pid: Option<u32>) -> f64 {
    status_mib(pid, "VmRSS:")
}

fn status_mib(pid: Option<u32>, field: &str) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Free memory the allocator holds, in MiB (see [`kvstore::alloc::free_bytes`]).
pub(crate) fn heap_free_mib() -> f64 {
    kvstore::alloc::free_bytes() as f64 / (1u64 << 20) as f64
}

/// Resets this process's peak RSS to its current RSS (Linux `clear_refs` 5), so that a later
/// [`peak_rss_mib`] covers only what came after.
pub(crate) fn reset_peak_rss() -> Result<(), String> {
    std::fs::write("/proc/self/clear_refs", b"5")
        .map_err(|e| format!("resetting the peak RSS (/proc/self/clear_refs): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn percentile_picks_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
