//! Backup-set naming.
//!
//! A set lives at `<cluster>/<node>/<ts>/` below a destination's base, and holds
//! `snapshot_<ts>.db`, `static_kuberesources_<ts>.tar.gz` and `manifest.json`.
//! `<ts>` is UTC `YYYY-MM-DD_HHMMSS`, the shape OpenShift's `cluster-backup.sh`
//! uses, so the directory of an `openshift`-layout set, in plain form (as
//! stored when not encrypted, else as `fetch --identity` writes it), can be
//! handed to `cluster-restore.sh` as it is; other sets cannot.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

/// The file whose presence makes a set complete. Written last, deleted first.
pub const MANIFEST_FILE_NAME: &str = "manifest.json";

/// Suffix of a file that is still being written. Such a file is never part of a
/// complete set; retention removes stale ones.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// Suffix of a data file encrypted with age.
pub const AGE_SUFFIX: &str = ".age";

/// Suffix of a snapshot compressed with zstd (`compression: zstd`), before
/// any [`AGE_SUFFIX`]: `snapshot_<ts>.db.zst`, `snapshot_<ts>.db.zst.age`.
/// The resources tarball is gzip already and never gets it.
pub const ZST_SUFFIX: &str = ".zst";

/// The directory, beside a node's set directories (`<cluster>/<node>/packs`),
/// that holds the pack files of its paged sets (`snapshot_format: paged`).
pub const PACKS_DIR: &str = "packs";

/// Suffix of a pack file: `<sha256 of the pack>.pack`.
pub const PACK_SUFFIX: &str = ".pack";

/// Whether `name` is a pack file's name as the agent gives it: 64 lower-case
/// hex digits (the SHA-256 of the pack's bytes) and [`PACK_SUFFIX`]. The one
/// check for pack names from a manifest or a listing: nothing else below
/// [`PACKS_DIR`] is ever read, or removed, as a pack.
pub fn is_pack_name(name: &str) -> bool {
    name.strip_suffix(PACK_SUFFIX).is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Whether `name` is a name a run gives a pack before it is named by its
/// checksum: `<set timestamp>_<n>.pack.partial` while it is written, and
/// `<set timestamp>_<n>.pack` on a destination that publishes an upload only
/// under the name it was started for (S3), between its two renames. Only
/// such files below [`PACKS_DIR`] may be removed as stale leftovers.
pub fn is_pack_partial_name(name: &str) -> bool {
    let stem = name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(name);
    let Some(stem) = stem.strip_suffix(PACK_SUFFIX) else {
        return false;
    };
    let Some((ts, n)) = stem.rsplit_once('_') else {
        return false;
    };
    ts.parse::<SetTimestamp>().is_ok()
        && !n.is_empty()
        && n.len() <= 9
        && n.bytes().all(|b| b.is_ascii_digit())
}

const TS_FORMAT: &str = "%Y-%m-%d_%H%M%S";

/// The UTC second a backup run started, which names its set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetTimestamp(DateTime<Utc>);

/// A string that is not a `YYYY-MM-DD_HHMMSS` set timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a backup-set timestamp of the form YYYY-MM-DD_HHMMSS (UTC)")]
pub struct InvalidTimestamp {
    /// The rejected text.
    pub value: String,
}

/// A file name, from a manifest or a server's listing, that is not one the
/// set naming scheme gives a file of that set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refusing file name {name:?} in backup set {set}: {problem}; a set holds only snapshot_{set}.db (optionally .zst) or pages_{set}.idx, static_kuberesources_{set}.tar.gz (each optionally .age) and manifest.json, so the manifest or the server's listing was altered; nothing was written or removed for it")]
pub struct InvalidFileName {
    /// The rejected name.
    pub name: String,
    /// The set it was found in.
    pub set: SetTimestamp,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl SetTimestamp {
    /// The timestamp of `at`, truncated to the second.
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(at.trunc_subsecs(0))
    }

    /// The instant as a chrono value.
    pub fn as_datetime(&self) -> DateTime<Utc> {
        self.0
    }

    /// `snapshot_<ts>.db`, the name `cluster-backup.sh` gives the snapshot.
    pub fn snapshot_file_name(&self) -> String {
        format!("snapshot_{self}.db")
    }

    /// `static_kuberesources_<ts>.tar.gz`, the name `cluster-backup.sh` gives the
    /// static-pod resources.
    pub fn resources_file_name(&self) -> String {
        format!("static_kuberesources_{self}.tar.gz")
    }

    /// `pages_<ts>.idx`: the page index of a paged set, which says where in
    /// the node's packs each page of the snapshot is.
    pub fn page_index_file_name(&self) -> String {
        format!("pages_{self}.idx")
    }

    /// The name of the `n`th pack a run writes, while it writes it (below
    /// [`PACKS_DIR`]; renamed to `<sha256>.pack` when done).
    pub fn pack_partial_name(&self, n: u32) -> String {
        format!("{self}_{n}{PACK_SUFFIX}{PARTIAL_SUFFIX}")
    }

    /// Every name the agent gives a data file of this set, as stored: the
    /// snapshot (plain or zstd-compressed), the page index of a paged set,
    /// and the resources tarball, each plain or encrypted.
    pub fn data_file_names(&self) -> [String; 7] {
        let (snapshot, resources) = (self.snapshot_file_name(), self.resources_file_name());
        [
            self.page_index_file_name(),
            format!("{snapshot}{ZST_SUFFIX}{AGE_SUFFIX}"),
            format!("{snapshot}{ZST_SUFFIX}"),
            format!("{snapshot}{AGE_SUFFIX}"),
            format!("{resources}{AGE_SUFFIX}"),
            snapshot,
            resources,
        ]
    }

    /// Checks a name from a manifest or a listing before any file operation
    /// on it: one path component (no `/`, no `..`, no NUL) and one of this
    /// set's [`data file names`](Self::data_file_names) or, with
    /// `manifest_too`, `manifest.json`. The one check for such names.
    ///
    /// # Errors
    /// [`InvalidFileName`] naming what is wrong.
    pub fn check_file_name(&self, name: &str, manifest_too: bool) -> Result<(), InvalidFileName> {
        let problem = if name.is_empty() {
            Some("it is empty")
        } else if name.contains('\0') {
            Some("it contains a NUL byte")
        } else if name.contains('/') || name.contains('\\') {
            Some("it contains a path separator")
        } else if name == "." || name == ".." || name.contains("..") {
            Some("it contains `..`")
        } else if !(self.data_file_names().iter().any(|n| n == name)
            || (manifest_too && name == MANIFEST_FILE_NAME))
        {
            Some("it is not a file name of this set")
        } else {
            None
        };
        match problem {
            None => Ok(()),
            Some(problem) => Err(InvalidFileName {
                name: name.to_string(),
                set: *self,
                problem,
            }),
        }
    }

    /// Whether `name` is one the agent writes while it builds this set and
    /// renames when done: a data file's name or `manifest.json`, with
    /// [`PARTIAL_SUFFIX`]. Only such files may be removed as leftovers.
    pub fn is_own_partial(&self, name: &str) -> bool {
        name.strip_suffix(PARTIAL_SUFFIX).is_some_and(|stem| {
            stem == MANIFEST_FILE_NAME || self.data_file_names().iter().any(|n| n == stem)
        })
    }
}

impl fmt::Display for SetTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format(TS_FORMAT))
    }
}

