//! `prune`: retention applied to the destination now (or shown, with `--dry-run`).

use std::process::ExitCode;

use crate::config::Config;

use super::{fail, open};
use crate::commands::EXIT_FAILURE;

/// `prune`.
pub async fn prune(config: &Config, node: &str, dry_run: bool) -> ExitCode {
    let dest = match open(config).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    if !config.retention.is_enabled() {
        println!("retention: no keep_* rule and no max_age configured; complete sets are all kept");
    }
    let report = match crate::store::prune::prune(
        dest.as_ref(),
        config,
        node,
        chrono::Utc::now(),
        None,
        dry_run,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let verb = if dry_run { "would remove" } else { "removed" };
    for d in &report.decisions {
        let reasons: Vec<String> = d.reasons.iter().map(ToString::to_string).collect();
        let what = if d.keep {
            "keep".to_string()
        } else {
            verb.to_string()
        };
        println!(
            "{what:<12} {}/{node}/{}  ({})",
            config.cluster_name,
            d.timestamp,
            reasons.join(", ")
        );
    }
    for l in &report.removed_leftovers {
        println!(
            "{verb:<12} {l}  (leftover older than stale_partial_after {})",
            crate::policy::retention::format_duration(config.retention.stale_partial_after)
        );
    }
    for (dir, why) in &report.left_alone {
        println!("{:<12} {dir}  ({why})", "leave alone");
    }
    let packs = &report.packs;
    for p in &packs.removed {
        println!("{verb:<12} {p}  (a pack no complete set names)");
    }
    for p in &packs.removed_partials {
        println!(
            "{verb:<12} {p}  (a pack of a run that did not finish, older than stale_partial_after)"
        );
    }
    if packs.referenced + packs.young + packs.removed.len() + packs.removed_partials.len() > 0 {
        println!(
            "packs: {} named by complete sets (kept), {} not named yet but younger than stale_partial_after (kept), {} {} ({} bytes)",
            packs.referenced,
            packs.young,
            packs.removed.len(),
            verb,
            packs.removed_bytes
        );
    }
    if let Some(why) = &packs.blocked {
        eprintln!("error: {why}");
    }
    let (kept, removed) = crate::policy::retention::counts(&report.decisions);
    println!(
        "{kept} set(s) kept, {removed} {}, {} leftover(s) {}",
        if dry_run {
            "would be removed"
        } else {
            "removed"
        },
        report.removed_leftovers.len(),
        if dry_run {
            "would be removed"
        } else {
            "removed"
        }
    );
    if report.errors.is_empty() && report.packs.blocked.is_none() {
        ExitCode::SUCCESS
    } else {
        for e in &report.errors {
            eprintln!("error: {e}");
        }
        ExitCode::from(EXIT_FAILURE)
    }
}
