//! `destination:` validated: a local directory or an SFTP server (host, auth, host-key check).

use super::*;

impl Validator {
    /// `destination:` (one, named `default`) or `destinations:` (a list of
    /// named ones), never both.
    pub(super) fn destinations(
        &mut self,
        single: Option<RawDestination>,
        list: Option<Vec<RawNamedDestination>>,
    ) -> Option<Vec<NamedDestination>> {
        let list = match (single, list) {
            (Some(_), Some(_)) => {
                self.error(
                    "destinations",
                    "both destination and destinations are set: use one; move the single destination into the list as an entry with a name",
                );
                return None;
            }
            (single, None) => {
                return self.destination(single).map(|config| {
                    vec![NamedDestination {
                        name: DEFAULT_DESTINATION_NAME.to_string(),
                        config,
                    }]
                })
            }
            (None, Some(list)) => list,
        };
        if list.is_empty() {
            self.error(
                "destinations",
                "empty: configure at least one destination, e.g. [{name: local, local: {path: /backups}}]",
            );
            return None;
        }
        let mut out = Vec::with_capacity(list.len());
        let mut complete = true;
        for (i, entry) in list.into_iter().enumerate() {
            let at = format!("destinations[{i}]");
            let (name, raw) = entry.split();
            let name = match name {
                None => {
                    self.error(
                        format!("{at}.name"),
                        "required: a short name for this destination (lower-case letters, digits and '-'), used in results, metric labels and --destination",
                    );
                    None
                }
                Some(n) if !is_valid_destination_name(&n) => {
                    self.error(
                        format!("{at}.name"),
                        format!(
                            "{n:?} is not a destination name: use 1 to {DESTINATION_NAME_MAX} lower-case letters, digits and '-', starting and ending with a letter or digit"
                        ),
                    );
                    None
                }
                Some(n) => match out.iter().position(|d: &NamedDestination| d.name == n) {
                    Some(j) => {
                        self.error(
                            format!("{at}.name"),
                            format!("{n:?} is already the name of destinations[{j}]; names must be unique"),
                        );
                        None
                    }
                    None => Some(n),
                },
            };
            let config = self.destination_kind(&at, raw);
            match (name, config) {
                (Some(name), Some(config)) => out.push(NamedDestination { name, config }),
                _ => complete = false,
            }
        }
        complete.then_some(out)
    }

    pub(super) fn destination(&mut self, raw: Option<RawDestination>) -> Option<DestinationConfig> {
        let Some(raw) = raw else {
            self.error(
                "destination",
                "required: configure exactly one of destination.local or destination.sftp (or a list of named destinations under destinations)",
            );
            return None;
        };
        self.destination_kind("destination", raw)
    }

    /// One destination's kind and settings, `at` its key path
    /// (`destination`, `destinations[1]`), which every error names.
    pub(super) fn destination_kind(
        &mut self,
        at: &str,
        raw: RawDestination,
    ) -> Option<DestinationConfig> {
        let kinds = format!("{at}.local or {at}.sftp");
        let kinds = kinds.as_str();
        match (raw.local, raw.sftp) {
            (None, None) => {
                self.error(
                    at,
                    format!("no destination configured: set exactly one of {kinds}"),
                );
                None
            }
            (Some(_), Some(_)) => {
                self.error(
                    at,
                    format!("both local and sftp are set: configure exactly one of {kinds}"),
                );
                None
            }
            (Some(local), None) => match local.unwrap_or_default().path {
                Some(path) if !path.as_os_str().is_empty() => {
                    Some(DestinationConfig::Local { path })
                }
                _ => {
                    self.error(
                        format!("{at}.local.path"),
                        "required: the directory backup sets are written to",
                    );
                    None
                }
            },
            (None, Some(sftp)) => self
                .sftp(at, sftp.unwrap_or_default())
                .map(DestinationConfig::Sftp),
        }
    }

    pub(super) fn sftp(&mut self, at: &str, raw: RawSftp) -> Option<SftpConfig> {
        let host = self.required_text(
            &format!("{at}.sftp.host"),
            raw.host,
            "the SFTP server's host name or address",
        );
        if let Some(h) = &host {
            if h.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
                self.error(
                    format!("{at}.sftp.host"),
                    format!("{h:?} is not a host name or address; give the port in {at}.sftp.port"),
                );
            }
        }
        let port = raw.port.unwrap_or(defaults::SFTP_PORT);
        if port == 0 {
            self.error(
                format!("{at}.sftp.port"),
                "0 is not a port; the SSH default is 22",
            );
        }
        let user = self.required_text(
            &format!("{at}.sftp.user"),
            raw.user,
            "the login user on the SFTP server",
        );
        let path = self.required_text(
            &format!("{at}.sftp.path"),
            raw.path,
            "the base directory on the server, e.g. /srv/backups",
        );
        if let Some(p) = &path {
            if p.split('/').any(|c| c == "..") {
                self.error(
                    format!("{at}.sftp.path"),
                    format!("{p:?} contains '..'; give a plain directory"),
                );
            }
        }

