//! `skip_unchanged`: whether a run the daemon starts itself (the schedule,
//! `run_on_start`) would only store a copy of a set the destinations already
//! hold. HTTP-triggered runs and the `backup` command never ask.
//!
//! The run is skipped only when, at every configured destination, this
//! node's newest complete set was taken from the same etcd member (cluster
//! and member ID) at exactly etcd's current revision, is durable, was not
//! taken mid-rollout and was stored the way this run would store it
//! (encryption recipients, compression, resources layout); and no newer
//! set of this node there is damaged or of a newer format. Anything
//! else, and any failure to find out (etcd or a destination unreachable),
//! means a normal run: when in doubt, back up.
//!
//! Which revision: a set's manifest holds two. `etcd.revision` is the store
//! revision in the header of the status call made just before the snapshot;
//! the snapshot holds at least that revision. `snapshot_status.revision` is
//! the highest revision of a key inside the snapshot; the snapshot holds at
//! least that too (it can be lower than the store's revision: a deleted key's
//! tombstone is gone once compacted). Revisions only grow, so the revision
//! the snapshot was taken at lies between either of them and etcd's revision
//! now: when etcd's revision now equals either one, nothing was written since
//! the snapshot.
//!
//! What the revision does not cover: changes that write no key (membership,
//! auth users and roles, lease grants) and the static-pod resources on disk.
//! `docs/daemon.md` says so; `skip_unchanged: false` stores every run.

use std::collections::BTreeSet;

use etcd_backup_proto::Compression;

use crate::config::Config;
use crate::source::etcd::{EtcdMember, SnapshotSource};
use crate::store::catalog::{Catalog, CatalogSet, LeftoverKind, ManifestCache};
use crate::store::destination;

/// What etcd says about itself now: the member and its store revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdNow {
    /// etcd cluster ID.
    pub cluster_id: u64,
    /// etcd member ID of the local member.
    pub member_id: u64,
    /// Store revision in the status response header.
    pub revision: i64,
}

/// How this run would store a set, so a set stored another way (encryption
/// or compression switched on since) is not taken as current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storing {
    /// The age recipients' texts, as manifests record them; `None` unencrypted.
    pub recipients: Option<BTreeSet<String>>,
    /// The snapshot's compression; `None` uncompressed.
    pub compression: Option<Compression>,
    /// `resources.layout`.
    pub layout: String,
    /// `snapshot_format`: whether the snapshot is stored as pages.
    pub paged: bool,
}

impl Storing {
    /// How `config` stores sets.
    pub fn of(config: &Config) -> Self {
        Self {
            recipients: config
                .encryption
                .as_ref()
                .map(|e| e.recipient_texts().into_iter().collect()),
            compression: config.compression.as_ref().map(|c| c.algorithm),
            layout: config.resources.layout.as_str().to_string(),
            paged: config.snapshot_format == crate::config::SnapshotFormat::Paged,
        }
    }
}

/// Why a destination's newest set does not make a new one redundant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotCurrent {
    /// The destination holds no complete set of this node.
    #[error("no complete set of this node")]
    NoSet,
    /// A set newer than the newest complete one cannot be read (damaged,
    /// or a newer manifest format): its revision is unknown.
    #[error("{dir} is newer than the newest complete set and cannot be read ({why})")]
    NewerUnreadable {
        /// The set directory.
        dir: String,
        /// Why the catalog does not count it as complete.
        why: String,
    },
    /// The newest set is not durable (an SFTP server without fsync).
    #[error("the newest set {set} is not durable")]
    NotDurable {
        /// The set.
        set: String,
    },
    /// The newest set was taken while a static pod was mid-rollout.
    #[error("the newest set {set} was taken mid-rollout of {pods}")]
    Rollout {
        /// The set.
        set: String,
        /// The static pods that were rolling out.
        pods: String,
    },
    /// The newest set comes from another etcd cluster or member.
    #[error("the newest set {set} was taken from etcd cluster {cluster_id} member {member_id}, not from this member")]
    OtherMember {
        /// The set.
        set: String,
        /// Its manifest's cluster ID.
        cluster_id: String,
        /// Its manifest's member ID.
        member_id: String,
    },
    /// etcd's revision differs from the newest set's.
    #[error("the newest set {set} holds revision {set_revision}, etcd is at {etcd_revision}")]
    Revision {
        /// The set.
        set: String,
        /// The revision the set records (its snapshot's).
        set_revision: i64,
        /// etcd's revision now.
        etcd_revision: i64,
    },
    /// The newest set is stored differently than this run would store it.
    #[error("the newest set {set} differs in {what} from what the configuration stores now")]
    Settings {
        /// The set.
        set: String,
        /// `encryption`, `compression` or `resources.layout`.
        what: &'static str,
    },
}

