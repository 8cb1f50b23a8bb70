//! CPU time and memory of processes, from `/proc` (Linux).

/// Clock ticks per second of `/proc/<pid>/stat` times: `AT_CLKTCK` from this
/// process's auxiliary vector (what `sysconf(_SC_CLK_TCK)` returns), else Linux's 100.
fn ticks_per_s() -> f64 {
    const AT_CLKTCK: u64 = 17;
    let auxv = std::fs::read("/proc/self/auxv").unwrap_or_default();
    auxv.chunks_exact(16)
        .map(|pair| {
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
            (word(&pair[..8]), word(&pair[8..]))
        })
        .find(|(key, _)| *key == AT_CLKTCK)
        .map(|(_, ticks)| ticks as f64)
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU seconds `pid` has used (user + system, all threads), plus those of its children
/// that have exited and been waited for when `with_reaped` is set.
pub(super) fn cpu_s(pid: u32, with_reaped: bool) -> f64 {
    // After the name: state is index 0, so utime/stime/cutime/cstime are 11..=14.
    let Some(f) = stat_fields(pid) else { return 0.0 };
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let mut ticks = n(11) + n(12);
    if with_reaped {
        ticks += n(13) + n(14);
    }
    ticks / ticks_per_s()
}

/// The live children of `pid`.
pub(super) fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|c| stat_fields(*c).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid))
        .collect()
}

/// CPU seconds of a server and all its worker processes (Postgres' postmaster and
/// backends): the live ones and those already exited.
pub(super) fn tree_cpu_s(pid: u32) -> f64 {
    cpu_s(pid, true) + children(pid).into_iter().map(|c| cpu_s(c, false)).sum::<f64>()
}

fn status_kib(pid: u32, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Peak resident memory of `pid`, MiB.
pub(super) fn peak_rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM:").unwrap_or(0.0) / 1024.0
}

/// Resident memory of `pid` now, MiB.
pub(super) fn rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:").unwrap_or(0.0) / 1024.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn clock_ticks_come_from_the_kernel() {
        // 100 on every common Linux configuration.
        assert_eq!(super::ticks_per_s(), 100.0);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let before = super::cpu_s(me, false);
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(super::cpu_s(me, false) > before, "CPU time grows while computing");
        // The peak after the current: other test threads may grow the process between reads.
        let rss = super::rss_mib(me);
        let peak = super::peak_rss_mib(me);
        assert!(peak >= rss && rss > 1.0, "peak {peak} MiB, current {rss} MiB");
    }
}
