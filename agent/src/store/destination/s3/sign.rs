//! AWS Signature Version 4 for S3 requests (header-based, service `s3`).
//!
//! The canonical request is built from exactly what is sent: the method, the
//! URI-encoded path, the sorted query, the headers signed and the payload's
//! SHA-256 (sent as `x-amz-content-sha256`, so the server checks the body
//! against it as well as the signature).

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// An access key. The secret and the session token are never printed:
/// `Debug` leaves them out.
#[derive(Clone)]
pub struct Credentials {
    /// The access key id (not secret; named in error messages).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// The session token of temporary (STS-issued) credentials, sent as
    /// `x-amz-security-token` and signed with the other headers.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of `data`, lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Percent-encodes everything but S3's unreserved characters
/// (`A-Z a-z 0-9 - _ . ~`), and `/` too when `keep_slash`.
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The canonical query string: each name and value URI-encoded, sorted.
/// The same string is sent as the URL's query.
pub fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// What to sign: the request as sent.
pub struct Request<'a> {
    /// `GET`, `PUT`, ...
    pub method: &'a str,
    /// The URI-encoded path, starting with `/`.
    pub path: &'a str,
    /// The canonical query string ([`canonical_query`]).
    pub query: &'a str,
    /// Headers to sign, `host` included, with lowercase names.
    pub headers: &'a [(String, String)],
    /// The payload's SHA-256 in hex (also sent as `x-amz-content-sha256`).
    pub payload_sha256: &'a str,
}

/// The `Authorization` header value for `req`, signed at `now` for `region`.
/// `req.headers` must already hold `x-amz-date` (`now` as
/// `YYYYMMDDTHHMMSSZ`) and `x-amz-content-sha256`.
pub fn authorization(
    req: &Request<'_>,
    creds: &Credentials,
    region: &str,
    now: DateTime<Utc>,
) -> String {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    headers.sort();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let signed = signed.join(";");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method, req.path, req.query, canonical_headers, signed, req.payload_sha256
    );
    let date = now.format("%Y%m%d").to_string();
    let amz_date = now.format("%Y%m%dT%H%M%SZ").to_string();
    let scope = format!("{date}/{region}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    );
    let key = hmac(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    let key = hmac(&key, region.as_bytes());
    let key = hmac(&key, b"s3");
    let key = hmac(&key, b"aws4_request");
    let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
        creds.access_key_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// AWS's published example key pair for the S3 SigV4 examples.
    fn example_creds() -> Credentials {
        Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// "Example: GET Object" of AWS's "Signature Calculations for the
    /// Authorization Header" (Amazon S3 API reference): a range GET of
    /// `/test.txt` on `examplebucket`, 2013-05-24.
    #[test]
    fn get_object_matches_the_aws_example() {
        let empty = sha256_hex(b"");
        assert_eq!(
            empty,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let headers = h(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("range", "bytes=0-9"),
            ("x-amz-content-sha256", &empty),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let auth = authorization(
            &Request {
                method: "GET",
                path: "/test.txt",
                query: "",
                headers: &headers,
                payload_sha256: &empty,
            },
            &example_creds(),
            "us-east-1",
            Utc.with_ymd_and_hms(2013, 5, 24, 0, 0, 0).unwrap(),
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// "Example: GET Bucket (List Objects)" of the same page: a query string,
    /// sorted and encoded.
    #[test]
    fn list_objects_matches_the_aws_example() {
        let empty = sha256_hex(b"");
        let headers = h(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("x-amz-content-sha256", &empty),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let query = canonical_query(&h(&[("prefix", "J"), ("max-keys", "2")]));
        assert_eq!(query, "max-keys=2&prefix=J");
        let auth = authorization(
            &Request {
                method: "GET",
                path: "/",
                query: &query,
                headers: &headers,
                payload_sha256: &empty,
            },
            &example_creds(),
            "us-east-1",
            Utc.with_ymd_and_hms(2013, 5, 24, 0, 0, 0).unwrap(),
        );
        assert!(
            auth.ends_with(
                "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
            ),
            "{auth}"
        );
    }

    #[test]
    fn encoding_keeps_unreserved_characters_and_slashes_only_in_paths() {
        assert_eq!(uri_encode("a/b c+d~e_f.g-h", true), "a/b%20c%2Bd~e_f.g-h");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        assert_eq!(
            canonical_query(&h(&[("uploads", ""), ("prefix", "c/n/")])),
            "prefix=c%2Fn%2F&uploads="
        );
    }

    #[test]
    fn the_secret_is_never_printed() {
        let text = format!("{:?}", example_creds());
        assert!(text.contains("AKIAIOSFODNN7EXAMPLE"), "{text}");
        assert!(!text.contains("EXAMPLEKEY"), "{text}");
    }
}
