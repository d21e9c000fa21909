//! The command-line verbs, one file each, and what they share: exit codes,
//! output formats, opening the destination, finding a set, identities. A
//! command may import everything below it (daemon, backup, restore, store,
//! source, config, policy); nothing below imports a command.

/// Exit code for a failed operation.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for a usage or configuration error.
pub const EXIT_USAGE: u8 = 2;

/// Output format of `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use crate::config::Config;
use crate::encryption::{load_identities, Identities};
use crate::store::catalog::{self, CatalogSet};
use crate::store::destination::{self, Destination};
use crate::store::verify::FileReport;

/// Sizes for people: 1.1 GiB, 4.2 KiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_FAILURE)
}

async fn open(config: &Config) -> Result<Box<dyn Destination>, ExitCode> {
    destination::open(config.destination())
        .await
        .map_err(|e| fail(format!("cannot open the destination: {e}")))
}

/// Progress for people: a bar on a terminal, a line per file otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    current: Mutex<String>,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            current: Mutex::new(String::new()),
        }
    }

    fn update(&self, name: &str, done: u64, total: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if *current != name {
            *current = name.to_string();
            match &self.bar {
                Some(bar) => {
                    bar.reset();
                    bar.set_length(total);
                    bar.set_message(name.to_string());
                }
                None => eprintln!("reading {name} ({})", human_bytes(total)),
            }
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Where the private key to decrypt sets with comes from: `--identity`
/// (and `--identity-passphrase-file`), else `encryption.identity_file`.
#[derive(Debug, Clone, Default)]
pub struct IdentityArgs {
    /// `--identity FILE`.
    pub identity: Option<PathBuf>,
    /// `--identity-passphrase-file FILE`.
    pub passphrase_file: Option<PathBuf>,
}

/// Loads the identities to decrypt with, if any were given or configured.
fn identities(config: &Config, args: &IdentityArgs) -> Result<Option<Identities>, ExitCode> {
    let result = match &args.identity {
        Some(path) => load_identities(path, args.passphrase_file.as_deref()).map(Some),
        None => crate::restore::config_identities(config),
    };
    result.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

/// Says what a set's encryption means for the command at hand.
fn note_encryption(set: &CatalogSet, ids: Option<&Identities>, without: &str) {
    match (&set.manifest.encryption, ids) {
        (Some(enc), None) => println!(
            "set {} is encrypted ({}) to: {}; {without}",
            set.id.dir(),
            enc.scheme,
            enc.recipients.join(", ")
        ),
        (Some(_), Some(ids)) => println!(
            "set {} is encrypted; decrypting with {}",
            set.id.dir(),
            ids.path.display()
        ),
        (None, Some(_)) => println!(
            "set {} is not encrypted; the identity is not needed",
            set.id.dir()
        ),
        (None, None) => {}
    }
}

/// Says that a set's snapshot is compressed, and whether it is decompressed
/// here (always, unless it is also encrypted and no key is at hand).
fn note_compression(set: &CatalogSet, ids: Option<&Identities>) {
    let Some(c) = &set.manifest.compression else {
        return;
    };
    if set.manifest.encryption.is_some() && ids.is_none() {
        println!(
            "the snapshot of set {} is {}-compressed inside its encryption; without a key it is checked as stored",
            set.id.dir(),
            c.algorithm.as_str()
        );
    } else {
        println!(
            "the snapshot of set {} is {}-compressed; decompressing it to check (and write) the plain snapshot",
            set.id.dir(),
            c.algorithm.as_str()
        );
    }
}

fn print_reports(reports: &[FileReport]) -> bool {
    let mut all_ok = true;
    for r in reports {
        if r.ok() {
            let how = match (r.decrypted, r.decompressed) {
                (true, true) => ", decrypted, decompressed and checked",
                (true, false) => ", decrypted and checked",
                (false, true) => ", decompressed and checked",
                (false, false) => "",
            };
            println!("ok      {}  ({}{how})", r.name, human_bytes(r.size));
        } else {
            all_ok = false;
            for p in &r.problems {
                println!("BAD     {}: {p}", r.name);
            }
        }
    }
    all_ok
}

/// Warns when `set` was taken mid-rollout: its static-pod resources may not
/// match its snapshot.
fn note_rollout(set: &CatalogSet) {
    let pods = &set.manifest.rollout_in_progress;
    if !pods.is_empty() {
        eprintln!(
            "warning: set {} was taken while {} {} mid-rollout on the node: its static-pod resources may not match its snapshot (`fetch latest --clean` picks the newest set taken outside a rollout)",
            set.id.dir(),
            pods.join(", "),
            if pods.len() == 1 { "was" } else { "were" }
        );
    }
}

async fn find(
    config: &Config,
    dest: &dyn Destination,
    node: &str,
    wanted: &str,
) -> Result<CatalogSet, ExitCode> {
    catalog::find(dest, &config.cluster_name, node, wanted)
        .await
        .map_err(|e| match e {
            catalog::CatalogError::BadSetName { .. } => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_USAGE)
            }
            other => fail(other),
        })
}

pub mod backup;
pub mod fetch;
pub mod list;
pub mod prune;
pub mod restore;
pub mod verify;
