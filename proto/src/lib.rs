//! The contract of etcd-backup-agent: pure data, serde, no I/O.
//!
//! Anything that is written to a destination or sent over the wire is described
//! here, so that the agent, its tests and any other reader agree on one shape.
//!
//! # Layout
//! - [`naming`]: backup-set timestamps, file names and the set's path.
//! - [`manifest`]: `manifest.json`, the file whose presence makes a set complete.
//! - [`api`]: the daemon's HTTP API bodies.

pub mod api;
pub mod manifest;
pub mod naming;

pub use manifest::{
    Compression, DurabilityLevel, FileKind, Manifest, ManifestCompression, ManifestEncryption,
    ManifestEtcd, ManifestFile, ManifestPages, PackRef, PageIds, PlaintextFile, SnapshotStatus,
    StoredFile, MANIFEST_FORMAT_COMPRESSED, MANIFEST_FORMAT_ENCRYPTED, MANIFEST_FORMAT_PAGED,
    MANIFEST_FORMAT_PLAIN, MANIFEST_FORMAT_VERSION,
};
pub use naming::{
    is_pack_name, is_pack_partial_name, is_valid_name_component, InvalidFileName, InvalidTimestamp,
    SetId, SetTimestamp, AGE_SUFFIX, MANIFEST_FILE_NAME, PACKS_DIR, PACK_SUFFIX, PARTIAL_SUFFIX,
    ZST_SUFFIX,
};
