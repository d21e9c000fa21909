//! `manifest.json`: what a backup set holds, and the checksums to prove it.
//!
//! The manifest is written last; its presence is what makes a set complete.
//! It holds no secrets (sizes, hashes, IDs, times), so it is never encrypted.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::naming::SetTimestamp;

/// The newest `format_version` this crate reads and writes. Readers refuse
/// newer versions.
///
/// - 1: plaintext sets.
/// - 2: adds client-side encryption ([`Manifest::encryption`],
///   [`ManifestFile::plaintext`]). Only encrypted sets are written as 2, so
///   agents that know only version 1 still read plaintext sets, and refuse
///   encrypted ones instead of misreading them.
/// - 3: adds compression of the snapshot ([`Manifest::compression`],
///   [`ManifestFile::compression`]; the stored file is `.db.zst`, its
///   [`ManifestFile::plaintext`] the `.db` it decompresses to). Only
///   compressed sets (encrypted or not) are written as 3, so agents that know
///   only versions 1 and 2 refuse them (keeping them, as a newer format)
///   instead of handing a compressed file to etcd.
/// - 4: adds paged snapshots (`snapshot_format: paged`,
///   [`ManifestFile::pages`]): the snapshot is not a file of the set but
///   pages in the node's packs, which the set's page index locates. Only
///   paged sets are written as 4, so older agents refuse them (keeping them,
///   as a newer format) instead of looking for a snapshot file.
///
/// Optional fields that an older reader may ignore without misreading the
/// set ([`Manifest::durable`], [`Manifest::durability`],
/// [`Manifest::snapshot_status`]) do not change
/// the version: readers ignore fields they do not know.
pub const MANIFEST_FORMAT_VERSION: u32 = 4;

/// The `format_version` of a set written without encryption or compression.
pub const MANIFEST_FORMAT_PLAIN: u32 = 1;

/// The `format_version` of an encrypted set without compression.
pub const MANIFEST_FORMAT_ENCRYPTED: u32 = 2;

/// The `format_version` of a set with a compressed snapshot (encrypted or not).
pub const MANIFEST_FORMAT_COMPRESSED: u32 = 3;

/// The `format_version` of a paged set (compressed, encrypted or neither).
pub const MANIFEST_FORMAT_PAGED: u32 = 4;

/// The content of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Bumped on any change a reader of an older version would misread.
    pub format_version: u32,
    /// `cluster_name` of the agent that took the backup.
    pub cluster: String,
    /// `node_name` of the agent that took the backup.
    pub node: String,
    /// The set's timestamp, also its directory name.
    pub timestamp: SetTimestamp,
    /// When the run started (before connecting to etcd).
    pub started_at: DateTime<Utc>,
    /// When the last data file was stored, just before the manifest was written.
    pub finished_at: DateTime<Utc>,
    /// Version of the agent that wrote the set.
    pub agent_version: String,
    /// What etcd said about itself when the snapshot started.
    pub etcd: ManifestEtcd,
    /// Which static-pod resources layout was bundled (`openshift`, `kubeadm`, `none`).
    pub resources_layout: String,
    /// Every data file of the set, the snapshot first.
    pub files: Vec<ManifestFile>,
    /// What `etcdctl snapshot status` reports for the snapshot, computed by
    /// the agent from the bbolt file as it was stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_status: Option<SnapshotStatus>,
    /// How the data files are encrypted; absent when they are stored as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<ManifestEncryption>,
    /// How the snapshot was compressed; absent when it is stored uncompressed.
    /// Which files are compressed is each file's
    /// [`compression`](ManifestFile::compression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<ManifestCompression>,
    /// Whether every file, and the renames that published them, was synced
    /// to stable storage on the destination before the run reported
    /// success. `false` for an SFTP server without `fsync@openssh.com`,
    /// accepted with `destination.sftp.require_fsync: false` (a crash of
    /// that server may have lost or truncated the files), and for one that
    /// syncs files but not their directory ([`Manifest::durability`] says
    /// which). Written only when false; a manifest without it (every older
    /// one) reads as true.
    #[serde(default = "durable_default", skip_serializing_if = "is_true")]
    pub durable: bool,
    /// The static pods (`kube-apiserver`, `etcd`, …) that were mid-rollout on
    /// the node when the set was taken: a revision directory newer than the
    /// one the live manifest names. The bundled resources may then not match
    /// etcd (what `cluster-backup.sh --force` calls `__POSSIBLY_DIRTY__`).
    /// Written only when not empty; older agents ignore it, and a manifest
    /// without it reads as a clean set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollout_in_progress: Vec<String>,
    /// How far the set is durable when not entirely ([`Manifest::durable`]
    /// false): written only then, so a manifest without it is fully synced
    /// (or was written before agents synced set directories on SFTP, which
    /// `agent_version` tells). Older agents ignore it and read `durable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<DurabilityLevel>,
}

