//! `destination:` / `destinations:` validated: a local directory, an SFTP server (host, auth, host-key check) or an S3 bucket.

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
                "required: configure exactly one of destination.local, destination.sftp or destination.s3 (or a list of named destinations under destinations)",
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
        let kinds = format!("{at}.local, {at}.sftp or {at}.s3");
        let given: Vec<&str> = [
            ("local", raw.local.is_some()),
            ("sftp", raw.sftp.is_some()),
            ("s3", raw.s3.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| name)
        .collect();
        if given.is_empty() {
            self.error(
                at,
                format!("no destination configured: set exactly one of {kinds}"),
            );
            return None;
        }
        if given.len() > 1 {
            self.error(
                at,
                format!(
                    "{} are set: configure exactly one of {kinds}",
                    given.join(" and ")
                ),
            );
            return None;
        }
        if let Some(local) = raw.local {
            return match local.unwrap_or_default().path {
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
            };
        }
        if let Some(sftp) = raw.sftp {
            return self
                .sftp(at, sftp.unwrap_or_default())
                .map(DestinationConfig::Sftp);
        }
        raw.s3
            .and_then(|s3| self.s3(at, s3.unwrap_or_default()))
            .map(DestinationConfig::S3)
    }

    pub(super) fn s3(&mut self, at: &str, raw: RawS3) -> Option<S3Config> {
        let endpoint = self
            .required_text(
                &format!("{at}.s3.endpoint"),
                raw.endpoint,
                "the object store's URL, e.g. https://s3.openshift-storage.svc:443",
            )
            .and_then(|text| match url::Url::parse(text.trim()) {
                Ok(u)
                    if matches!(u.scheme(), "http" | "https")
                        && u.host_str().is_some_and(|h| !h.is_empty())
                        && (u.path().is_empty() || u.path() == "/")
                        && u.query().is_none()
                        && u.fragment().is_none()
                        && u.username().is_empty()
                        && u.password().is_none() =>
                {
                    Some(u)
                }
                Ok(_) => {
                    self.error(
                        format!("{at}.s3.endpoint"),
                        format!("{text:?} is not an endpoint URL: give http:// or https://, a host and an optional port, with no path, query or user (put the bucket in destination.s3.bucket and key prefix in destination.s3.prefix)"),
                    );
                    None
                }
                Err(e) => {
                    self.error(
                        format!("{at}.s3.endpoint"),
                        format!("{text:?} is not a URL ({e}): give e.g. https://s3.example.com or http://127.0.0.1:3900"),
                    );
                    None
                }
            });
        let region = raw
            .region
            .unwrap_or_else(|| defaults::S3_REGION.to_string());
        if region.is_empty()
            || !region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            self.error(
                format!("{at}.s3.region"),
                format!("{region:?} is not a region name: give lowercase letters, digits and '-', e.g. us-east-1 (the default, which Garage, MinIO and Ceph RGW accept unless configured otherwise)"),
            );
        }
        let bucket = self.required_text(
            &format!("{at}.s3.bucket"),
            raw.bucket,
            "the bucket backup sets are stored in",
        );
        if let Some(b) = &bucket {
            if let Err(why) = check_bucket_name(b) {
                self.error(
                    format!("{at}.s3.bucket"),
                    format!("{b:?} is not an S3 bucket name: {why}"),
                );
            }
        }
        let prefix = raw.prefix.filter(|p| !p.is_empty());
        if let Some(p) = &prefix {
            if p.starts_with('/')
                || p.ends_with('/')
                || p.split('/')
                    .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'))
            {
                self.error(
                    format!("{at}.s3.prefix"),
                    format!("{p:?} is not a key prefix: give names separated by single '/', with no leading or trailing '/' and no '.' or '..', e.g. etcd-backups/prod"),
                );
            }
        }
        let access_key_id_file = match raw.access_key_id_file {
            Some(f) => {
                self.readable_file(&format!("{at}.s3.access_key_id_file"), &f);
                Some(f)
            }
            None => {
                self.error(
                    format!("{at}.s3.access_key_id_file"),
                    "required: a file holding the access key id (secrets are read from files only, e.g. a mounted Secret)",
                );
                None
            }
        };
        let secret_access_key_file = match raw.secret_access_key_file {
            Some(f) => {
                self.readable_file(&format!("{at}.s3.secret_access_key_file"), &f);
                Some(f)
            }
            None => {
                self.error(
                    format!("{at}.s3.secret_access_key_file"),
                    "required: a file holding the secret access key (secrets are read from files only, e.g. a mounted Secret)",
                );
                None
            }
        };
        if let Some(f) = &raw.session_token_file {
            self.readable_file(&format!("{at}.s3.session_token_file"), f);
        }
        let storage_class = raw.storage_class.filter(|c| !c.is_empty());
        if let Some(c) = &storage_class {
            if !c
                .chars()
                .all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit() || ch == '_')
            {
                self.error(
                    format!("{at}.s3.storage_class"),
                    format!("{c:?} is not a storage class: give the store's name for it, e.g. STANDARD or STANDARD_IA, or leave it out for the bucket's default"),
                );
            }
        }
        if let Some(ca) = &raw.ca_file {
            self.readable_file(&format!("{at}.s3.ca_file"), ca);
            if endpoint.as_ref().is_some_and(|u| u.scheme() != "https") {
                self.error(
                    format!("{at}.s3.ca_file"),
                    "only used with an https:// endpoint: remove it, or give the endpoint as https://",
                );
            }
        }
        let allow_plaintext_http = raw.allow_plaintext_http.unwrap_or(false);
        if let Some(u) = endpoint.as_ref().filter(|u| u.scheme() == "http") {
            if !allow_plaintext_http && !self.encryption_given {
                self.error(
                    format!("{at}.s3.endpoint"),
                    format!("{} is plain HTTP: the snapshot (every Secret of the cluster) and the resources tarball (the control plane's private keys) would cross the network in clear; give an https:// endpoint, or turn on encryption: (age recipients) so only ciphertext is sent, or, if the path to the store is trusted, set {at}.s3.allow_plaintext_http: true", u.as_str().trim_end_matches('/')),
                );
            }
        }
        Some(S3Config {
            endpoint: endpoint?,
            region,
            bucket: bucket?,
            prefix,
            path_style: raw.path_style.unwrap_or(false),
            access_key_id_file: access_key_id_file?,
            secret_access_key_file: secret_access_key_file?,
            session_token_file: raw.session_token_file,
            storage_class,
            ca_file: raw.ca_file,
            allow_plaintext_http,
            // Set from `retry:` once that section is validated.
            retry: RetryConfig {
                attempts: defaults::RETRY_ATTEMPTS,
                initial_delay: defaults::RETRY_INITIAL_DELAY,
                max_delay: defaults::RETRY_MAX_DELAY,
            },
        })
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