        let host_key = self.sftp_host_key(at, raw.known_hosts_file, raw.host_key_fingerprint);
        let auth = self.sftp_auth(
            at,
            raw.private_key_file,
            raw.password_file,
            raw.private_key_passphrase_file,
        );
        let connect_timeout = self.duration(
            &format!("{at}.sftp.connect_timeout"),
            raw.connect_timeout,
            defaults::SFTP_CONNECT_TIMEOUT,
        );
        let io_timeout = self.duration(
            &format!("{at}.sftp.io_timeout"),
            raw.io_timeout,
            defaults::SFTP_IO_TIMEOUT,
        );
        if io_timeout < Duration::from_secs(1) {
            self.error(format!("{at}.sftp.io_timeout"), "must be at least 1s");
        }
        let streams = raw.streams.unwrap_or(defaults::SFTP_STREAMS);
        if !(1..=defaults::SFTP_STREAMS_MAX).contains(&streams) {
            self.error(
                format!("{at}.sftp.streams"),
                format!(
                    "{streams} is out of range: give 1 to {} (1 uses one SFTP session per file; the default is {})",
                    defaults::SFTP_STREAMS_MAX,
                    defaults::SFTP_STREAMS
                ),
            );
        }
        Some(SftpConfig {
            host: host?,
            port,
            user: user?,
            path: path?,
            host_key: host_key?,
            auth: auth?,
            connect_timeout,
            io_timeout,
            require_fsync: raw.require_fsync.unwrap_or(true),
            streams,
        })
    }

    /// `known_hosts_file` or `host_key_fingerprint`: exactly one, the server's
    /// host key known in advance.
    fn sftp_host_key(
        &mut self,
        at: &str,
        known_hosts_file: Option<PathBuf>,
        host_key_fingerprint: Option<String>,
    ) -> Option<HostKeyCheck> {
        match (known_hosts_file, host_key_fingerprint) {
            (Some(_), Some(_)) => {
                self.error(
                    format!("{at}.sftp.host_key_fingerprint"),
                    "set either known_hosts_file or host_key_fingerprint, not both",
                );
                None
            }
            (None, None) => {
                self.error(
                    format!("{at}.sftp.known_hosts_file"),
                    "required (or host_key_fingerprint): the server's host key must be known in advance; \
                     get it with `ssh-keyscan -p PORT HOST`, check it with the server's administrator, \
                     and put the lines in a known_hosts file",
                );
                None
            }
            (Some(file), None) => {
                self.readable_file(&format!("{at}.sftp.known_hosts_file"), &file);
                Some(HostKeyCheck::KnownHosts(file))
            }
            (None, Some(fp)) => {
                match etcd_backup_known_hosts::parse_sha256_fingerprint(fp.trim()) {
                    Ok(fp) => Some(HostKeyCheck::Fingerprint(fp)),
                    Err(e) => {
                        self.error(format!("{at}.sftp.host_key_fingerprint"), e);
                        None
                    }
                }
            }
        }
    }

    /// `private_key_file` (with its optional passphrase file) or `password_file`:
    /// exactly one, read from files only.
    fn sftp_auth(
        &mut self,
        at: &str,
        private_key_file: Option<PathBuf>,
        password_file: Option<PathBuf>,
        private_key_passphrase_file: Option<PathBuf>,
    ) -> Option<SftpAuth> {
        match (private_key_file, password_file) {
            (Some(_), Some(_)) => {
                self.error(
                    format!("{at}.sftp.password_file"),
                    "set either private_key_file or password_file, not both",
                );
                None
            }
            (None, None) => {
                self.error(
                    format!("{at}.sftp.private_key_file"),
                    "required (or password_file): how the agent logs in; secrets are read from files only",
                );
                None
            }
            (Some(key_file), None) => {
                self.readable_file(&format!("{at}.sftp.private_key_file"), &key_file);
                if let Some(p) = &private_key_passphrase_file {
                    self.readable_file(&format!("{at}.sftp.private_key_passphrase_file"), p);
                }
                Some(SftpAuth::PrivateKey {
                    key_file,
                    passphrase_file: private_key_passphrase_file,
                })
            }
            (None, Some(password_file)) => {
                if private_key_passphrase_file.is_some() {
                    self.error(
                        format!("{at}.sftp.private_key_passphrase_file"),
                        "only used with private_key_file",
                    );
                }
                self.readable_file(&format!("{at}.sftp.password_file"), &password_file);
                Some(SftpAuth::Password(password_file))
            }
        }
    }
}