/// What a destination synced of a set that is not entirely durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurabilityLevel {
    /// Every file was synced before its rename, but the directory holding
    /// them could not be synced (the server refused to open or sync it):
    /// after a crash of the server the renames may be undone, the files back
    /// under their `.partial` names or the manifest gone.
    FilesSynced,
    /// Nothing was synced (no `fsync@openssh.com`): a crash of the server
    /// may lose or truncate the files themselves.
    NotSynced,
}

pub(crate) fn durable_default() -> bool {
    true
}

// serde's skip_serializing_if passes a reference.
fn is_true(b: &bool) -> bool {
    *b
}

/// How a set's data files are encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEncryption {
    /// `age`: each data file is a binary age v1 file.
    pub scheme: String,
    /// The public keys each file is encrypted to (age `age1…`, `ssh-ed25519 …`,
    /// `ssh-rsa …`); the private key of any one of them decrypts the set.
    pub recipients: Vec<String>,
}

/// A compression algorithm a data file may be stored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Zstandard, one standard zstd frame (`zstd -d` reads it); the stored
    /// name ends in `.zst` (before any `.age`).
    Zstd,
}

impl Compression {
    /// The name used in the config, the manifest and listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
        }
    }
}

/// How a set's snapshot was compressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestCompression {
    /// The algorithm.
    pub algorithm: Compression,
    /// The level it was compressed at (`compression_level`); for information
    /// only, decompressing does not need it.
    pub level: i32,
}

/// `etcdctl snapshot status -w json` of a snapshot, with its field names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// CRC-32C over every top-level bucket name and the keys and values in it.
    pub hash: u32,
    /// Main revision of the last key in the `key` bucket; 0 when that bucket is empty.
    pub revision: i64,
    /// Key/value pairs (and nested bucket entries) in all top-level buckets.
    pub total_key: u64,
    /// The database size bbolt reports: high water mark × page size (the
    /// digest trailer excluded).
    pub total_size: u64,
}

/// The etcd member a snapshot was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEtcd {
    /// The endpoint the snapshot was streamed from.
    pub endpoint: String,
    /// etcd cluster ID, 16 lower-case hex digits as `etcdctl -w table` shows it.
    pub cluster_id: String,
    /// etcd member ID, 16 lower-case hex digits.
    pub member_id: String,
    /// etcd server version, e.g. `3.5.16`.
    pub version: String,
    /// The store revision in the response header of the status call made just
    /// before the snapshot started. The snapshot holds at least this revision.
    pub revision: i64,
    /// The member's database size in bytes as reported by the same call.
    pub db_size: i64,
    /// Keys in the keyspace at the snapshot's revision, counted on the member
    /// right after the snapshot; what a restored member must serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_keys: Option<u64>,
}

/// What a data file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// The etcd snapshot, including etcd's 32-byte SHA-256 trailer, exactly as
    /// `etcdctl snapshot save` writes it.
    Snapshot,
    /// The static-pod resources tarball.
    Resources,
}

/// One data file of a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// File name inside the set directory.
    pub name: String,
    /// What the file is.
    pub kind: FileKind,
    /// Size in bytes as stored.
    pub size: u64,
    /// SHA-256 of the whole file as stored (the ciphertext, when encrypted;
    /// the compressed bytes, when compressed), lower-case hex: checkable
    /// without any key.
    pub sha256: String,
    /// How the content was compressed before it was stored (and before it
    /// was encrypted, when both); absent for a file stored uncompressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// For an encrypted or compressed file, what decrypting and
    /// decompressing it must give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<PlaintextFile>,
    /// For the snapshot of a paged set: where its pages are. The entry's
    /// `name`, `size` and `sha256` are then the plain snapshot's
    /// (`snapshot_<ts>.db`, exactly as `etcdctl snapshot save` writes it),
    /// which is not stored as a file but rebuilt from the packs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<Box<ManifestPages>>,
}

