//! A small S3 client: signed requests with per-request retries, and the
//! operations the destination needs.

use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use reqwest::{Method, StatusCode};

use super::sign::{self, Credentials};
use super::xml;
use crate::config::{RetryConfig, S3Config};
use crate::store::destination::DestinationError;

/// Connecting (TCP and TLS) to the store for this long fails the attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A response (headers, or the next bytes of a body) that does not come for
/// this long fails the attempt, so a stalled connection is noticed. A
/// multipart completion has only this: AWS answers a long one with `200`
/// and then whitespace, for minutes, before the result.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request with a body may take this long plus [`MIN_RATE`] for its body:
/// a 5 MiB part gets 60 s + 160 s, enough for a 256 kbit/s link.
pub const BASE_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest upload rate (bytes per second) a request is given time for.
pub const MIN_RATE: u64 = 32 * 1024;
/// The largest error body read (the rest is not needed to name the error).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A signed-request client for one bucket.
pub struct Client {
    http: reqwest::Client,
    endpoint: url::Url,
    region: String,
    bucket: String,
    path_style: bool,
    creds: Credentials,
    storage_class: Option<String>,
    retry: RetryConfig,
    describe: String,
    /// [`BASE_TIMEOUT`], shorter in tests.
    base_timeout: Duration,
}

/// What one request is.
pub struct Req<'a> {
    /// Names the operation in errors, e.g. "cannot upload part of".
    pub op: &'static str,
    /// The HTTP method.
    pub method: Method,
    /// The object key; `None` for a bucket request.
    pub key: Option<&'a str>,
    /// Query parameters.
    pub query: Vec<(String, String)>,
    /// Extra headers (lowercase names).
    pub headers: Vec<(String, String)>,
    /// The body (in memory: at most one part).
    pub body: Bytes,
    /// Only the idle timeout applies, not the total one (a completion).
    pub idle_only: bool,
}

impl<'a> Req<'a> {
    /// A request without query, extra headers or body.
    pub fn new(op: &'static str, method: Method, key: Option<&'a str>) -> Self {
        Self {
            op,
            method,
            key,
            query: Vec::new(),
            headers: Vec::new(),
            body: Bytes::new(),
            idle_only: false,
        }
    }

    /// Bounds the request by [`IDLE_TIMEOUT`] between bytes only, never
    /// by a total time.
    pub fn idle_only(mut self) -> Self {
        self.idle_only = true;
        self
    }

    /// Adds a query parameter.
    pub fn query(mut self, k: &str, v: impl Into<String>) -> Self {
        self.query.push((k.to_string(), v.into()));
        self
    }

    /// Adds a header.
    pub fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, b: impl Into<Bytes>) -> Self {
        self.body = b.into();
        self
    }
}

/// A successful attempt: the response, or its whole body.
enum Answer {
    Response(reqwest::Response),
    Text(String),
}

/// How a request failed, before it becomes a [`DestinationError`].
#[derive(Debug)]
pub struct Failure {
    /// The HTTP status, when there was an answer.
    pub status: Option<StatusCode>,
    /// The S3 error code, when the body had one.
    pub code: Option<String>,
    /// What went wrong, for people.
    pub detail: String,
    /// Whether another attempt may succeed.
    pub transient: bool,
}