/// `^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`: a metric label value and a
/// command-line word, nothing to quote.
pub(super) fn is_valid_destination_name(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= DESTINATION_NAME_MAX
        && inner(&b[0])
        && inner(&b[b.len() - 1])
        && b.iter().all(|c| inner(c) || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::super::{Config, DestinationConfig, Environment};

    fn sftp(streams_line: &str) -> Result<u32, Vec<super::super::FieldError>> {
        let password = tempfile::NamedTempFile::new().unwrap();
        let text = format!(
            "etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\nresources:\n  layout: none\n\
             destination:\n  sftp:\n    host: backup.example\n    user: u\n    path: /b\n    \
             host_key_fingerprint: \"SHA256:{}\"\n    password_file: {}\n{streams_line}",
            "A".repeat(43),
            password.path().display()
        );
        let env = Environment {
            node_name: None,
            hostname: Some("h".into()),
        };
        Config::parse(&text, &env).map(|c| match c.destination() {
            DestinationConfig::Sftp(s) => s.streams,
            DestinationConfig::Local { .. } => unreachable!("an sftp destination"),
        })
    }

    #[test]
    fn streams_defaults_to_the_documented_value_and_must_be_1_to_16() {
        assert_eq!(sftp("").unwrap(), super::defaults::SFTP_STREAMS);
        assert_eq!(sftp("    streams: 1\n").unwrap(), 1);
        assert_eq!(sftp("    streams: 16\n").unwrap(), 16);
        for bad in ["0", "17"] {
            let errs = sftp(&format!("    streams: {bad}\n")).unwrap_err();
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].field, "destination.sftp.streams");
            assert!(
                errs[0].message.contains("give 1 to 16"),
                "{}",
                errs[0].message
            );
        }
    }

    const HEAD: &str =
        "node_name: n\netcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\nresources:\n  layout: none\n";

    fn parse(destinations: &str) -> Result<Config, Vec<super::super::FieldError>> {
        let env = Environment {
            node_name: None,
            hostname: None,
        };
        Config::parse(&format!("{HEAD}{destinations}"), &env)
    }

    fn fields(destinations: &str) -> Vec<(String, String)> {
        parse(destinations)
            .expect_err("config was accepted")
            .into_iter()
            .map(|e| (e.field, e.message))
            .collect()
    }

    #[test]
    fn named_destinations_are_kept_in_order_and_the_first_is_the_default() {
        let c = parse(
            "destinations:\n  - name: here\n    local:\n      path: /a\n  - name: there-2\n    local:\n      path: /b\n",
        )
        .unwrap();
        assert_eq!(c.destination_names(), ["here", "there-2"]);
        assert_eq!(c.default_destination().name, "here");
        assert_eq!(
            c.named_destination(Some("there-2")).unwrap().name,
            "there-2"
        );
        let e = c.named_destination(Some("nope")).unwrap_err();
        assert!(e.contains("\"nope\"") && e.contains("here, there-2"), "{e}");
        let only = c.only_destination(Some("there-2")).unwrap();
        assert_eq!(only.destination_names(), ["there-2"]);

        // `destination:` is one destination named `default`.
        let c = parse("destination:\n  local:\n    path: /a\n").unwrap();
        assert_eq!(
            c.destination_names(),
            [super::super::DEFAULT_DESTINATION_NAME]
        );
    }

    #[test]
    fn bad_destination_lists_name_the_entry_and_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "destination:\n  local:\n    path: /a\ndestinations:\n  - name: b\n    local:\n      path: /b\n",
                "destinations",
                "use one",
            ),
            ("destinations: []\n", "destinations", "at least one"),
            (
                "destinations:\n  - local:\n      path: /a\n",
                "destinations[0].name",
                "required",
            ),
            (
                "destinations:\n  - name: Offsite\n    local:\n      path: /a\n",
                "destinations[0].name",
                "lower-case",
            ),
            (
                "destinations:\n  - name: -a\n    local:\n      path: /a\n",
                "destinations[0].name",
                "starting and ending",
            ),
            (
                &"destinations:\n  - name: NAME\n    local:\n      path: /a\n".replace("NAME", &"a".repeat(33)),
                "destinations[0].name",
                "1 to 32",
            ),
            (
                "destinations:\n  - name: a\n    local:\n      path: /a\n  - name: a\n    local:\n      path: /b\n",
                "destinations[1].name",
                "already the name of destinations[0]",
            ),
            (
                "destinations:\n  - name: a\n    local:\n      path: /a\n  - name: b\n    sftp:\n      user: u\n      path: /b\n      host_key_fingerprint: x\n      password_file: /nonexistent\n",
                "destinations[1].sftp.host",
                "required",
            ),
            (
                "destinations:\n  - name: a\n",
                "destinations[0]",
                "exactly one of destinations[0].local or destinations[0].sftp",
            ),
            (
                "destinations:\n  - name: a\n    local:\n",
                "destinations[0].local.path",
                "required",
            ),
            (
                "destinations:\n  - name: a\n    local:\n      path: /a\n    color: red\n",
                "destinations[0]",
                "unknown field",
            ),
        ];
        for (yaml, field, message) in cases {
            let errs = fields(yaml);
            assert!(
                errs.iter()
                    .any(|(f, m)| f.starts_with(field) && m.contains(message)),
                "{yaml}: wanted {field}: ..{message}.., got {errs:?}"
            );
        }
    }

    #[test]
    fn destination_names_are_label_values() {
        for good in ["a", "s3", "offsite-1", &"a".repeat(32)] {
            assert!(super::is_valid_destination_name(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "ä", &"a".repeat(33)] {
            assert!(!super::is_valid_destination_name(bad), "{bad}");
        }
    }
}
