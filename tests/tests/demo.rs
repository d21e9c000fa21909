//! `scripts/demo`'s daemon part, run as a new user sees it: the real script,
//! with its real etcd, the real agent binary (built here, handed over with
//! `ETCD_BACKUP_AGENT_BIN`) and `curl`. Its output must show what the agent
//! exists for: a scheduled set, a set taken by `curl -XPOST …?wait=true`, the
//! metrics the alerts read, a failed run while etcd is down, and SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Command;

use etcd_backup_tests::agent::agent_bin;
use etcd_backup_tests::require_tool;

/// The value after `prefix` on the first line of `out` that starts with it.
fn after<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| {
            panic!("the demo printed no line starting {prefix:?}; it printed:\n{out}")
        })
        .trim()
}

/// The metric lines of `out` (the demo indents them by four spaces) whose
/// series is exactly `series`, with their values, in order.
fn samples(out: &str, series: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.trim_start().strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().expect("a metric value"))
        .collect()
}

/// A complete set the agent wrote: a directory under `backups` with its manifest.
fn assert_complete_set(set: &str, backups: &Path, what: &str) {
    let set = PathBuf::from(set);
    assert!(
        set.starts_with(backups),
        "the {what} set {} is not under the demo's --backups {}",
        set.display(),
        backups.display()
    );
    assert!(
        set.join("manifest.json").is_file(),
        "the {what} set {} has no manifest.json",
        set.display()
    );
}

#[test]
fn demo_daemon_part_shows_a_scheduled_set_an_http_set_the_alert_metrics_and_a_clean_sigterm() {
    require_tool("etcd", "etcd-server");
    require_tool("etcdctl", "etcd-client");
    require_tool("curl", "curl");
    let backups = tempfile::tempdir().unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo");
    let run = Command::new(&demo)
        .args(["--daemon-only", "--backups"])
        .arg(backups.path())
        .env("ETCD_BACKUP_AGENT_BIN", agent_bin())
        .output()
        .expect("run scripts/demo");
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "scripts/demo --daemon-only failed ({}); stdout:\n{out}\nstderr:\n{err}",
        run.status
    );

    // The commands, printed before they run, as an admin would type them.
    assert!(
        out.contains("==> the daily job: etcd-backup-agent run --config "),
        "{out}"
    );
    assert!(out.contains("schedule: \"@every 15s\""), "{out}");
    assert!(out.contains("curl -fsS -XPOST 'http://127.0.0.1:"), "{out}");
    assert!(out.contains("/v1/backups?wait=true'"), "{out}");

    let scheduled = after(&out, "==> a scheduled set: ");
    let http = after(&out, "==> an HTTP-triggered set: ");
    assert_complete_set(scheduled, backups.path(), "scheduled");
    assert_complete_set(http, backups.path(), "HTTP-triggered");
    assert_ne!(
        scheduled, http,
        "the HTTP trigger must make a set of its own"
    );
    // The POST's answer is the run record of that set.
    let answer = out
        .lines()
        .find(|l| l.trim_start().starts_with('{') && l.contains("\"trigger\":\"http\""))
        .unwrap_or_else(|| panic!("no run record answered the POST:\n{out}"));
    assert!(answer.contains("\"state\":\"succeeded\""), "{answer}");

    // The metric lines: shown after the HTTP run and again after the recovery.
    let last_success = samples(
        &out,
        "etcd_backup_last_success_timestamp_seconds{destination=\"default\"}",
    );
    assert_eq!(last_success.len(), 2, "{out}");
    assert!(last_success.iter().all(|t| *t > 1.7e9), "{last_success:?}");
    assert!(last_success[1] > last_success[0], "{last_success:?}");
    let http_ok = samples(
        &out,
        "etcd_backup_runs_total{trigger=\"http\",result=\"success\"}",
    );
    assert_eq!(http_ok, [1.0, 1.0], "{out}");
    let scheduled_failed = samples(
        &out,
        "etcd_backup_runs_total{trigger=\"schedule\",result=\"failure\"}",
    );
    // Once before etcd stops, once in the failure's own lines, once after.
    assert_eq!(scheduled_failed, [0.0, 1.0, 1.0], "{out}");
    let scheduled_ok = samples(
        &out,
        "etcd_backup_runs_total{trigger=\"schedule\",result=\"success\"}",
    );
    assert_eq!(scheduled_ok.len(), 3, "{out}");
    assert!(
        scheduled_ok[0] >= 1.0 && scheduled_ok[2] > scheduled_ok[1],
        "{scheduled_ok:?}"
    );
    let ages: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            l.trim_start()
                .strip_prefix("time() - etcd_backup_last_success_timestamp_seconds = ")
        })
        .collect();
    assert_eq!(ages.len(), 2, "{out}");
    for age in ages {
        let seconds: u64 = age
            .strip_suffix(" s")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("age line {age:?}"));
        assert!(seconds < 120, "a backup just taken is {seconds} s old?");
    }
    assert!(
        out.contains("kill -TERM ") && out.contains("    exit status 0"),
        "{out}"
    );
}
