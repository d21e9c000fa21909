//! `list`: the complete sets (and leftovers) a destination holds, for people or as JSON.

use std::process::ExitCode;

use etcd_backup_proto::api::{LeftoverKind, SetList};

use crate::config::Config;
use crate::store::catalog::{self, CatalogSet};

use super::{fail, human_bytes, open};
use crate::commands::Output;

/// `list`.
pub async fn list(
    config: &Config,
    node: Option<&str>,
    include_partial: bool,
    output: Output,
) -> ExitCode {
    let dest = match open(config).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    let cat = match catalog::scan(dest.as_ref(), &config.cluster_name, node).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let list = SetList {
        sets: cat.sets.iter().rev().map(CatalogSet::summary).collect(),
        leftovers: if include_partial {
            cat.leftovers
                .iter()
                .rev()
                .map(catalog::Leftover::summary)
                .collect()
        } else {
            Vec::new()
        },
    };
    match output {
        Output::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&list).expect("a list always serializes")
            );
        }
        Output::Table => {
            println!(
                "{:<19}  {:<20}  {:>10}  {:<6}  {:>10}  {:>10}  {:>10}  {:>8}  {:<9}  {:<11}  {:<9}  {:<7}  {:<7}  SET",
                "TIME (UTC)",
                "NODE",
                "SNAPSHOT",
                "FORMAT",
                "ADDED",
                "RESOURCES",
                "REVISION",
                "KEYS",
                "ENCRYPTED",
                "COMPRESSION",
                "LAYOUT",
                "DURABLE",
                "ROLLOUT"
            );
            for s in &list.sets {
                println!(
                    "{:<19}  {:<20}  {:>10}  {:<6}  {:>10}  {:>10}  {:>10}  {:>8}  {:<9}  {:<11}  {:<9}  {:<7}  {:<7}  {}",
                    s.timestamp.as_datetime().format("%Y-%m-%d %H:%M:%S"),
                    s.node,
                    human_bytes(s.snapshot_bytes),
                    s.format,
                    human_bytes(s.added_bytes),
                    s.resources_bytes.map_or("-".to_string(), human_bytes),
                    s.revision,
                    s.total_key.map_or("-".to_string(), |k| k.to_string()),
                    if s.encrypted { "age" } else { "no" },
                    s.compression,
                    if s.layout.is_empty() { "-" } else { &s.layout },
                    if s.durable { "yes" } else { "no" },
                    if s.rollout_in_progress.is_empty() {
                        "-".to_string()
                    } else {
                        s.rollout_in_progress.join(",")
                    },
                    s.set
                );
            }
            if list.sets.is_empty() {
                eprintln!(
                    "no complete sets for {} in {}",
                    node.map_or("any node".to_string(), |n| format!("node {n}")),
                    dest.describe()
                );
            }
            for l in &list.leftovers {
                let what = match l.kind {
                    LeftoverKind::OwnPartial => "partial",
                    LeftoverKind::NewerFormat => "newer",
                    LeftoverKind::Unrecognised => "unknown",
                };
                println!(
                    "{what:<8} {}  ({}; {} file(s))",
                    l.dir,
                    l.why,
                    l.files.len()
                );
            }
            let attention = cat.leftovers.iter().filter(|l| l.needs_attention()).count();
            if attention > 0 && !include_partial {
                eprintln!(
                    "{attention} entr{} this agent did not write or does not understand (never removed); see `list --include-partial`",
                    if attention == 1 { "y" } else { "ies" }
                );
            }
        }
    }
    ExitCode::SUCCESS
}