/// How the snapshot of a paged set is stored: cut at bbolt's page
/// boundaries, each page kept once in the node's packs
/// (`<cluster>/<node>/packs/<sha256>.pack`) and located by the set's page
/// index. docs/backup-set-format.md specifies the index and the packs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPages {
    /// The page index, a file of the set (`pages_<ts>.idx`): a zstd stream
    /// with one record per page (its id and which pack range holds it).
    pub index: StoredFile,
    /// bbolt's page size, read from the snapshot's first meta page.
    pub page_size: u32,
    /// Whole pages in the snapshot: the snapshot is `pages * page_size`
    /// bytes of pages, then [`tail`](Self::tail).
    pub pages: u64,
    /// The bytes after the last whole page (etcd's 32-byte SHA-256 trailer),
    /// lower-case hex.
    pub tail: String,
    /// How page ids are computed.
    pub page_ids: PageIds,
    /// For keyed page ids, a fingerprint of the key (an HMAC of a fixed
    /// text with it, 16 bytes in hex): which sets' ids are comparable,
    /// without revealing the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_id_key: Option<String>,
    /// Pages this set added to the packs: those the destination did not
    /// already hold where the previous set had them.
    pub new_pages: u64,
    /// Bytes this set added at its destination: its new packs and its page
    /// index (the resources tarball and the manifest not counted).
    pub added_bytes: u64,
    /// The set whose pages were compared against (its timestamp), if any:
    /// for information only; the set does not depend on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compared_with: Option<SetTimestamp>,
    /// Every pack the index refers to, by its position in this list.
    pub packs: Vec<PackRef>,
}

/// A file the manifest checksums that is not a data file of its own entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// File name inside the set directory.
    pub name: String,
    /// Size in bytes as stored.
    pub size: u64,
    /// SHA-256 of the file as stored, lower-case hex.
    pub sha256: String,
}

/// A pack a paged set needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRef {
    /// `<sha256>.pack`: its name is its checksum.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// How the id of a page is computed from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageIds {
    /// The first 16 bytes of the page's SHA-256 (sets stored unencrypted).
    Sha256,
    /// The first 16 bytes of HMAC-SHA256 of the page with the node's page
    /// id key (encrypted sets): the store cannot confirm a guessed page.
    HmacSha256,
}

/// The plain form of an encrypted or compressed data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaintextFile {
    /// The name to give the plain file (the stored name without `.age` and
    /// `.zst`): `snapshot_<ts>.db`, `static_kuberesources_<ts>.tar.gz`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the plaintext, lower-case hex.
    pub sha256: String,
}

impl ManifestFile {
    /// The name of the file this entry stores in the set directory: its
    /// own, or a paged snapshot's page index.
    pub fn stored_name(&self) -> &str {
        self.pages.as_ref().map_or(&self.name, |p| &p.index.name)
    }

    /// The name the file has once decrypted and decompressed (its stored
    /// name when it is neither).
    pub fn plaintext_name(&self) -> &str {
        self.plaintext.as_ref().map_or(&self.name, |p| &p.name)
    }

    /// Whether the file is stored age-encrypted (its name ends in `.age`).
    pub fn is_encrypted(&self) -> bool {
        self.name.ends_with(crate::naming::AGE_SUFFIX)
    }

    /// The plain name that the stored name and the file's compression imply:
    /// the stored name without `.age`, then without `.zst` when compressed.
    /// `None` when the name lacks a suffix its compression needs.
    pub fn expected_plaintext_name(&self) -> Option<&str> {
        let name = self
            .name
            .strip_suffix(crate::naming::AGE_SUFFIX)
            .unwrap_or(&self.name);
        match self.compression {
            None => Some(name),
            Some(Compression::Zstd) => name.strip_suffix(crate::naming::ZST_SUFFIX),
        }
    }
}

impl Manifest {
    /// The set's etcd revision: the snapshot's own (from its status) when
    /// recorded, else the one etcd reported just before the snapshot.
    pub fn revision(&self) -> i64 {
        self.snapshot_status
            .map_or(self.etcd.revision, |s| s.revision)
    }

    /// The entry of the given kind, if the set has one.
    pub fn file(&self, kind: FileKind) -> Option<&ManifestFile> {
        self.files.iter().find(|f| f.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let ts: SetTimestamp = "2026-11-24_120000".parse().unwrap();
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            cluster: "prod".into(),
            node: "master-0".into(),
            timestamp: ts,
            started_at: ts.as_datetime(),
            finished_at: ts.as_datetime() + chrono::Duration::seconds(3),
            agent_version: "0.1.0".into(),
            etcd: ManifestEtcd {
                endpoint: "https://10.0.0.5:2379".into(),
                cluster_id: "cdf818194e3a8c32".into(),
                member_id: "8e9e05c52164694d".into(),
                version: "3.5.16".into(),
                revision: 42,
                db_size: 20480,
                live_keys: Some(3),
            },
            resources_layout: "openshift".into(),
            files: vec![
                ManifestFile {
                    name: ts.snapshot_file_name(),
                    kind: FileKind::Snapshot,
                    size: 20512,
                    sha256: "00".repeat(32),
                    compression: None,
                    plaintext: None,
                    pages: None,
                },
                ManifestFile {
                    name: ts.resources_file_name(),
                    kind: FileKind::Resources,
                    size: 1000,
                    sha256: "11".repeat(32),
                    compression: None,
                    plaintext: None,
                    pages: None,
                },
            ],
            snapshot_status: Some(SnapshotStatus {
                hash: 1_251_439_961,
                revision: 51,
                total_key: 54,
                total_size: 24576,
            }),
            encryption: None,
            compression: None,
            durable: true,
            rollout_in_progress: Vec::new(),
            durability: None,
        }
    }

