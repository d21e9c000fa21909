//! The command line: subcommands, exit codes, logging set-up.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 usage or config error.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands::{Output, EXIT_FAILURE, EXIT_USAGE};
use crate::config::{Config, ConfigError, Environment, LogConfig, LogFormat};

/// Verified etcd snapshots and static-pod resources, stored as atomic backup sets.
#[derive(Debug, Parser)]
#[command(name = "etcd-backup-agent", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take one backup now, then exit (0 success, 1 failure, 2 config error).
    Backup {
        /// The agent's YAML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Run as a daemon: scheduled backups, the HTTP trigger, metrics (exit 0 after SIGTERM).
    Run {
        /// The agent's YAML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Ask the agent running on this node for a backup now, over its local HTTP
    /// endpoint (http.listen, with http.token_file); waits for the result unless
    /// --no-wait. Exit 0 when a new backup exists (or was accepted), 1 otherwise.
    Trigger {
        /// The agent's YAML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Return once the run is accepted instead of when it ends.
        #[arg(long)]
        no_wait: bool,
    },
    /// List the complete backup sets at the destination (this node's, by default).
    List {
        /// The agent's YAML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Which configured destination (its name under `destinations`;
        /// default: the first).
        #[arg(long, value_name = "NAME")]
        destination: Option<String>,
        /// Another node's sets.
        #[arg(long, conflicts_with = "all_nodes")]
        node: Option<String>,
        /// Every node of the cluster.
        #[arg(long)]
        all_nodes: bool,
        /// Also show leftovers of runs that did not finish.
        #[arg(long)]
        include_partial: bool,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
    /// Stream a set back and check every file against its manifest (exit 0 only when all match).
    Verify {
        /// The agent's YAML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Which configured destination (its name under `destinations`;
        /// default: the first).
        #[arg(long, value_name = "NAME")]
        destination: Option<String>,
        /// `latest`, a set timestamp (2026-11-24_120000) or `<cluster>/<node>/<timestamp>`.
        set: String,
        /// The node whose set it is (default: this node).
        #[arg(long)]
        node: Option<String>,
        /// For a paged set: also rebuild the snapshot from its packs and
        /// check it as a snapshot file is checked (without it, the page
        /// index and every pack are checked at their sizes and checksums).
        #[arg(long)]
        full: bool,
        /// Decrypting an encrypted set.
        #[command(flatten)]
        identity: IdentityOpts,
    },
    /// Download and verify a set into DIR, as cluster-restore.sh expects it
    /// (refused, exit 1, for a set the script cannot use, unless --snapshot-only).
    Fetch {
        /// The agent's YAML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Which configured destination (its name under `destinations`;
        /// default: the first).
        #[arg(long, value_name = "NAME")]
        destination: Option<String>,
        /// `latest`, a set timestamp or `<cluster>/<node>/<timestamp>`.
        set: String,
        /// Where to put the files (created if missing; must be empty unless --force).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// The node whose set it is (default: this node).
        #[arg(long)]
        node: Option<String>,
        /// Write into a non-empty DIR.
        #[arg(long)]
        force: bool,
        /// Fetch only the snapshot, of any set (DIR is then not a
        /// cluster-restore.sh directory; restore with `restore --snapshot`).
        #[arg(long)]
        snapshot_only: bool,
        /// With `latest`: the newest set not taken mid-rollout (a set whose
        /// manifest lists no `rollout_in_progress` pods).
        #[arg(long)]
        clean: bool,
        /// Decrypting an encrypted set.
        #[command(flatten)]
        identity: IdentityOpts,
    },
    /// Apply the retention policy to this node's sets (and stale leftovers).
    Prune {
        /// The agent's YAML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Which configured destination (its name under `destinations`;
        /// default: the first).
        #[arg(long, value_name = "NAME")]
        destination: Option<String>,
        /// Print what would be removed and why; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Another node's sets.
        #[arg(long)]
        node: Option<String>,
    },
    /// Fetch and verify a set's snapshot (or check a local one), then restore it
    /// with the real `etcdutl snapshot restore` (or `etcdctl` for etcd 3.4).
    Restore {
        /// The agent's YAML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Which configured destination (its name under `destinations`;
        /// default: the first).
        #[arg(long, value_name = "NAME")]
        destination: Option<String>,
        /// `latest`, a set timestamp or `<cluster>/<node>/<timestamp>` (default: latest).
        #[arg(conflicts_with = "snapshot")]
        set: Option<String>,
        /// Restore this local snapshot file instead of a stored set.
        #[arg(long, value_name = "FILE")]
        snapshot: Option<PathBuf>,
        /// The new member's data dir; must not exist or be empty.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The member's name (etcd --name).
        #[arg(long)]
        name: String,
        /// e.g. master-0=https://10.0.0.5:2380,master-1=https://10.0.0.6:2380
        #[arg(long)]
        initial_cluster: String,
        /// This member's peer URL(s).
        #[arg(long)]
        initial_advertise_peer_urls: String,
        /// A new cluster token (recommended when restoring a cluster).
        #[arg(long)]
        initial_cluster_token: Option<String>,
        /// Start the restored member N revisions above the snapshot's, all
        /// below marked compacted, so Kubernetes never sees a revision repeat
        /// (default 1000000000; give every member of a cluster the same N).
        #[arg(long, value_name = "N", conflicts_with = "no_bump_revision",
              value_parser = clap::value_parser!(u64).range(1..=(1u64 << 62)))]
        bump_revision: Option<u64>,
        /// Restore at the snapshot's own revision, for a plain etcd that no
        /// Kubernetes uses (its clients may see revisions go back in time).
        #[arg(long)]
        no_bump_revision: bool,
        /// The node whose set it is (default: this node).
        #[arg(long)]
        node: Option<String>,
        /// Decrypting an encrypted set.
        #[command(flatten)]
        identity: IdentityOpts,
    },
    /// Restore a set into a throwaway etcd on loopback and check it serves the
    /// backed-up data (exit 0 only then).
    Drill {
        /// The agent's YAML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Which configured destination (its name under `destinations`;
        /// default: the first).
        #[arg(long, value_name = "NAME")]
        destination: Option<String>,
        /// `latest`, a set timestamp or `<cluster>/<node>/<timestamp>` (default: latest).
        set: Option<String>,
        /// The node whose set it is (default: this node).
        #[arg(long)]
        node: Option<String>,
        /// Decrypting an encrypted set.
        #[command(flatten)]
        identity: IdentityOpts,
    },
    /// Validate a config file and exit (0 valid, 2 with every problem listed).
    CheckConfig {
        /// The agent's YAML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
}

/// The private key that decrypts encrypted sets (default: `encryption.identity_file`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IdentityOpts {
    /// An age identity file (AGE-SECRET-KEY-1…, as age-keygen writes it) or an
    /// SSH private key (ed25519 or RSA) whose public key is a recipient of the set.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// A file holding the passphrase of a passphrase-protected SSH --identity.
    #[arg(long, value_name = "FILE", requires = "identity")]
    pub identity_passphrase_file: Option<PathBuf>,
}

