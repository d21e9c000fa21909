//! `compression` and `compression_level` validated: the algorithm applied to
//! the snapshot before any encryption, and its level.

use super::*;

/// The snapshot's compression, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressionConfig {
    /// The algorithm (`compression: zstd`).
    pub algorithm: etcd_backup_proto::Compression,
    /// `compression_level`, within [`LEVELS`].
    pub level: i32,
}

/// The `compression_level`s accepted. Level 1 is zstd's fastest standard
/// level; above 7 the window (4 MiB and more, needed again to decompress)
/// and match tables grow past what the agent's memory budget (peak RSS 32
/// MiB) leaves, and the speed falls far below etcd's snapshot stream.
pub const LEVELS: std::ops::RangeInclusive<i32> = 1..=7;

impl Validator {
    /// `compression` (`none` when absent) and `compression_level`.
    pub(super) fn compression(
        &mut self,
        algorithm: Option<String>,
        level: Option<i64>,
    ) -> Option<CompressionConfig> {
        let algorithm = match algorithm.as_deref().map(str::trim) {
            None | Some("none") => None,
            Some("zstd") => Some(etcd_backup_proto::Compression::Zstd),
            Some(other) => {
                self.error(
                    "compression",
                    format!(
                        "{other:?} is not a compression this agent knows; use `zstd` (the snapshot is stored as snapshot_<ts>.db.zst) or `none` (the default; the resources tarball is gzip already)"
                    ),
                );
                return None;
            }
        };
        let Some(algorithm) = algorithm else {
            if level.is_some() {
                self.error(
                    "compression_level",
                    "is set, but compression is none; set `compression: zstd`, or remove compression_level",
                );
            }
            return None;
        };
        let level = match level {
            None => defaults::COMPRESSION_LEVEL,
            Some(l) => match i32::try_from(l).ok().filter(|l| LEVELS.contains(l)) {
                Some(l) => l,
                None => {
                    self.error(
                        "compression_level",
                        format!(
                            "{l} is outside {}..={}; use a zstd level in that range (the default, {}, keeps zstd faster than etcd's snapshot stream)",
                            LEVELS.start(),
                            LEVELS.end(),
                            defaults::COMPRESSION_LEVEL
                        ),
                    );
                    return None;
                }
            },
        };
        Some(CompressionConfig { algorithm, level })
    }
}