impl Failure {
    fn from_reqwest(e: &reqwest::Error) -> Self {
        // Connection refused/reset, timeouts, a body cut off: all may pass.
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            src = s.source();
        }
        // An untrusted certificate stays untrusted: not worth a retry.
        let certificate = detail.contains("certificate");
        Self {
            status: None,
            code: certificate.then(|| "TlsCertificate".to_string()),
            detail,
            transient: !certificate,
        }
    }

    fn from_answer(status: StatusCode, body: &str) -> Self {
        let parsed = xml::error(body);
        let code = parsed.as_ref().map(|e| e.code.clone());
        // A skewed clock stays skewed: every retry is refused the same way.
        // A conditional request that raced another one on the same key
        // (409 ConditionalRequestConflict) is to be tried again, says AWS.
        let transient = (status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || matches!(
                code.as_deref(),
                Some(
                    "SlowDown"
                        | "RequestTimeout"
                        | "InternalError"
                        | "ServiceUnavailable"
                        | "ConditionalRequestConflict"
                )
            ))
            && code.as_deref() != Some("RequestTimeTooSkewed");
        let detail = match &parsed {
            Some(e) if e.message.is_empty() => format!("HTTP {status}, {}", e.code),
            Some(e) => format!("HTTP {status}, {}: {}", e.code, e.message),
            None => format!("HTTP {status}"),
        };
        Self {
            status: Some(status),
            code,
            detail,
            transient,
        }
    }

    /// Adds how far this machine's clock is from the store's, measured from
    /// the answer's `Date` header, to a `RequestTimeTooSkewed` refusal.
    fn with_skew(mut self, server_date: Option<&str>, sent_at: chrono::DateTime<Utc>) -> Self {
        if !self.code_is("RequestTimeTooSkewed") {
            return self;
        }
        let server = server_date.and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok());
        match server {
            Some(server) => {
                let skew = sent_at.signed_duration_since(server.with_timezone(&Utc));
                let secs = skew.num_seconds();
                let way = if secs >= 0 { "ahead of" } else { "behind" };
                self.detail.push_str(&format!(
                    "; this machine's clock is {} s {way} the store's (its Date header says {})",
                    secs.unsigned_abs(),
                    server_date.unwrap_or_default()
                ));
            }
            None => self
                .detail
                .push_str("; the store's answer has no Date header to measure the skew by"),
        }
        self
    }

    /// Whether this is the HTTP status `s`.
    pub fn is(&self, s: StatusCode) -> bool {
        self.status == Some(s)
    }

    /// Whether the S3 error code is `code`.
    pub fn code_is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}

/// What to do about a permanent S3 error code, for the message.
fn hint(f: &Failure, bucket: &str) -> String {
    match f.code.as_deref() {
        Some("InvalidAccessKeyId") => {
            "the store does not know this access key id: check destination.s3.access_key_id_file"
                .into()
        }
        Some("SignatureDoesNotMatch") => {
            "the secret access key does not belong to this access key id: check destination.s3.secret_access_key_file".into()
        }
        Some("NoSuchBucket") => format!(
            "bucket {bucket} does not exist: create it or fix destination.s3.bucket"
        ),
        Some("TlsCertificate") => {
            "the store's TLS certificate is not trusted: give the CA that signed it (PEM) in destination.s3.ca_file".into()
        }
        Some("RequestTimeTooSkewed") => {
            "the store refuses requests signed by a clock more than 15 minutes off its own: fix this machine's clock (NTP), then back up again; not retried".into()
        }
        Some("AccessDenied") => {
            "not allowed: check the key and the bucket policy (docs/s3.md)".into()
        }
        _ if f.is(StatusCode::FORBIDDEN) => {
            "not allowed: check the key, its secret and the bucket policy (docs/s3.md)".into()
        }
        _ if f.transient => "gave up after the retries of the retry: section".into(),
        _ => "not retried".into(),
    }
}

impl Client {
    /// A client for `config`'s bucket, reading the credentials from their files.
    ///
    /// # Errors
    /// [`DestinationError::Secret`] for an unreadable credential or CA file;
    /// [`DestinationError::Connect`] when the HTTP client cannot be built.
    pub fn new(config: &S3Config) -> Result<Self, DestinationError> {
        Self::with_timeouts(config, BASE_TIMEOUT, IDLE_TIMEOUT)
    }

