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
        })
    }
}