/// This node's newest complete set in `cat` (a scan of this node's
/// directory at one destination) when it holds exactly etcd's current
/// revision and is stored as `storing` would store it; else why not.
///
/// # Errors
/// [`NotCurrent`]: the reason a new set is needed.
pub fn current_set<'c>(
    cat: &'c Catalog,
    node: &str,
    etcd: EtcdNow,
    storing: &Storing,
) -> Result<&'c CatalogSet, NotCurrent> {
    let newest = cat
        .sets
        .iter()
        .filter(|s| s.id.node == node)
        .max_by_key(|s| s.id.timestamp)
        .ok_or(NotCurrent::NoSet)?;
    let set = newest.id.dir();
    // A set directory the catalog could not count as complete (a damaged
    // manifest, a newer format) that is newer: it may hold a
    // revision this agent cannot see. A complete set that also holds
    // foreign files is listed as a leftover too, with its own directory.
    if let Some(l) = cat.leftovers.iter().find(|l| {
        l.node == node
            && l.kind != LeftoverKind::OwnPartial
            && l.timestamp.is_some_and(|t| t > newest.id.timestamp)
            && !cat.sets.iter().any(|s| s.id.dir() == l.dir)
    }) {
        return Err(NotCurrent::NewerUnreadable {
            dir: l.dir.clone(),
            why: l.why.clone(),
        });
    }
    let m = &newest.manifest;
    if !m.durable {
        return Err(NotCurrent::NotDurable { set });
    }
    if !m.rollout_in_progress.is_empty() {
        return Err(NotCurrent::Rollout {
            set,
            pods: m.rollout_in_progress.join(", "),
        });
    }
    if m.etcd.cluster_id != format!("{:016x}", etcd.cluster_id)
        || m.etcd.member_id != format!("{:016x}", etcd.member_id)
    {
        return Err(NotCurrent::OtherMember {
            set,
            cluster_id: m.etcd.cluster_id.clone(),
            member_id: m.etcd.member_id.clone(),
        });
    }
    let snapshot_revision = m.snapshot_status.map(|s| s.revision);
    if m.etcd.revision != etcd.revision && snapshot_revision != Some(etcd.revision) {
        return Err(NotCurrent::Revision {
            set,
            set_revision: m.revision(),
            etcd_revision: etcd.revision,
        });
    }
    let recipients = m
        .encryption
        .as_ref()
        .map(|e| e.recipients.iter().cloned().collect::<BTreeSet<String>>());
    if recipients != storing.recipients {
        return Err(NotCurrent::Settings {
            set,
            what: "encryption",
        });
    }
    if m.compression.as_ref().map(|c| c.algorithm) != storing.compression {
        return Err(NotCurrent::Settings {
            set,
            what: "compression",
        });
    }
    if m.resources_layout != storing.layout {
        return Err(NotCurrent::Settings {
            set,
            what: "resources.layout",
        });
    }
    if m.files.iter().any(|f| f.pages.is_some()) != storing.paged {
        return Err(NotCurrent::Settings {
            set,
            what: "snapshot_format",
        });
    }
    Ok(newest)
}

/// A destination's newest set, found current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentSet {
    /// The configured destination name.
    pub destination: String,
    /// `<cluster>/<node>/<ts>`.
    pub set: String,
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every destination's newest set holds etcd's current revision: skip.
    Unchanged {
        /// etcd's revision.
        revision: i64,
        /// Each destination's current set, in configuration order.
        sets: Vec<CurrentSet>,
    },
    /// A destination needs a new set: run.
    Changed {
        /// The first destination found needing one.
        destination: String,
        /// Why.
        why: NotCurrent,
    },
    /// etcd or a destination could not be asked: run (its failure, if it
    /// persists, is the run's, reported as usual).
    Unknown {
        /// What could not be done, and why.
        error: String,
    },
}