    /// [`Client::new`] with other timeouts than [`BASE_TIMEOUT`] and
    /// [`IDLE_TIMEOUT`] (tests).
    fn with_timeouts(
        config: &S3Config,
        base_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Self, DestinationError> {
        let read = |field: &'static str, path: &std::path::Path| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .map_err(|source| DestinationError::Secret {
                    field,
                    path: path.to_path_buf(),
                    source,
                })
        };
        let access_key_id = read(
            "destination.s3.access_key_id_file",
            &config.access_key_id_file,
        )?;
        let secret_access_key = read(
            "destination.s3.secret_access_key_file",
            &config.secret_access_key_file,
        )?;
        let session_token = match &config.session_token_file {
            Some(f) => Some(read("destination.s3.session_token_file", f)?),
            None => None,
        };
        let empty = |field: &'static str, path: &std::path::Path| DestinationError::Secret {
            field,
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
        };
        if access_key_id.is_empty() {
            return Err(empty(
                "destination.s3.access_key_id_file",
                &config.access_key_id_file,
            ));
        }
        if secret_access_key.is_empty() {
            return Err(empty(
                "destination.s3.secret_access_key_file",
                &config.secret_access_key_file,
            ));
        }
        if let (Some(""), Some(f)) = (session_token.as_deref(), &config.session_token_file) {
            return Err(empty("destination.s3.session_token_file", f));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(idle_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("etcd-backup-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|source| DestinationError::Secret {
                field: "destination.s3.ca_file",
                path: ca.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                DestinationError::Secret {
                    field: "destination.s3.ca_file",
                    path: ca.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                }
            })?;
            if certs.is_empty() {
                return Err(DestinationError::Secret {
                    field: "destination.s3.ca_file",
                    path: ca.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "no PEM certificate in it",
                    ),
                });
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder.build().map_err(|e| DestinationError::Connect {
            location: config.describe(),
            detail: format!("cannot set up the HTTP client: {e}"),
        })?;
        Ok(Self {
            http,
            endpoint: config.endpoint.clone(),
            region: config.region.clone(),
            bucket: config.bucket.clone(),
            path_style: config.path_style,
            creds: Credentials {
                access_key_id,
                secret_access_key,
                session_token,
            },
            storage_class: config.storage_class.clone(),
            retry: config.retry,
            describe: config.describe(),
            base_timeout,
        })
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The access key id (not secret).
    pub fn key_id(&self) -> &str {
        &self.creds.access_key_id
    }

    /// `s3://<bucket>/<prefix> at <endpoint>`.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// How many times a request may be sent in all (`retry.attempts`).
    pub fn attempts(&self) -> u32 {
        self.retry.attempts
    }

    /// The `retry:` back-off before attempt `attempt + 1`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.retry.backoff(attempt, rand::random::<f64>())
    }

    /// The configured storage class.
    pub fn storage_class(&self) -> Option<&str> {
        self.storage_class.as_deref()
    }

    /// The endpoint without a trailing `/`.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str().trim_end_matches('/')
    }

    /// `s3://<bucket>/<key> at <endpoint> (access key id K)`, for errors.
    pub fn location(&self, key: Option<&str>) -> String {
        format!(
            "s3://{}/{} at {} (access key id {})",
            self.bucket,
            key.unwrap_or(""),
            self.endpoint(),
            self.creds.access_key_id
        )
    }

    /// The error for a failed request.
    pub fn error(&self, op: &'static str, key: Option<&str>, f: Failure) -> DestinationError {
        DestinationError::S3 {
            op,
            location: self.location(key),
            detail: format!("{}; {}", f.detail, hint(&f, &self.bucket)),
            transient: f.transient,
        }
    }

    /// Host (with port) and the URI-encoded path for `key`.
    fn target(&self, key: Option<&str>) -> (String, String) {
        let host = self.endpoint.host_str().unwrap_or_default();
        let host = match self.endpoint.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let key_path = key.map(|k| sign::uri_encode(k, true)).unwrap_or_default();
        if self.path_style {
            let mut path = format!("/{}", self.bucket);
            if key.is_some() {
                path.push('/');
                path.push_str(&key_path);
            }
            (host, path)
        } else {
            (format!("{}.{host}", self.bucket), format!("/{key_path}"))
        }
    }

    /// Sends `req` once, signed; any answer outside 2xx is a [`Failure`].
    async fn send_once(
        &self,
        req: &Req<'_>,
        payload_sha256: &str,
    ) -> Result<reqwest::Response, Failure> {
        let (host, path) = self.target(req.key);
        let query = sign::canonical_query(&req.query);
        let now = Utc::now();
        let mut headers = req.headers.clone();
        headers.push(("host".into(), host.clone()));
        headers.push(("x-amz-content-sha256".into(), payload_sha256.to_string()));
        headers.push((
            "x-amz-date".into(),
            now.format("%Y%m%dT%H%M%SZ").to_string(),
        ));
        if let Some(token) = &self.creds.session_token {
            headers.push(("x-amz-security-token".into(), token.clone()));
        }
        let auth = sign::authorization(
            &sign::Request {
                method: req.method.as_str(),
                path: &path,
                query: &query,
                headers: &headers,
                payload_sha256,
            },
            &self.creds,
            &self.region,
            now,
        );
        let mut url = format!("{}://{host}{path}", self.endpoint.scheme());
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        let mut rb = self.http.request(req.method.clone(), &url);
        for (k, v) in &headers {
            if k != "host" {
                rb = rb.header(k.as_str(), v.as_str());
            }
        }
        rb = rb.header("authorization", auth);
        if req.method != Method::GET && req.method != Method::HEAD {
            if !req.idle_only {
                let secs = req.body.len() as u64 / MIN_RATE;
                rb = rb.timeout(self.base_timeout + Duration::from_secs(secs));
            }
            rb = rb.body(req.body.clone());
        }
        let resp = rb.send().await.map_err(|e| Failure::from_reqwest(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let date = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_limited(resp).await;
        Err(Failure::from_answer(status, &body).with_skew(date.as_deref(), now))
    }

    /// Sends `req` up to `attempts` times in all, retrying transient
    /// failures with the `retry:` back-off; with `text`, reading the whole
    /// (small) body is part of each attempt, and a body cut off fails it.
    async fn send_attempts(
        &self,
        req: &Req<'_>,
        attempts: u32,
        text: bool,
    ) -> Result<Answer, Failure> {
        let payload = sign::sha256_hex(&req.body);
        let mut attempt = 1;
        loop {
            let answer = match self.send_once(req, &payload).await {
                Ok(r) if text => r
                    .text()
                    .await
                    .map(Answer::Text)
                    .map_err(|e| Failure::from_reqwest(&e)),
                Ok(r) => Ok(Answer::Response(r)),
                Err(f) => Err(f),
            };
            match answer {
                Ok(a) => return Ok(a),
                Err(f) if f.transient && attempt < attempts => {
                    let delay = self.retry.backoff(attempt, rand::random::<f64>());
                    tracing::warn!(
                        op = req.op,
                        bucket = %self.bucket,
                        key = req.key.unwrap_or(""),
                        attempt,
                        of = attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %f.detail,
                        "S3 request failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(f) => return Err(f),
            }
        }
    }

    /// Sends `req`, retrying transient failures with the `retry:` back-off:
    /// at most `retry.attempts` requests in all.
    ///
    /// # Errors
    /// The last [`Failure`].
    pub async fn send(&self, req: &Req<'_>) -> Result<reqwest::Response, Failure> {
        match self.send_attempts(req, self.retry.attempts, false).await? {
            Answer::Response(r) => Ok(r),
            Answer::Text(_) => unreachable!("asked for the response"),
        }
    }

    /// Sends `req` once, not retried: for a request whose repetition could
    /// do harm or mislead (a conditional create), whose caller finds out
    /// what a failed attempt did before it sends another.
    ///
    /// # Errors
    /// The [`Failure`].
    pub async fn send_once_only(&self, req: &Req<'_>) -> Result<reqwest::Response, Failure> {
        match self.send_attempts(req, 1, false).await? {
            Answer::Response(r) => Ok(r),
            Answer::Text(_) => unreachable!("asked for the response"),
        }
    }

    /// [`Client::send_once_only`], reading the whole (small) body as text.
    ///
    /// # Errors
    /// The [`Failure`]; a body cut off is one.
    pub async fn send_text_once_only(&self, req: &Req<'_>) -> Result<String, Failure> {
        self.text_answer(req, 1).await
    }

    /// Sends `req` and reads its whole (small) body as text; a body cut off
    /// fails the attempt, which counts among the `retry.attempts`.
    ///
    /// # Errors
    /// As [`Client::send`]; a body cut off is transient.
    pub async fn send_text(&self, req: &Req<'_>) -> Result<String, Failure> {
        self.text_answer(req, self.retry.attempts).await
    }

    async fn text_answer(&self, req: &Req<'_>, attempts: u32) -> Result<String, Failure> {
        match self.send_attempts(req, attempts, true).await? {
            Answer::Text(t) => {
                // Listings and upload ids only: nothing secret.
                tracing::trace!(op = req.op, body = %t, "S3 answer");
                Ok(t)
            }
            Answer::Response(_) => unreachable!("asked for the text"),
        }
    }

    /// Like [`Client::send_text`], mapping failures to [`DestinationError`].
    ///
    /// # Errors
    /// The request's failure.
    pub async fn text(&self, req: &Req<'_>) -> Result<String, DestinationError> {
        self.send_text(req)
            .await
            .map_err(|f| self.error(req.op, req.key, f))
    }

    /// A body that is not the XML expected, as an error.
    pub fn bad_xml(&self, op: &'static str, key: Option<&str>, e: xml::BadXml) -> DestinationError {
        DestinationError::S3 {
            op,
            location: self.location(key),
            detail: format!("{e}; is this endpoint an S3-compatible store?"),
            transient: false,
        }
    }
}

async fn read_limited(mut resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(secret_file: &std::path::Path) -> S3Config {
        S3Config {
            endpoint: "http://127.0.0.1:9".parse().unwrap(),
            region: "us-east-1".into(),
            bucket: "backups".into(),
            prefix: Some("etcd".into()),
            path_style: true,
            access_key_id_file: secret_file.with_extension("id"),
            secret_access_key_file: secret_file.to_path_buf(),
            session_token_file: None,
            storage_class: None,
            ca_file: None,
            allow_plaintext_http: true,
            retry: RetryConfig {
                attempts: 2,
                initial_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(1),
            },
        }
    }

    const ERROR: &str = "<Error><Code>CODE</Code><Message>msg</Message></Error>";

    #[test]
    fn throttling_server_errors_and_timeouts_are_transient_refusals_are_not() {
        let answer = |status: u16, code: &str| {
            Failure::from_answer(
                StatusCode::from_u16(status).unwrap(),
                &ERROR.replace("CODE", code),
            )
        };
        for (status, code) in [
            (503, "SlowDown"),
            (500, "InternalError"),
            (429, "TooManyRequests"),
            (400, "RequestTimeout"),
            (502, "whatever"),
        ] {
            assert!(answer(status, code).transient, "{status} {code}");
        }
        for (status, code) in [
            (403, "AccessDenied"),
            (403, "InvalidAccessKeyId"),
            (403, "SignatureDoesNotMatch"),
            (404, "NoSuchBucket"),
            (400, "InvalidRequest"),
        ] {
            let f = answer(status, code);
            assert!(!f.transient, "{status} {code}");
            assert!(f.code_is(code));
        }
        // A HEAD answer has no body: the status alone decides.
        let head = Failure::from_answer(StatusCode::SERVICE_UNAVAILABLE, "");
        assert!(head.transient);
        assert_eq!(head.detail, "HTTP 503 Service Unavailable");
    }

    #[test]
    fn errors_name_operation_bucket_key_and_key_id_never_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cr3t-value-never-shown\n").unwrap();
        std::fs::write(secret.with_extension("id"), "  GKexample \n").unwrap();
        let c = Client::new(&config(&secret)).unwrap();
        assert_eq!(c.key_id(), "GKexample", "trimmed");
        let f = Failure::from_answer(
            StatusCode::FORBIDDEN,
            &ERROR.replace("CODE", "AccessDenied"),
        );
        let e = c.error("cannot store", Some("etcd/c/n/t/f"), f);
        assert!(!e.is_transient());
        let text = e.to_string();
        for part in [
            "cannot store",
            "s3://backups/etcd/c/n/t/f",
            "http://127.0.0.1:9",
            "access key id GKexample",
            "AccessDenied",
            "bucket policy",
        ] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(!format!("{:?}", c.creds).contains("s3cr3t"));
    }

    #[test]
    fn missing_or_empty_credential_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "x").unwrap();
        let err = Client::new(&config(&secret)).err().unwrap().to_string();
        assert!(err.contains("destination.s3.access_key_id_file"), "{err}");
        std::fs::write(secret.with_extension("id"), "GK1").unwrap();
        std::fs::write(&secret, "\n").unwrap();
        let err = Client::new(&config(&secret)).err().unwrap().to_string();
        assert!(
            err.contains("destination.s3.secret_access_key_file"),
            "{err}"
        );
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn path_style_and_virtual_hosted_urls() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "x").unwrap();
        std::fs::write(secret.with_extension("id"), "GK1").unwrap();
        let mut cfg = config(&secret);
        cfg.endpoint = "https://s3.example.com:8443".parse().unwrap();
        let c = Client::new(&cfg).unwrap();
        assert_eq!(
            c.target(Some("etcd/c/n/a b+c")),
            (
                "s3.example.com:8443".to_string(),
                "/backups/etcd/c/n/a%20b%2Bc".to_string()
            )
        );
        assert_eq!(
            c.target(None),
            ("s3.example.com:8443".to_string(), "/backups".to_string())
        );
        cfg.path_style = false;
        cfg.endpoint = "https://s3.example.com".parse().unwrap();
        let c = Client::new(&cfg).unwrap();
        assert_eq!(
            c.target(Some("etcd/x")),
            ("backups.s3.example.com".to_string(), "/etcd/x".to_string())
        );
        assert_eq!(
            c.target(None),
            ("backups.s3.example.com".to_string(), "/".to_string())
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_transient() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "x").unwrap();
        std::fs::write(secret.with_extension("id"), "GK1").unwrap();
        // A loopback port just freed: nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut cfg = config(&secret);
        cfg.endpoint = format!("http://127.0.0.1:{port}").parse().unwrap();
        let c = Client::new(&cfg).unwrap();
        let f = c
            .send(&Req::new("cannot list", Method::GET, None))
            .await
            .unwrap_err();
        assert!(f.transient, "{f:?}");
        assert!(c.error("cannot list", None, f).is_transient());
    }

    use super::super::fake_http::{answer, config as fake_config, count, s3_error, serve, Script};

    fn fake_client(dir: &std::path::Path, url: &str, attempts: u32) -> Client {
        Client::new(&fake_config(dir, url, attempts)).unwrap()
    }

    #[tokio::test]
    async fn a_conditional_request_conflict_409_is_retried() {
        let (url, seen) = serve(|n, _| {
            if n == 0 {
                s3_error("409 Conflict", "ConditionalRequestConflict", &[])
            } else {
                answer("200 OK", &[], "")
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let c = fake_client(dir.path(), &url, 3);
        let req = Req::new("cannot store", Method::PUT, Some("k")).header("if-none-match", "*");
        c.send(&req).await.unwrap();
        assert_eq!(count(&seen, "PUT"), 2);
    }

    #[tokio::test]
    async fn a_skewed_clock_is_refused_once_and_the_error_says_by_how_much_and_to_fix_it() {
        // The store's clock is 20 minutes ahead of this machine's.
        let date = (Utc::now() + chrono::Duration::seconds(1200))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let (url, seen) = serve(move |_, _| {
            s3_error(
                "403 Forbidden",
                "RequestTimeTooSkewed",
                &[&format!("date: {date}")],
            )
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let c = fake_client(dir.path(), &url, 5);
        let f = c
            .send(&Req::new("cannot list", Method::GET, None))
            .await
            .unwrap_err();
        assert_eq!(count(&seen, "GET"), 1, "a skewed clock is not retried");
        assert!(!f.transient);
        let text = c.error("cannot list", None, f).to_string();
        assert!(text.contains("fix this machine's clock"), "{text}");
        let behind = text
            .split(" s behind")
            .next()
            .and_then(|t| t.rsplit(' ').next())
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("no skew in {text}"));
        assert!((1190..=1210).contains(&behind), "{text}");
    }

    #[tokio::test]
    async fn a_failing_request_is_sent_at_most_retry_attempts_times_in_all() {
        // A 500, then a 200 whose body is cut off, over and over: each is
        // one failed attempt.
        let (url, seen) = serve(|n, _| {
            if n % 2 == 0 {
                s3_error("500 Internal Server Error", "InternalError", &[])
            } else {
                Script::Raw(
                    "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 100\r\n\r\n<List"
                        .into(),
                )
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let c = fake_client(dir.path(), &url, 3);
        let f = c
            .send_text(&Req::new("cannot list", Method::GET, None))
            .await
            .unwrap_err();
        assert!(f.transient, "{f:?}");
        assert_eq!(count(&seen, "GET"), 3);
    }

    #[tokio::test]
    async fn a_session_token_is_sent_as_x_amz_security_token_and_signed_never_shown() {
        let (url, seen) = serve(|_, _| answer("200 OK", &[], "")).await;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = fake_config(dir.path(), &url, 1);
        let token = dir.path().join("token");
        std::fs::write(&token, "FQoGZXIvYXdzEXAMPLETOKEN\n").unwrap();
        cfg.session_token_file = Some(token.clone());
        let c = Client::new(&cfg).unwrap();
        c.send(&Req::new("cannot list", Method::GET, None))
            .await
            .unwrap();
        let head = seen.lock().unwrap()[0].to_ascii_lowercase();
        assert!(
            head.contains("x-amz-security-token: fqogzxivyxdzexampletoken\r\n"),
            "{head}"
        );
        let signed = head
            .split("signedheaders=")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or_default();
        assert!(
            signed.split(';').any(|h| h == "x-amz-security-token"),
            "{signed}"
        );
        assert!(!format!("{:?}", c.creds).contains("EXAMPLETOKEN"));
        // An empty token file is refused by name.
        std::fs::write(&token, "\n").unwrap();
        let err = Client::new(&cfg).err().unwrap().to_string();
        assert!(err.contains("destination.s3.session_token_file"), "{err}");
    }

    #[tokio::test]
    async fn a_completion_answering_with_whitespace_for_long_has_an_idle_timeout_not_a_total_one() {
        // 200 at once, then a space every 200 ms for 2 s, then the result:
        // as AWS answers a completion that takes long.
        let trickle = || Script::Trickle {
            head: "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: application/xml\r\n\r\n"
                .into(),
            chunks: std::iter::repeat_n(" ".to_string(), 10)
                .chain(std::iter::once(
                    "<CompleteMultipartUploadResult></CompleteMultipartUploadResult>".into(),
                ))
                .collect(),
            every: Duration::from_millis(200),
        };
        let (url, seen) = serve(move |_, _| trickle()).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = fake_config(dir.path(), &url, 1);
        // A total timeout of 500 ms, an idle one of 1 s.
        let c = Client::with_timeouts(&cfg, Duration::from_millis(500), Duration::from_secs(1))
            .unwrap();
        let complete = || {
            Req::new("cannot complete the upload of", Method::POST, Some("k"))
                .query("uploadId", "u")
                .body("<CompleteMultipartUpload/>")
        };
        let text = c
            .send_text_once_only(&complete().idle_only())
            .await
            .unwrap();
        assert!(text.contains("CompleteMultipartUploadResult"), "{text}");
        // The same answer to a request with a total timeout fails.
        assert!(c.send_text_once_only(&complete()).await.is_err());
        assert_eq!(count(&seen, "POST"), 2);
    }
}