impl IdentityOpts {
    fn args(self) -> crate::commands::IdentityArgs {
        crate::commands::IdentityArgs {
            identity: self.identity,
            passphrase_file: self.identity_passphrase_file,
        }
    }
}

/// Parses the command line, runs the command and returns its exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    run(cli.command)
}

/// Runs one command; the exit code is the process's.
fn run(command: Command) -> ExitCode {
    match command {
        Command::CheckConfig { config } => check_config(&config),
        Command::List {
            config,
            destination,
            node,
            all_nodes,
            include_partial,
            output,
        } => with_config(&config, |c| async move {
            let c = match on_destination(c, destination.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let node = if all_nodes {
                None
            } else {
                Some(node.unwrap_or_else(|| c.node_name.clone()))
            };
            crate::commands::list::list(&c, node.as_deref(), include_partial, output).await
        }),
        Command::Verify {
            config,
            destination,
            set,
            node,
            full,
            identity,
        } => with_config(&config, |c| async move {
            let c = match on_destination(c, destination.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let node = node.unwrap_or_else(|| c.node_name.clone());
            crate::commands::verify::verify(&c, &node, &set, full, &identity.args()).await
        }),
        Command::Fetch {
            config,
            destination,
            set,
            to,
            node,
            force,
            snapshot_only,
            clean,
            identity,
        } => with_config(&config, |c| async move {
            let c = match on_destination(c, destination.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let node = node.unwrap_or_else(|| c.node_name.clone());
            let args = crate::commands::fetch::FetchArgs {
                to,
                force,
                snapshot_only,
                clean,
            };
            crate::commands::fetch::fetch(&c, &node, &set, &args, &identity.args()).await
        }),
        Command::Prune {
            config,
            destination,
            dry_run,
            node,
        } => with_config(&config, |c| async move {
            let c = match on_destination(c, destination.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let node = node.unwrap_or_else(|| c.node_name.clone());
            crate::commands::prune::prune(&c, &node, dry_run).await
        }),
        Command::Restore {
            config,
            destination,
            set,
            snapshot,
            data_dir,
            name,
            initial_cluster,
            initial_advertise_peer_urls,
            initial_cluster_token,
            bump_revision,
            no_bump_revision,
            node,
            identity,
        } => with_config(&config, |c| async move {
            let c = match on_destination(c, destination.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let node = node.unwrap_or_else(|| c.node_name.clone());
            let target = crate::restore::RestoreTarget {
                data_dir,
                name,
                initial_cluster,
                initial_advertise_peer_urls,
                initial_cluster_token,
            };
            let source = match snapshot {
                Some(file) => crate::commands::restore::SnapshotSourceArg::File(file),
                None => crate::commands::restore::SnapshotSourceArg::Set(
                    set.unwrap_or_else(|| "latest".into()),
                ),
            };
            let bump = if no_bump_revision {
                crate::restore::Bump::Off
            } else {
                crate::restore::Bump::By(
                    bump_revision.unwrap_or(crate::restore::DEFAULT_BUMP_REVISION),
                )
            };
            crate::commands::restore::restore(&c, &node, source, &target, bump, &identity.args())
                .await
        }),
        Command::Drill {
            config,
            destination,
            set,
            node,
            identity,
        } => with_config(&config, |c| async move {
            let c = match on_destination(c, destination.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let node = node.unwrap_or_else(|| c.node_name.clone());
            let wanted = set.as_deref().unwrap_or("latest");
            crate::commands::restore::drill(&c, &node, wanted, &identity.args()).await
        }),
        Command::Trigger { config, no_wait } => with_config(&config, |c| async move {
            crate::commands::backup::trigger(&c, !no_wait).await
        }),
        Command::Run { config } => with_config(&config, run_daemon),
        Command::Backup { config } => with_config(&config, |c| async move {
            crate::commands::backup::backup(&c).await
        }),
    }
}

/// The config narrowed to the destination `--destination` names (the first
/// configured one without it), so a command reads and writes only there.
fn on_destination(c: Config, name: Option<&str>) -> Result<Config, ExitCode> {
    match c.only_destination(name) {
        Ok(c) => Ok(c),
        Err(e) => {
            eprintln!("error: --destination: {e}");
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

/// `check-config`: the config validated completely, summed up on one line.
fn check_config(config: &std::path::Path) -> ExitCode {
    match load(config) {
        Ok(c) => {
            println!(
                "{}: valid (node {}, cluster {}, etcd {}, destination {}{}{})",
                config.display(),
                c.node_name,
                c.cluster_name,
                c.etcd.endpoints[0].as_str().trim_end_matches('/'),
                if c.destinations.len() == 1 {
                    c.destination().describe()
                } else {
                    c.destinations
                        .iter()
                        .map(|d| format!("{} {}", d.name, d.config.describe()))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                c.encryption.as_ref().map_or(String::new(), |e| format!(
                    ", encrypted with age to {} recipient(s)",
                    e.recipients.len()
                )),
                c.compression.map_or(String::new(), |z| format!(
                    ", snapshot compressed with {} level {}",
                    z.algorithm.as_str(),
                    z.level
                ))
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `run`: the daemon, until SIGTERM or SIGINT.
async fn run_daemon(c: Config) -> ExitCode {
    if c.daemon.schedule.is_none() {
        eprintln!("error: {}", crate::daemon::DaemonError::NoSchedule);
        return ExitCode::from(EXIT_USAGE);
    }
    match crate::daemon::run(c).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "daemon failed");
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path, &Environment::from_process()).map_err(|e| {
        eprintln!("error: {e}");
        if let ConfigError::Invalid { .. } = e {
            eprintln!(
                "fix the fields above and run `etcd-backup-agent check-config --config {}`",
                path.display()
            );
        }
        ExitCode::from(EXIT_USAGE)
    })
}

/// Sets up `tracing` to stderr; `RUST_LOG`, when set, wins over `log.level`.
pub fn init_logging(log: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::builder().parse(v).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::builder()
                .parse(&log.level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already initialised (tests calling twice) is fine.
    let _ = result;
}

/// Loads the config, sets up logging and a one-thread runtime, and runs `f`.
///
/// One thread: on a control-plane node the cores belong to etcd and the API
/// server. It is also faster here, with no hand-offs between threads on the
/// streaming path (BENCHMARKS.md).
fn with_config<F, Fut>(path: &std::path::Path, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.log);
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f(config)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