/// Asks the local etcd member for its revision, then each destination for
/// this node's newest set (see the module documentation). `caches` holds
/// one manifest cache per destination, in configuration order (missing ones
/// are added), so each check reads only the manifests of new sets.
pub async fn check(config: &Config, caches: &mut Vec<ManifestCache>) -> Verdict {
    let etcd = match EtcdMember::connect(&config.etcd).await {
        Ok(mut m) => match m.member_info().await {
            Ok(i) => EtcdNow {
                cluster_id: i.cluster_id,
                member_id: i.member_id,
                revision: i.revision,
            },
            Err(e) => {
                return Verdict::Unknown {
                    error: format!("cannot ask etcd for its revision: {e}"),
                }
            }
        },
        Err(e) => {
            return Verdict::Unknown {
                error: format!("cannot connect to etcd: {e}"),
            }
        }
    };
    let storing = Storing::of(config);
    let mut sets = Vec::with_capacity(config.destinations.len());
    caches.resize_with(config.destinations.len(), ManifestCache::default);
    for (d, cache) in config.destinations.iter().zip(caches.iter_mut()) {
        let scanned = match destination::open(&d.config).await {
            Ok(dest) => crate::store::catalog::scan_cached(
                dest.as_ref(),
                &config.cluster_name,
                Some(&config.node_name),
                cache,
            )
            .await
            .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let cat = match scanned {
            Ok(cat) => cat,
            Err(e) => {
                return Verdict::Unknown {
                    error: format!(
                        "cannot list this node's sets at destination {}: {e}",
                        d.name
                    ),
                }
            }
        };
        match current_set(&cat, &config.node_name, etcd, &storing) {
            Ok(s) => sets.push(CurrentSet {
                destination: d.name.clone(),
                set: s.id.dir(),
            }),
            Err(why) => {
                return Verdict::Changed {
                    destination: d.name.clone(),
                    why,
                }
            }
        }
    }
    Verdict::Unchanged {
        revision: etcd.revision,
        sets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::catalog::Leftover;
    use chrono::{DateTime, Utc};
    use etcd_backup_proto::{
        FileKind, Manifest, ManifestEncryption, ManifestEtcd, ManifestFile, SetId, SetTimestamp,
        SnapshotStatus,
    };

    const NODE: &str = "master-0";
    const CLUSTER_ID: u64 = 0x1c4e_8b0a_33d2_9f01;
    const MEMBER_ID: u64 = 0x8e9e_05c5_2164_694d;

    fn etcd(revision: i64) -> EtcdNow {
        EtcdNow {
            cluster_id: CLUSTER_ID,
            member_id: MEMBER_ID,
            revision,
        }
    }

    fn plain() -> Storing {
        Storing {
            recipients: None,
            compression: None,
            layout: "none".into(),
            paged: false,
        }
    }

    fn ts(s: &str) -> SetTimestamp {
        s.parse().unwrap()
    }

    /// A complete set at `stamp` whose status call said `header` and whose
    /// snapshot's newest key is at `snapshot`.
    fn set(stamp: &str, header: i64, snapshot: Option<i64>) -> CatalogSet {
        let t = ts(stamp);
        let at: DateTime<Utc> = t.as_datetime();
        CatalogSet {
            id: SetId {
                cluster: "c".into(),
                node: NODE.into(),
                timestamp: t,
            },
            manifest: Manifest {
                format_version: 1,
                cluster: "c".into(),
                node: NODE.into(),
                timestamp: t,
                started_at: at,
                finished_at: at,
                agent_version: "test".into(),
                etcd: ManifestEtcd {
                    endpoint: "https://127.0.0.1:2379".into(),
                    cluster_id: format!("{CLUSTER_ID:016x}"),
                    member_id: format!("{MEMBER_ID:016x}"),
                    version: "3.5.16".into(),
                    revision: header,
                    db_size: 20480,
                    live_keys: None,
                },
                resources_layout: "none".into(),
                files: vec![ManifestFile {
                    name: format!("snapshot_{stamp}.db"),
                    kind: FileKind::Snapshot,
                    size: 20512,
                    sha256: "0".repeat(64),
                    compression: None,
                    plaintext: None,
                    pages: None,
                }],
                snapshot_status: snapshot.map(|revision| SnapshotStatus {
                    hash: 1,
                    revision,
                    total_key: 10,
                    total_size: 20480,
                }),
                encryption: None,
                compression: None,
                durable: true,
                rollout_in_progress: Vec::new(),
                durability: None,
            },
        }
    }

    fn catalog(sets: Vec<CatalogSet>) -> Catalog {
        Catalog {
            sets,
            leftovers: Vec::new(),
            unreadable_manifests: Vec::new(),
        }
    }

    fn leftover(stamp: &str, kind: LeftoverKind) -> Leftover {
        Leftover {
            dir: format!("c/{NODE}/{stamp}"),
            node: NODE.into(),
            kind,
            timestamp: Some(ts(stamp)),
            files: vec!["manifest.json".into()],
            modified: None,
            why: "manifest.json is not valid".into(),
            finished_at: None,
        }
    }

    #[test]
    fn the_newest_set_at_etcds_revision_is_current() {
        let cat = catalog(vec![
            set("2026-12-07_100000", 40, Some(40)),
            set("2026-12-07_110000", 57, Some(57)),
        ]);
        let s = current_set(&cat, NODE, etcd(57), &plain()).unwrap();
        assert_eq!(s.id.dir(), "c/master-0/2026-12-07_110000");
    }

    #[test]
    fn a_write_since_the_newest_set_means_a_new_set() {
        let cat = catalog(vec![set("2026-12-07_110000", 57, Some(57))]);
        assert_eq!(
            current_set(&cat, NODE, etcd(58), &plain()).unwrap_err(),
            NotCurrent::Revision {
                set: "c/master-0/2026-12-07_110000".into(),
                set_revision: 57,
                etcd_revision: 58,
            }
        );
    }

    #[test]
    fn an_older_set_at_etcds_revision_does_not_count_when_a_newer_one_differs() {
        // Revisions never go back in one etcd, but a restored etcd can:
        // only the newest set is compared.
        let cat = catalog(vec![
            set("2026-12-07_100000", 57, Some(57)),
            set("2026-12-07_110000", 90, Some(90)),
        ]);
        assert!(matches!(
            current_set(&cat, NODE, etcd(57), &plain()),
            Err(NotCurrent::Revision { .. })
        ));
    }

    #[test]
    fn either_recorded_revision_equal_to_etcds_proves_nothing_was_written() {
        // A write between the status call and the snapshot: the snapshot
        // holds 58, the header said 57.
        let written_during = catalog(vec![set("2026-12-07_110000", 57, Some(58))]);
        assert!(current_set(&written_during, NODE, etcd(58), &plain()).is_ok());
        // The newest revision was a delete whose tombstone compaction
        // removed: the snapshot's newest key is older than the store.
        let compacted_delete = catalog(vec![set("2026-12-07_110000", 60, Some(55))]);
        assert!(current_set(&compacted_delete, NODE, etcd(60), &plain()).is_ok());
        // A manifest without a snapshot status (an older agent's).
        let no_status = catalog(vec![set("2026-12-07_110000", 60, None)]);
        assert!(current_set(&no_status, NODE, etcd(60), &plain()).is_ok());
        assert!(current_set(&no_status, NODE, etcd(61), &plain()).is_err());
    }

    #[test]
    fn no_set_of_this_node_means_a_new_set() {
        let mut other = set("2026-12-07_110000", 57, Some(57));
        other.id.node = "master-1".into();
        other.manifest.node = "master-1".into();
        assert_eq!(
            current_set(&catalog(vec![other]), NODE, etcd(57), &plain()).unwrap_err(),
            NotCurrent::NoSet
        );
        assert_eq!(
            current_set(&catalog(Vec::new()), NODE, etcd(57), &plain()).unwrap_err(),
            NotCurrent::NoSet
        );
    }

    #[test]
    fn a_damaged_or_newer_format_set_newer_than_the_newest_complete_one_never_causes_a_skip() {
        for kind in [LeftoverKind::Unrecognised, LeftoverKind::NewerFormat] {
            let mut cat = catalog(vec![set("2026-12-07_110000", 57, Some(57))]);
            cat.leftovers.push(leftover("2026-12-07_120000", kind));
            assert!(
                matches!(
                    current_set(&cat, NODE, etcd(57), &plain()),
                    Err(NotCurrent::NewerUnreadable { .. })
                ),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn older_damaged_sets_partials_and_foreign_files_in_the_set_do_not_matter() {
        let mut cat = catalog(vec![set("2026-12-07_110000", 57, Some(57))]);
        cat.leftovers
            .push(leftover("2026-12-07_100000", LeftoverKind::Unrecognised));
        // An interrupted run's partial files, newer than the set.
        cat.leftovers
            .push(leftover("2026-12-07_120000", LeftoverKind::OwnPartial));
        // The newest set itself also holds a file the agent did not write.
        cat.leftovers
            .push(leftover("2026-12-07_110000", LeftoverKind::Unrecognised));
        assert!(current_set(&cat, NODE, etcd(57), &plain()).is_ok());
    }

    #[test]
    fn a_set_of_another_member_or_cluster_is_not_current() {
        let mut cat = catalog(vec![set("2026-12-07_110000", 57, Some(57))]);
        cat.sets[0].manifest.etcd.member_id = "0000000000000001".into();
        assert!(matches!(
            current_set(&cat, NODE, etcd(57), &plain()),
            Err(NotCurrent::OtherMember { .. })
        ));
        let mut cat = catalog(vec![set("2026-12-07_110000", 57, Some(57))]);
        cat.sets[0].manifest.etcd.cluster_id = "0000000000000001".into();
        assert!(matches!(
            current_set(&cat, NODE, etcd(57), &plain()),
            Err(NotCurrent::OtherMember { .. })
        ));
    }

    #[test]
    fn a_set_not_durable_or_taken_mid_rollout_is_not_current() {
        let mut cat = catalog(vec![set("2026-12-07_110000", 57, Some(57))]);
        cat.sets[0].manifest.durable = false;
        assert!(matches!(
            current_set(&cat, NODE, etcd(57), &plain()),
            Err(NotCurrent::NotDurable { .. })
        ));
        let mut cat = catalog(vec![set("2026-12-07_110000", 57, Some(57))]);
        cat.sets[0].manifest.rollout_in_progress = vec!["kube-apiserver".into()];
        assert!(matches!(
            current_set(&cat, NODE, etcd(57), &plain()),
            Err(NotCurrent::Rollout { .. })
        ));
    }

    #[test]
    fn a_set_stored_another_way_than_configured_now_is_not_current() {
        let cat = catalog(vec![set("2026-12-07_110000", 57, Some(57))]);
        let encrypted = Storing {
            recipients: Some(BTreeSet::from(["age1xyz".to_string()])),
            ..plain()
        };
        assert_eq!(
            current_set(&cat, NODE, etcd(57), &encrypted).unwrap_err(),
            NotCurrent::Settings {
                set: "c/master-0/2026-12-07_110000".into(),
                what: "encryption"
            }
        );
        let compressed = Storing {
            compression: Some(Compression::Zstd),
            ..plain()
        };
        assert!(matches!(
            current_set(&cat, NODE, etcd(57), &compressed),
            Err(NotCurrent::Settings {
                what: "compression",
                ..
            })
        ));
        let kubeadm = Storing {
            layout: "kubeadm".into(),
            ..plain()
        };
        assert!(matches!(
            current_set(&cat, NODE, etcd(57), &kubeadm),
            Err(NotCurrent::Settings {
                what: "resources.layout",
                ..
            })
        ));
        // Same recipients in another order: current.
        let mut cat = catalog(vec![set("2026-12-07_110000", 57, Some(57))]);
        cat.sets[0].manifest.encryption = Some(ManifestEncryption {
            scheme: "age".into(),
            recipients: vec!["age1b".into(), "age1a".into()],
        });
        let paged = Storing {
            paged: true,
            ..plain()
        };
        let full = catalog(vec![set("2026-12-07_110000", 57, Some(57))]);
        assert!(matches!(
            current_set(&full, NODE, etcd(57), &paged),
            Err(NotCurrent::Settings {
                what: "snapshot_format",
                ..
            })
        ));
        let both = Storing {
            recipients: Some(BTreeSet::from(["age1a".to_string(), "age1b".to_string()])),
            ..plain()
        };
        assert!(current_set(&cat, NODE, etcd(57), &both).is_ok());
    }
}