/// S3's bucket naming rules: 3 to 63 lowercase letters, digits, '.' and
/// '-', starting and ending with a letter or digit, no "..", not an address.
fn check_bucket_name(b: &str) -> Result<(), &'static str> {
    if !(3..=63).contains(&b.len()) {
        return Err("it must be 3 to 63 characters long");
    }
    if !b
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
    {
        return Err("use lowercase letters, digits, '.' and '-' only");
    }
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !edge(b.chars().next()) || !edge(b.chars().last()) {
        return Err("it must start and end with a letter or digit");
    }
    if b.contains("..") || b.contains(".-") || b.contains("-.") {
        return Err("'.' must not be next to another '.' or a '-'");
    }
    if b.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("it must not look like an IP address");
    }
    Ok(())
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
            _ => unreachable!("an sftp destination"),
        })
    }

    #[test]
    fn streams_defaults_to_the_documented_value_and_must_be_1_to_32() {
        assert_eq!(sftp("").unwrap(), super::defaults::SFTP_STREAMS);
        assert_eq!(sftp("    streams: 1\n").unwrap(), 1);
        assert_eq!(sftp("    streams: 32\n").unwrap(), 32);
        for bad in ["0", "33"] {
            let errs = sftp(&format!("    streams: {bad}\n")).unwrap_err();
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].field, "destination.sftp.streams");
            assert!(
                errs[0].message.contains("give 1 to 32"),
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
                "exactly one of destinations[0].local, destinations[0].sftp or destinations[0].s3",
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

    fn s3(lines: &str) -> Result<super::super::S3Config, Vec<super::super::FieldError>> {
        let key = tempfile::NamedTempFile::new().unwrap();
        let text = format!(
            "etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\nresources:\n  layout: none\n\
             retry:\n  attempts: 4\n\
             destination:\n  s3:\n    access_key_id_file: {k}\n    secret_access_key_file: {k}\n{lines}",
            k = key.path().display()
        );
        let env = Environment {
            node_name: None,
            hostname: Some("h".into()),
        };
        Config::parse(&text, &env).map(|c| match c.destination() {
            DestinationConfig::S3(s) => s.clone(),
            _ => unreachable!("an s3 destination"),
        })
    }

    #[test]
    fn s3_defaults_and_describe() {
        let c = s3(
            "    endpoint: http://127.0.0.1:3900\n    bucket: etcd-backups\n    prefix: prod/eu\n    allow_plaintext_http: true\n",
        )
        .unwrap();
        assert!(c.allow_plaintext_http);
        assert_eq!(c.region, "us-east-1");
        assert!(!c.path_style);
        assert_eq!(c.retry.attempts, 4, "the retry: section is passed on");
        assert_eq!(c.storage_class, None);
        assert_eq!(
            c.describe(),
            "s3://etcd-backups/prod/eu at http://127.0.0.1:3900"
        );
    }

    #[test]
    fn s3_bad_values_name_the_key_and_what_to_do() {
        for (lines, field, says) in [
            ("    bucket: b-1\n", "destination.s3.endpoint", "required"),
            (
                "    endpoint: ftp://h\n    bucket: b-1\n",
                "destination.s3.endpoint",
                "http:// or https://",
            ),
            (
                "    endpoint: https://h/bucket\n    bucket: b-1\n",
                "destination.s3.endpoint",
                "no path",
            ),
            (
                "    endpoint: https://h\n",
                "destination.s3.bucket",
                "required",
            ),
            (
                "    endpoint: https://h\n    bucket: My_Bucket\n",
                "destination.s3.bucket",
                "lowercase",
            ),
            (
                "    endpoint: https://h\n    bucket: ab\n",
                "destination.s3.bucket",
                "3 to 63",
            ),
            (
                "    endpoint: https://h\n    bucket: 10.0.0.1\n",
                "destination.s3.bucket",
                "IP address",
            ),
            (
                "    endpoint: https://h\n    bucket: b-1\n    prefix: /x\n",
                "destination.s3.prefix",
                "no leading or trailing",
            ),
            (
                "    endpoint: https://h\n    bucket: b-1\n    prefix: a/../b\n",
                "destination.s3.prefix",
                "'..'",
            ),
            (
                "    endpoint: https://h\n    bucket: b-1\n    region: US East\n",
                "destination.s3.region",
                "lowercase",
            ),
            (
                "    endpoint: https://h\n    bucket: b-1\n    storage_class: cold storage\n",
                "destination.s3.storage_class",
                "STANDARD",
            ),
            (
                "    endpoint: http://h\n    bucket: b-1\n    ca_file: /etc/hostname\n    allow_plaintext_http: true\n",
                "destination.s3.ca_file",
                "https://",
            ),
            (
                "    endpoint: https://h\n    bucket: b-1\n    ca_file: /nonexistent/ca.pem\n",
                "destination.s3.ca_file",
                "cannot read",
            ),
        ] {
            let errs = s3(lines).unwrap_err();
            assert_eq!(errs.len(), 1, "{lines}: {errs:?}");
            assert_eq!(errs[0].field, field, "{lines}");
            assert!(
                errs[0].message.contains(says),
                "{lines}: {}",
                errs[0].message
            );
        }
    }

    #[test]
    fn s3_session_token_file_is_optional_and_must_be_readable() {
        let base = "    endpoint: https://127.0.0.1:3900\n    bucket: etcd-backups\n";
        assert_eq!(s3(base).unwrap().session_token_file, None);
        let token = tempfile::NamedTempFile::new().unwrap();
        let given = format!("{base}    session_token_file: {}\n", token.path().display());
        assert_eq!(
            s3(&given).unwrap().session_token_file.as_deref(),
            Some(token.path())
        );
        let missing = format!("{base}    session_token_file: /nonexistent/token\n");
        let errs = s3(&missing).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.field == "destination.s3.session_token_file"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_plain_http_endpoint_needs_encryption_or_the_explicit_opt_out() {
        let errs = s3("    endpoint: http://store:3900\n    bucket: b-1\n").unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "destination.s3.endpoint");
        for says in [
            "http://store:3900 is plain HTTP",
            "in clear",
            "https://",
            "encryption:",
            "destination.s3.allow_plaintext_http: true",
        ] {
            assert!(
                errs[0].message.contains(says),
                "{says}: {}",
                errs[0].message
            );
        }
        let c = s3(
            "    endpoint: http://store:3900\n    bucket: b-1\n    allow_plaintext_http: true\n",
        )
        .unwrap();
        assert!(c.allow_plaintext_http);
        assert!(s3("    endpoint: https://store\n    bucket: b-1\n").is_ok());
        // Encrypted, the data files are ciphertext: no opt-out needed.
        let env = Environment {
            node_name: None,
            hostname: Some("h".into()),
        };
        let key = tempfile::NamedTempFile::new().unwrap();
        let text = format!(
            "etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\nresources:\n  layout: none\n\
             encryption:\n  recipients: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]\n\
             destinations:\n  - name: a\n    s3:\n      endpoint: http://store:3900\n      bucket: b-1\n\
             \x20     access_key_id_file: {k}\n      secret_access_key_file: {k}\n\
             \x20 - name: b\n    local:\n      path: /b\n",
            k = key.path().display()
        );
        Config::parse(&text, &env).unwrap();
        // In a list, the error names the entry.
        let text = text.replace("encryption:\n  recipients: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]\n", "");
        let errs = Config::parse(&text, &env).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "destinations[0].s3.endpoint");
        assert!(
            errs[0]
                .message
                .contains("destinations[0].s3.allow_plaintext_http: true"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn s3_credentials_come_from_files_only() {
        let env = Environment {
            node_name: None,
            hostname: Some("h".into()),
        };
        let text = "etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\nresources:\n  layout: none\n\
                    destination:\n  s3:\n    endpoint: https://h\n    bucket: b-1\n    secret_access_key: x\n";
        let errs = Config::parse(text, &env).unwrap_err();
        assert!(
            errs.iter().any(|e| e.message.contains("secret_access_key")),
            "{errs:?}"
        );
        let text = "etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\nresources:\n  layout: none\n\
                    destination:\n  s3:\n    endpoint: https://h\n    bucket: b-1\n";
        let errs = Config::parse(text, &env).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "destination.s3.access_key_id_file",
                "destination.s3.secret_access_key_file"
            ]
        );
    }

    #[test]
    fn only_one_destination_kind() {
        let env = Environment {
            node_name: None,
            hostname: Some("h".into()),
        };
        let text = "etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\nresources:\n  layout: none\n\
                    destination:\n  local:\n    path: /b\n  s3:\n    bucket: b-1\n";
        let errs = Config::parse(text, &env).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "destination");
        assert!(
            errs[0].message.contains("local and s3"),
            "{}",
            errs[0].message
        );
    }
}