impl FromStr for SetTimestamp {
    type Err = InvalidTimestamp;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidTimestamp {
            value: s.to_string(),
        };
        // chrono accepts some variations (missing zero padding); the set name
        // must round-trip exactly, so compare the re-rendered text too.
        let naive = NaiveDateTime::parse_from_str(s, TS_FORMAT).map_err(|_| invalid())?;
        let ts = Self(naive.and_utc());
        if ts.to_string() != s {
            return Err(invalid());
        }
        Ok(ts)
    }
}

impl Serialize for SetTimestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SetTimestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether `s` can be used as one path component of a set's location
/// (a cluster or node name): non-empty, at most 253 bytes, no `/`, no NUL,
/// not `.` or `..`, and no leading `.` so it cannot hide or look like a partial.
pub fn is_valid_name_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && !s.starts_with('.')
        && !s.contains(['/', '\0', '\\'])
        && !s.chars().any(char::is_control)
}

/// Where one backup set lives, relative to a destination's base directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SetId {
    /// The cluster's name, from the agent's config.
    pub cluster: String,
    /// The node that took the backup.
    pub node: String,
    /// When the run started.
    pub timestamp: SetTimestamp,
}

impl SetId {
    /// The set's directory: `<cluster>/<node>/<ts>`.
    pub fn dir(&self) -> String {
        format!("{}/{}/{}", self.cluster, self.node, self.timestamp)
    }

    /// A file inside the set's directory.
    pub fn file(&self, name: &str) -> String {
        format!("{}/{}", self.dir(), name)
    }
}