    #[test]
    fn rollout_in_progress_is_written_only_when_some_pod_was_mid_rollout() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(!json.contains("rollout_in_progress"), "{json}");
        let mut m = sample();
        m.rollout_in_progress = vec!["kube-apiserver".into(), "etcd".into()];
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            json.contains(r#""rollout_in_progress":["kube-apiserver","etcd"]"#),
            "{json}"
        );
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn durable_is_written_only_when_false_and_reads_as_true_when_absent() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(!json.contains("durable"), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert!(back.durable);

        let mut m = sample();
        m.durable = false;
        let json = serde_json::to_string_pretty(&m).unwrap();
        assert!(json.contains("\"durable\": false"), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn a_set_whose_directory_was_not_synced_says_so_and_old_readers_see_not_durable() {
        let mut m = sample();
        m.durable = false;
        m.durability = Some(DurabilityLevel::FilesSynced);
        let json = serde_json::to_string_pretty(&m).unwrap();
        assert!(json.contains("\"durable\": false"), "{json}");
        assert!(json.contains("\"durability\": \"files_synced\""), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        // An older reader (no `durability` field) still reads the set, as
        // not durable.
        let old: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(old["durable"], serde_json::Value::Bool(false));
    }

    #[test]
    fn plaintext_manifest_has_no_encryption_fields() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(!json.contains("encryption"), "{json}");
        assert!(!json.contains("plaintext"), "{json}");
        assert!(!json.contains("compression"), "{json}");
    }

    #[test]
    fn compressed_manifest_records_algorithm_and_names_the_plain_snapshot() {
        let mut m = sample();
        m.format_version = MANIFEST_FORMAT_COMPRESSED;
        m.compression = Some(ManifestCompression {
            algorithm: Compression::Zstd,
            level: 3,
        });
        let f = &mut m.files[0];
        f.compression = Some(Compression::Zstd);
        f.plaintext = Some(PlaintextFile {
            name: f.name.clone(),
            size: 20512,
            sha256: "22".repeat(32),
        });
        f.name.push_str(".zst");
        let json = serde_json::to_string_pretty(&m).unwrap();
        assert!(json.contains("\"compression\": \"zstd\""), "{json}");
        assert!(json.contains("\"algorithm\": \"zstd\""), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert!(!back.files[0].is_encrypted());
        assert_eq!(
            back.files[0].expected_plaintext_name(),
            Some("snapshot_2026-11-24_120000.db")
        );
        let mut both = back.files[0].clone();
        both.name.push_str(".age");
        assert!(both.is_encrypted());
        assert_eq!(
            both.expected_plaintext_name(),
            Some("snapshot_2026-11-24_120000.db")
        );
        // A compressed entry whose name lacks `.zst` implies no plain name.
        both.name = "snapshot_2026-11-24_120000.db.age".into();
        assert_eq!(both.expected_plaintext_name(), None);
    }

    #[test]
    fn encrypted_manifest_round_trips_and_names_plaintext() {
        let mut m = sample();
        m.encryption = Some(ManifestEncryption {
            scheme: "age".into(),
            recipients: vec!["age1abc".into()],
        });
        let f = &mut m.files[0];
        f.plaintext = Some(PlaintextFile {
            name: f.name.clone(),
            size: 20512,
            sha256: "22".repeat(32),
        });
        f.name.push_str(".age");
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            back.files[0].plaintext_name(),
            "snapshot_2026-11-24_120000.db"
        );
        assert_eq!(back.files[1].plaintext_name(), back.files[1].name);
    }

    #[test]
    fn manifest_round_trips_through_json() {
        let m = sample();
        let json = serde_json::to_string_pretty(&m).unwrap();
        assert!(
            json.contains("\"timestamp\": \"2026-11-24_120000\""),
            "{json}"
        );
        assert!(json.contains("\"kind\": \"snapshot\""), "{json}");
        assert!(json.contains("\"totalKey\": 54"), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.file(FileKind::Resources).unwrap().size, 1000);
    }

    #[test]
    fn manifest_with_bad_timestamp_is_rejected() {
        let json = serde_json::to_string(&sample())
            .unwrap()
            .replace("2026-11-24_120000", "yesterday");
        assert!(serde_json::from_str::<Manifest>(&json).is_err());
    }
}
