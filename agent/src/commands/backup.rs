//! `backup` (one run now, in this process, then retention) and `trigger` (ask
//! the agent running on this node for one over its HTTP API).

use std::process::ExitCode;

use crate::commands::EXIT_FAILURE;
use crate::config::Config;

pub async fn backup(config: &Config) -> ExitCode {
    // Ctrl-C or SIGTERM stops the run and removes what it wrote.
    let cancel = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            crate::daemon::shutdown_signal().await;
            tracing::warn!("signal received; cancelling the backup");
            cancel.cancel();
        })
    };
    let outcome = crate::backup::run_with_retries(config, &cancel).await;
    watcher.abort();
    for (name, e) in &outcome.retention_errors {
        // The backup itself is complete; say so, but do not hide this.
        eprintln!(
            "warning: the backup succeeded, but applying retention at destination {name} failed: {e}"
        );
    }
    match outcome.result {
        Ok(report) => {
            let m = &report.manifest;
            if config.destinations.len() == 1 {
                println!("backup set {} complete", report.location);
            } else {
                println!("backup set {}", report.set.dir());
                for d in &report.destinations {
                    if let crate::backup::DestinationResult::Succeeded { durable } = d.result {
                        println!(
                            "  destination {:<20} complete at {}{}",
                            d.name,
                            d.location,
                            if durable { "" } else { " (not durable)" }
                        );
                    } else {
                        println!("  destination {:<20} FAILED: {d}", d.name);
                    }
                }
            }
            for f in &m.files {
                println!("  {:<48} {:>14} bytes  sha256:{}", f.name, f.size, f.sha256);
            }
            println!(
                "  etcd {} member {} (cluster {}), revision {}",
                m.etcd.version, m.etcd.member_id, m.etcd.cluster_id, m.etcd.revision
            );
            let paged = m
                .file(etcd_backup_proto::FileKind::Snapshot)
                .and_then(|f| f.pages.as_deref());
            if let Some(p) = paged {
                println!(
                    "  snapshot stored as {} pages of {} bytes: {} new, {} bytes added ({} packs named; {}); fetch rebuilds the plain .db",
                    p.pages,
                    p.page_size,
                    p.new_pages,
                    p.added_bytes,
                    p.packs.len(),
                    p.compared_with.map_or_else(
                        || "no earlier set compared with".to_string(),
                        |ts| format!("compared with {ts}")
                    )
                );
            }
            if let (Some(c), None) = (&m.compression, paged) {
                let plain = m
                    .file(etcd_backup_proto::FileKind::Snapshot)
                    .and_then(|f| f.plaintext.as_ref());
                println!(
                    "  snapshot compressed with {} level {}{}; fetch writes the plain .db, or zstd -d",
                    c.algorithm.as_str(),
                    c.level,
                    plain.map_or(String::new(), |p| format!(" from {} bytes", p.size))
                );
            }
            if let Some(enc) = &m.encryption {
                println!(
                    "  encrypted with {} to {} recipient(s); decrypt with --identity, or age -d",
                    enc.scheme,
                    enc.recipients.len()
                );
            }
            if !m.durable && config.destinations.len() == 1 {
                if m.durability == Some(etcd_backup_proto::DurabilityLevel::FilesSynced) {
                    println!(
                        "  not durable: the files were synced but the server would not sync the set directory, so a crash of the server may undo the renames that publish the set (docs/sftp.md)"
                    );
                } else {
                    println!(
                        "  not durable: the server could not sync the files (no fsync@openssh.com; destination.sftp.require_fsync is false)"
                    );
                }
            }
            if report.is_partial() {
                eprintln!(
                    "error: backup partial: {}",
                    crate::daemon::runner::partial_message(&report.destinations)
                );
                return ExitCode::from(EXIT_FAILURE);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `trigger`: POST /v1/backups to the agent on this node.
pub async fn trigger(config: &Config, wait: bool) -> ExitCode {
    let mut addr = config.daemon.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!(
        "http://{addr}/v1/backups{}",
        if wait { "?wait=true" } else { "" }
    );
    let client = reqwest::Client::new();
    let mut request = client.post(&url);
    if let Some(path) = &config.daemon.token_file {
        match std::fs::read_to_string(path) {
            Ok(t) => request = request.bearer_auth(t.trim()),
            Err(e) => {
                eprintln!("error: cannot read http.token_file {}: {e}", path.display());
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "error: no answer from the agent at {addr} (http.listen): {}; is `etcd-backup-agent run` running on this node?",
                crate::error_chain::chain(&e)
            );
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let pretty = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(body);
    if status.is_success() {
        println!("{pretty}");
        ExitCode::SUCCESS
    } else {
        eprintln!("error: the agent answered {status}:\n{pretty}");
        ExitCode::from(EXIT_FAILURE)
    }
}
