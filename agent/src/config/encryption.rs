//! `encryption:` validated: recipients (parsed by [`crate::encryption`]) and the identity file.

use super::*;

impl Validator {
    /// `encryption:` given (possibly empty): at least one recipient, each valid.
    pub(super) fn encryption(
        &mut self,
        raw: Option<RawEncryption>,
    ) -> Option<crate::encryption::EncryptionConfig> {
        use crate::encryption::{parse_recipient, parse_recipients_file};
        let raw = raw.unwrap_or_default();
        let mut recipients: Vec<crate::encryption::Recipient> = Vec::new();
        let mut ok = true;
        for (i, text) in raw.recipients.unwrap_or_default().iter().enumerate() {
            match parse_recipient(text) {
                Ok(r) => recipients.push(r),
                Err(e) => {
                    self.error(format!("encryption.recipients[{i}]"), e);
                    ok = false;
                }
            }
        }
        if let Some(path) = &raw.recipients_file {
            match std::fs::read_to_string(path) {
                Ok(text) => match parse_recipients_file(&text) {
                    Ok(list) if list.is_empty() => {
                        self.error(
                            "encryption.recipients_file",
                            format!(
                                "{} lists no recipient (only blank lines and # comments)",
                                path.display()
                            ),
                        );
                        ok = false;
                    }
                    Ok(list) => recipients.extend(list),
                    Err(e) => {
                        self.error(
                            "encryption.recipients_file",
                            format!("{}: {e}", path.display()),
                        );
                        ok = false;
                    }
                },
                Err(e) => {
                    self.error(
                        "encryption.recipients_file",
                        format!("cannot read {}: {e}", path.display()),
                    );
                    ok = false;
                }
            }
        }
        if let Some(path) = &raw.identity_file {
            self.readable_file("encryption.identity_file", path);
        }
        let page_id_key =
            raw.page_id_key_file.as_ref().and_then(
                |path| match crate::encryption::PageIdKey::read(path) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        self.error("encryption.page_id_key_file", e);
                        ok = false;
                        None
                    }
                },
            );
        if !ok {
            return None;
        }
        if recipients.is_empty() {
            self.error(
                "encryption",
                "names no recipient: list public keys under encryption.recipients or give encryption.recipients_file (remove the encryption section to store sets unencrypted)",
            );
            return None;
        }
        let mut unique: Vec<crate::encryption::Recipient> = Vec::new();
        for r in recipients {
            if !unique.contains(&r) {
                unique.push(r);
            }
        }
        Some(crate::encryption::EncryptionConfig {
            recipients: unique,
            identity_file: raw.identity_file,
            page_id_key,
        })
    }

    /// `snapshot_format` (`full` when absent). Paged sets with encryption
    /// need `encryption.page_id_key_file`: page ids are then keyed.
    pub(super) fn snapshot_format(
        &mut self,
        raw: Option<String>,
        encryption: Option<&crate::encryption::EncryptionConfig>,
    ) -> SnapshotFormat {
        let format = match raw.as_deref().map(str::trim) {
            None | Some("full") => SnapshotFormat::Full,
            Some("paged") => SnapshotFormat::Paged,
            Some(other) => {
                self.error(
                    "snapshot_format",
                    format!("{other:?} is not a snapshot format this agent knows; use `full` (the default: one snapshot file per set) or `paged` (pages stored once in the node's packs, each set adding only the pages that changed)"),
                );
                return SnapshotFormat::Full;
            }
        };
        if format == SnapshotFormat::Paged {
            if let Some(enc) = encryption {
                if enc.page_id_key.is_none() {
                    self.error(
                        "encryption.page_id_key_file",
                        "is required with snapshot_format: paged and encryption: page ids are then keyed with it, so the store cannot confirm a guessed page. Make one with `head -c 32 /dev/urandom | base64 > page-id.key`, keep it in a Secret, and name the file here (restores do not need it; a new key only means the next set shares no pages with older ones)",
                    );
                }
            }
        }
        format
    }
}