impl fmt::Display for SetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dir())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamp_renders_like_cluster_backup_sh() {
        let at = Utc.with_ymd_and_hms(2026, 3, 7, 4, 5, 6).unwrap();
        let ts = SetTimestamp::new(at + chrono::Duration::milliseconds(999));
        assert_eq!(ts.to_string(), "2026-03-07_040506");
        assert_eq!(ts.snapshot_file_name(), "snapshot_2026-03-07_040506.db");
        assert_eq!(
            ts.resources_file_name(),
            "static_kuberesources_2026-03-07_040506.tar.gz"
        );
    }

    #[test]
    fn timestamp_parses_only_its_own_shape() {
        let ts: SetTimestamp = "2026-11-24_235959".parse().unwrap();
        assert_eq!(ts.to_string(), "2026-11-24_235959");
        for bad in [
            "",
            "2026-11-24",
            "2026-11-24_23595",
            "2026-11-24 235959",
            "2026-1-24_235959",
            "2026-13-24_235959",
            "2026-11-24_235959x",
            "latest",
        ] {
            assert!(bad.parse::<SetTimestamp>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn own_partials_are_exactly_the_names_the_agent_writes_for_that_set() {
        let ts: SetTimestamp = "2026-11-24_120000".parse().unwrap();
        for ok in [
            "snapshot_2026-11-24_120000.db.partial",
            "snapshot_2026-11-24_120000.db.age.partial",
            "snapshot_2026-11-24_120000.db.zst.partial",
            "snapshot_2026-11-24_120000.db.zst.age.partial",
            "static_kuberesources_2026-11-24_120000.tar.gz.partial",
            "static_kuberesources_2026-11-24_120000.tar.gz.age.partial",
            "manifest.json.partial",
        ] {
            assert!(ts.is_own_partial(ok), "{ok:?}");
        }
        for bad in [
            "snapshot_2026-11-24_120000.db",
            "manifest.json",
            "snapshot_2026-11-24_120001.db.partial",
            "notes.txt.partial",
            ".partial",
            "snapshot_2026-11-24_120000.db.partial.partial",
            "x/snapshot_2026-11-24_120000.db.partial",
        ] {
            assert!(!ts.is_own_partial(bad), "{bad:?}");
        }
    }

    #[test]
    fn file_names_must_be_the_sets_own() {
        let ts: SetTimestamp = "2026-11-24_120000".parse().unwrap();
        for ok in [
            "snapshot_2026-11-24_120000.db",
            "snapshot_2026-11-24_120000.db.age",
            "snapshot_2026-11-24_120000.db.zst",
            "snapshot_2026-11-24_120000.db.zst.age",
            "static_kuberesources_2026-11-24_120000.tar.gz",
            "static_kuberesources_2026-11-24_120000.tar.gz.age",
        ] {
            assert_eq!(ts.check_file_name(ok, false), Ok(()), "{ok:?}");
        }
        assert!(ts.check_file_name("manifest.json", false).is_err());
        assert_eq!(ts.check_file_name("manifest.json", true), Ok(()));
        for (bad, problem) in [
            ("", "empty"),
            ("../snapshot_2026-11-24_120000.db", "separator"),
            ("/etc/passwd", "separator"),
            ("a\\b", "separator"),
            ("..", "`..`"),
            ("snapshot_2026-11-24_120000..db", "`..`"),
            ("snapshot_2026-11-24_120000.db\0", "NUL"),
            (
                "snapshot_2026-11-24_120001.db",
                "not a file name of this set",
            ),
            ("notes.txt", "not a file name of this set"),
            (
                "static_kuberesources_2026-11-24_120000.tar.gz.zst",
                "not a file name of this set",
            ),
            (
                "snapshot_2026-11-24_120000.db.age.zst",
                "not a file name of this set",
            ),
            (
                "snapshot_2026-11-24_120000.db.partial",
                "not a file name of this set",
            ),
        ] {
            let e = ts.check_file_name(bad, true).unwrap_err();
            assert!(e.problem.contains(problem), "{bad:?}: {e}");
            assert!(e.to_string().contains("was altered"), "{e}");
        }
    }

    #[test]
    fn timestamps_order_by_time() {
        let a: SetTimestamp = "2026-01-01_000000".parse().unwrap();
        let b: SetTimestamp = "2026-01-01_000001".parse().unwrap();
        assert!(a < b);
    }

    #[test]
    fn name_components_reject_path_tricks() {
        for ok in ["master-0", "prod", "ip-10-0-1-2.ec2.internal", "a"] {
            assert!(is_valid_name_component(ok), "{ok:?}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "a\0b", "a\nb"] {
            assert!(!is_valid_name_component(bad), "{bad:?}");
        }
    }

    #[test]
    fn set_id_paths() {
        let id = SetId {
            cluster: "prod".into(),
            node: "master-0".into(),
            timestamp: "2026-11-24_120000".parse().unwrap(),
        };
        assert_eq!(id.dir(), "prod/master-0/2026-11-24_120000");
        assert_eq!(
            id.file(MANIFEST_FILE_NAME),
            "prod/master-0/2026-11-24_120000/manifest.json"
        );
    }
}
