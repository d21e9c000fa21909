//! `etcd:` validated: endpoints, TLS files, timeouts.

use super::*;

impl Validator {
    pub(super) fn etcd(&mut self, raw: RawEtcd) -> Option<EtcdConfig> {
        let (endpoints, schemes) = self.etcd_endpoints(raw.endpoints);

        let any_https = schemes.iter().any(|(_, s)| s == "https");
        for (i, s) in &schemes {
            if any_https && s == "http" {
                self.error(
                    format!("etcd.endpoints[{i}]"),
                    "mixes http with https endpoints; use one scheme for all",
                );
            }
        }

        let tls_files_set =
            raw.ca_file.is_some() || raw.cert_file.is_some() || raw.key_file.is_some();
        if let Some(p) = &raw.ca_file {
            self.readable_file("etcd.ca_file", p);
        }
        if let Some(p) = &raw.cert_file {
            self.readable_file("etcd.cert_file", p);
        }
        if let Some(p) = &raw.key_file {
            self.readable_file("etcd.key_file", p);
        }
        let client = match (raw.cert_file, raw.key_file) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                self.error("etcd.key_file", "required when etcd.cert_file is set");
                None
            }
            (None, Some(_)) => {
                self.error("etcd.cert_file", "required when etcd.key_file is set");
                None
            }
        };
        let tls = if any_https {
            match raw.ca_file {
                Some(ca_file) => Some(EtcdTls { ca_file, client }),
                None => {
                    self.error(
                        "etcd.ca_file",
                        "required with https endpoints: the CA bundle that signed etcd's serving certificate",
                    );
                    None
                }
            }
        } else {
            if tls_files_set && !schemes.is_empty() {
                self.error(
                    "etcd.endpoints[0]",
                    "uses http, but TLS files are set; use https:// endpoints or remove ca_file/cert_file/key_file",
                );
            }
            None
        };

        let dial_timeout = self.duration(
            "etcd.dial_timeout",
            raw.dial_timeout,
            defaults::DIAL_TIMEOUT,
        );
        let stall_timeout = self.duration(
            "etcd.stall_timeout",
            raw.stall_timeout,
            defaults::STALL_TIMEOUT,
        );

        if endpoints.is_empty() {
            return None;
        }
        Some(EtcdConfig {
            endpoints,
            tls,
            dial_timeout,
            stall_timeout,
        })
    }

    /// `etcd.endpoints`: at least one http(s) URL with a host, an explicit
    /// port and no path; returns the good ones with their index and scheme.
    fn etcd_endpoints(&mut self, raw: Option<Vec<String>>) -> (Vec<Url>, Vec<(usize, String)>) {
        let mut endpoints = Vec::new();
        let mut schemes = Vec::new();
        match raw {
            None => self.error(
                "etcd.endpoints",
                "required: the URL of the local etcd member, e.g. https://10.0.0.5:2379",
            ),
            Some(list) if list.is_empty() => self.error(
                "etcd.endpoints",
                "empty: give the URL of the local etcd member first",
            ),
            Some(list) => {
                for (i, text) in list.into_iter().enumerate() {
                    let field = format!("etcd.endpoints[{i}]");
                    match Url::parse(&text) {
                        Ok(url) => {
                            if url.scheme() != "http" && url.scheme() != "https" {
                                self.error(
                                    field,
                                    format!("invalid URL {text:?}: scheme must be http or https"),
                                );
                            } else if url.host_str().is_none_or(str::is_empty) {
                                self.error(field, format!("invalid URL {text:?}: no host"));
                            } else if url.port_or_known_default().is_none() || url.port().is_none()
                            {
                                self.error(
                                    field,
                                    format!("invalid URL {text:?}: give the port explicitly, e.g. :2379"),
                                );
                            } else if url.path() != "/" && !url.path().is_empty() {
                                self.error(
                                    field,
                                    format!("invalid URL {text:?}: an etcd endpoint has no path"),
                                );
                            } else {
                                schemes.push((i, url.scheme().to_string()));
                                endpoints.push(url);
                            }
                        }
                        Err(e) => self.error(field, format!("invalid URL {text:?}: {e}")),
                    }
                }
            }
        }
        (endpoints, schemes)
    }
}
