//! The few S3 XML response bodies the agent reads.

use std::time::SystemTime;

use roxmltree::{Document, Node};

/// A body that is not the XML expected.
#[derive(Debug, thiserror::Error)]
#[error("unexpected response body: {0}")]
pub struct BadXml(pub String);

fn parse(text: &str) -> Result<Document<'_>, BadXml> {
    Document::parse(text).map_err(|e| BadXml(e.to_string()))
}

fn children<'a, 'i>(node: Node<'a, 'i>, name: &'static str) -> impl Iterator<Item = Node<'a, 'i>> {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn child_text(node: Node<'_, '_>, name: &'static str) -> Option<String> {
    children(node, name)
        .next()
        .map(|c| c.text().unwrap_or("").to_string())
}

fn required(node: Node<'_, '_>, name: &'static str) -> Result<String, BadXml> {
    child_text(node, name)
        .ok_or_else(|| BadXml(format!("<{}> has no <{name}>", node.tag_name().name())))
}

fn root<'a, 'i>(doc: &'a Document<'i>, name: &'static str) -> Result<Node<'a, 'i>, BadXml> {
    let r = doc.root_element();
    if r.tag_name().name() == name {
        Ok(r)
    } else {
        Err(BadXml(format!(
            "expected <{name}>, got <{}>",
            r.tag_name().name()
        )))
    }
}

fn truncated(node: Node<'_, '_>) -> bool {
    child_text(node, "IsTruncated").is_some_and(|t| t.trim() == "true")
}

fn time(s: &str) -> Result<SystemTime, BadXml> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(SystemTime::from)
        .map_err(|e| BadXml(format!("bad time {s:?}: {e}")))
}

fn number(s: &str) -> Result<u64, BadXml> {
    s.trim()
        .parse()
        .map_err(|_| BadXml(format!("bad number {s:?}")))
}

/// An S3 `<Error>` body: its code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Error {
    /// E.g. `AccessDenied`, `NoSuchBucket`, `SlowDown`.
    pub code: String,
    /// The server's explanation.
    pub message: String,
}

/// The `<Error>` in `text`, when it is one (some operations answer 200 with
/// an error body: CompleteMultipartUpload and CopyObject).
pub fn error(text: &str) -> Option<S3Error> {
    let doc = Document::parse(text).ok()?;
    let r = root(&doc, "Error").ok()?;
    Some(S3Error {
        code: text_of(r, "Code"),
        message: text_of(r, "Message"),
    })
}

fn text_of(node: Node<'_, '_>, name: &'static str) -> String {
    child_text(node, name).unwrap_or_default()
}

/// An object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// The full key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written.
    pub last_modified: Option<SystemTime>,
}

/// One page of ListObjectsV2.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ObjectPage {
    /// Objects directly below the prefix.
    pub objects: Vec<Object>,
    /// Common prefixes (with their trailing delimiter).
    pub prefixes: Vec<String>,
    /// The token for the next page, when truncated.
    pub next: Option<String>,
}

/// Parses a `ListBucketResult` (ListObjectsV2).
pub fn list_objects(text: &str) -> Result<ObjectPage, BadXml> {
    let doc = parse(text)?;
    let r = root(&doc, "ListBucketResult")?;
    let mut page = ObjectPage::default();
    for c in children(r, "Contents") {
        page.objects.push(Object {
            key: required(c, "Key")?,
            size: number(&required(c, "Size")?)?,
            last_modified: child_text(c, "LastModified")
                .map(|t| time(&t))
                .transpose()?,
        });
    }
    page.prefixes = common_prefixes(r)?;
    if truncated(r) {
        page.next = Some(required(r, "NextContinuationToken")?);
    }
    Ok(page)
}

fn common_prefixes(r: Node<'_, '_>) -> Result<Vec<String>, BadXml> {
    children(r, "CommonPrefixes")
        .map(|c| required(c, "Prefix"))
        .collect()
}

/// An in-progress multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The key it will create.
    pub key: String,
    /// Its id.
    pub upload_id: String,
    /// When it was started.
    pub initiated: Option<SystemTime>,
}

/// One page of ListMultipartUploads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UploadPage {
    /// Uploads directly below the prefix.
    pub uploads: Vec<Upload>,
    /// Common prefixes (with their trailing delimiter).
    pub prefixes: Vec<String>,
    /// `(key-marker, upload-id-marker)` of the next page, when truncated.
    pub next: Option<(String, String)>,
}

/// Parses a `ListMultipartUploadsResult`.
pub fn list_uploads(text: &str) -> Result<UploadPage, BadXml> {
    let doc = parse(text)?;
    let r = root(&doc, "ListMultipartUploadsResult")?;
    let mut page = UploadPage::default();
    for u in children(r, "Upload") {
        page.uploads.push(Upload {
            key: required(u, "Key")?,
            upload_id: required(u, "UploadId")?,
            initiated: child_text(u, "Initiated").map(|t| time(&t)).transpose()?,
        });
    }
    page.prefixes = common_prefixes(r)?;
    if truncated(r) {
        page.next = Some((
            required(r, "NextKeyMarker")?,
            text_of(r, "NextUploadIdMarker"),
        ));
    }
    Ok(page)
}

/// The `UploadId` of an `InitiateMultipartUploadResult`.
pub fn upload_id(text: &str) -> Result<String, BadXml> {
    let doc = parse(text)?;
    required(root(&doc, "InitiateMultipartUploadResult")?, "UploadId")
}

/// One page of ListParts: each part's size, when the newest of them was
/// uploaded, and the next part-number marker when truncated.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartPage {
    /// `(part number, size)` of each part.
    pub parts: Vec<(u32, u64)>,
    /// The latest `LastModified` of the page's parts: how recently the
    /// upload was written to (its `Initiated` says only when it began).
    pub newest: Option<SystemTime>,
    /// The marker of the next page, when truncated.
    pub next: Option<String>,
}

/// Parses a `ListPartsResult`.
pub fn list_parts(text: &str) -> Result<PartPage, BadXml> {
    let doc = parse(text)?;
    let r = root(&doc, "ListPartsResult")?;
    let mut page = PartPage::default();
    for p in children(r, "Part") {
        let n = number(&required(p, "PartNumber")?)?;
        page.parts.push((
            u32::try_from(n).map_err(|_| BadXml(format!("bad part number {n}")))?,
            number(&required(p, "Size")?)?,
        ));
        let modified = child_text(p, "LastModified")
            .map(|t| time(&t))
            .transpose()?;
        page.newest = page.newest.max(modified);
    }
    if truncated(r) {
        page.next = Some(required(r, "NextPartNumberMarker")?);
    }
    Ok(page)
}

/// Checks that a 200 answer of CompleteMultipartUpload or CopyObject is the
/// result, not an error.
///
/// # Errors
/// The error the body holds, or [`BadXml`] for anything else unexpected.
pub fn expect_root(text: &str, name: &'static str) -> Result<Result<(), S3Error>, BadXml> {
    if let Some(e) = error(text) {
        return Ok(Err(e));
    }
    let doc = parse(text)?;
    root(&doc, name).map(|_| Ok(()))
}

/// The body of a CompleteMultipartUpload request.
pub fn complete_body(parts: &[(u32, String)]) -> String {
    let mut s = String::from("<CompleteMultipartUpload>");
    for (n, etag) in parts {
        s.push_str(&format!(
            "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag></Part>",
            escape(etag)
        ));
    }
    s.push_str("</CompleteMultipartUpload>");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bodies in the shape of AWS's documented examples (namespace,
    // pretty-printing, fields the agent ignores), trimmed to a few entries.
    const OBJECTS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>backups</Name>
  <Prefix>p/c/n/</Prefix>
  <Delimiter>/</Delimiter>
  <KeyCount>3</KeyCount>
  <MaxKeys>1000</MaxKeys>
  <IsTruncated>true</IsTruncated>
  <NextContinuationToken>Cm5leHQ=</NextContinuationToken>
  <Contents>
    <Key>p/c/n/notes.txt</Key>
    <LastModified>2026-12-06T21:00:01.123Z</LastModified>
    <ETag>&quot;5d41402abc4b2a76b9719d911017c592&quot;</ETag>
    <Size>5</Size>
    <StorageClass>STANDARD</StorageClass>
  </Contents>
  <CommonPrefixes><Prefix>p/c/n/2026-12-06_210000/</Prefix></CommonPrefixes>
  <CommonPrefixes><Prefix>p/c/n/2026-12-06_220000/</Prefix></CommonPrefixes>
</ListBucketResult>"#;

    #[test]
    fn an_object_listing_gives_objects_prefixes_and_the_next_token() {
        let page = list_objects(OBJECTS).unwrap();
        assert_eq!(page.objects.len(), 1);
        assert_eq!(page.objects[0].key, "p/c/n/notes.txt");
        assert_eq!(page.objects[0].size, 5);
        let t = page.objects[0].last_modified.unwrap();
        let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(secs, 1_796_590_801_123);
        assert_eq!(
            page.prefixes,
            ["p/c/n/2026-12-06_210000/", "p/c/n/2026-12-06_220000/"]
        );
        assert_eq!(page.next.as_deref(), Some("Cm5leHQ="));
        let last = OBJECTS.replace("<IsTruncated>true", "<IsTruncated>false");
        assert_eq!(list_objects(&last).unwrap().next, None);
    }

    #[test]
    fn an_upload_listing_gives_keys_ids_and_markers() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>backups</Bucket>
  <KeyMarker></KeyMarker>
  <UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>p/c/n/t/snapshot.db</NextKeyMarker>
  <NextUploadIdMarker>0a1b</NextUploadIdMarker>
  <Delimiter>/</Delimiter>
  <Prefix>p/c/n/t/</Prefix>
  <MaxUploads>1000</MaxUploads>
  <IsTruncated>true</IsTruncated>
  <Upload>
    <Key>p/c/n/t/snapshot.db</Key>
    <UploadId>0a1b</UploadId>
    <Initiator><ID>GK31c2f2</ID><DisplayName>GK31c2f2</DisplayName></Initiator>
    <Owner><ID>GK31c2f2</ID><DisplayName>GK31c2f2</DisplayName></Owner>
    <StorageClass>STANDARD</StorageClass>
    <Initiated>2026-12-06T21:00:00Z</Initiated>
  </Upload>
  <CommonPrefixes><Prefix>p/c/n/t/sub/</Prefix></CommonPrefixes>
</ListMultipartUploadsResult>"#;
        let page = list_uploads(body).unwrap();
        assert_eq!(page.uploads.len(), 1);
        assert_eq!(page.uploads[0].key, "p/c/n/t/snapshot.db");
        assert_eq!(page.uploads[0].upload_id, "0a1b");
        assert!(page.uploads[0].initiated.is_some());
        assert_eq!(page.prefixes, ["p/c/n/t/sub/"]);
        assert_eq!(
            page.next,
            Some(("p/c/n/t/snapshot.db".to_string(), "0a1b".to_string()))
        );
    }

    #[test]
    fn create_parts_and_errors() {
        let created = r#"<?xml version="1.0" encoding="UTF-8"?>
<InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket><Key>k</Key><UploadId>abc123</UploadId></InitiateMultipartUploadResult>"#;
        assert_eq!(upload_id(created).unwrap(), "abc123");

        let parts = r#"<ListPartsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Bucket>b</Bucket><Key>k</Key><UploadId>abc123</UploadId>
<PartNumberMarker>0</PartNumberMarker><NextPartNumberMarker>2</NextPartNumberMarker>
<MaxParts>1000</MaxParts><IsTruncated>false</IsTruncated>
<Part><PartNumber>1</PartNumber><LastModified>2026-12-06T21:00:00.000Z</LastModified><ETag>"e1"</ETag><Size>8388608</Size></Part>
<Part><PartNumber>2</PartNumber><LastModified>2026-12-06T21:00:01.000Z</LastModified><ETag>"e2"</ETag><Size>17</Size></Part>
</ListPartsResult>"#;
        let page = list_parts(parts).unwrap();
        assert_eq!(page.parts, [(1, 8_388_608), (2, 17)]);
        assert_eq!(
            page.newest,
            Some(time("2026-12-06T21:00:01.000Z").unwrap()),
            "the newest part, not the first"
        );
        assert_eq!(page.next, None);

        let denied = r#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>AccessDenied</Code><Message>Forbidden: No such key: GK00</Message><Resource>/b</Resource><Region>garage</Region></Error>"#;
        assert_eq!(
            error(denied),
            Some(S3Error {
                code: "AccessDenied".into(),
                message: "Forbidden: No such key: GK00".into()
            })
        );
        assert_eq!(
            expect_root(denied, "CompleteMultipartUploadResult").unwrap(),
            Err(error(denied).unwrap())
        );
        let done = "<CompleteMultipartUploadResult><Key>k</Key><ETag>\"x-2\"</ETag></CompleteMultipartUploadResult>";
        assert_eq!(
            expect_root(done, "CompleteMultipartUploadResult").unwrap(),
            Ok(())
        );
        assert!(expect_root("<Other/>", "CompleteMultipartUploadResult").is_err());
        assert!(list_objects("not xml").is_err());
        assert!(error("").is_none());
    }

    #[test]
    fn the_complete_body_lists_parts_with_escaped_etags() {
        assert_eq!(
            complete_body(&[(1, "\"a\"".into()), (2, "b".into())]),
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&quot;a&quot;</ETag></Part>\
             <Part><PartNumber>2</PartNumber><ETag>b</ETag></Part></CompleteMultipartUpload>"
        );
    }

    /// Answers Garage 2.5.0 gave the agent's own requests (logged at `trace`
    /// during a backup), in `recorded/`.
    mod garage {
        use super::super::*;

        fn rec(name: &str) -> String {
            let path = format!(
                "{}/src/store/destination/s3/recorded/{name}",
                env!("CARGO_MANIFEST_DIR")
            );
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        }

        #[test]
        fn listings() {
            let files = list_objects(&rec("list_objects_files.xml")).unwrap();
            let keys: Vec<(&str, u64)> = files
                .objects
                .iter()
                .map(|o| (o.key.as_str(), o.size))
                .collect();
            assert_eq!(
                keys,
                [
                    ("etcd/prod/c1/m1/2026-12-06_211600/manifest.json", 812),
                    (
                        "etcd/prod/c1/m1/2026-12-06_211600/snapshot_2026-12-06_211600.db",
                        25_722_912
                    ),
                ]
            );
            assert!(files.objects.iter().all(|o| o.last_modified.is_some()));
            assert!(files.prefixes.is_empty() && files.next.is_none());

            let dirs = list_objects(&rec("list_objects_dirs.xml")).unwrap();
            assert!(dirs.objects.is_empty());
            assert_eq!(dirs.prefixes.len(), 12);
            assert_eq!(dirs.prefixes[0], "etcd/prod/c1/m1/2026-12-06_211600/");

            let truncated = list_objects(&rec("list_objects_truncated.xml")).unwrap();
            assert_eq!(truncated.objects.len(), 1);
            assert!(truncated.next.is_some_and(|t| !t.is_empty()));

            let claim = list_uploads(&rec("list_uploads_claim.xml")).unwrap();
            assert_eq!(claim.uploads.len(), 1);
            assert_eq!(
                claim.uploads[0].key,
                "etcd/prod/c1/m1/2026-12-06_213158/manifest.json"
            );
            assert_eq!(claim.uploads[0].upload_id.len(), 64);
            assert!(claim.uploads[0].initiated.is_some());
            assert!(claim.next.is_none());

            let dirs = list_uploads(&rec("list_uploads_dirs.xml")).unwrap();
            assert!(dirs.uploads.is_empty());
            assert_eq!(dirs.prefixes, ["etcd/prod/c1/m1/2026-12-06_213032/"]);
        }

        #[test]
        fn uploads_and_errors() {
            assert_eq!(upload_id(&rec("initiate.xml")).unwrap().len(), 64);
            let parts = list_parts(&rec("list_parts.xml")).unwrap();
            assert_eq!(
                parts.parts,
                [(1, 8_388_608), (2, 8_388_608), (3, 8_388_608), (4, 557_088)]
            );
            assert_eq!(parts.parts.iter().map(|(_, s)| s).sum::<u64>(), 25_722_912);
            // Garage says when each part came, so a live upload can be aged
            // by its newest part.
            assert_eq!(
                parts.newest,
                Some(time("2026-12-06T21:31:59.962Z").unwrap())
            );
            assert_eq!(
                expect_root(&rec("complete.xml"), "CompleteMultipartUploadResult").unwrap(),
                Ok(())
            );
            let e = error(&rec("error_invalid_signature.xml")).unwrap();
            assert_eq!(e.code, "AccessDenied");
            assert_eq!(e.message, "Forbidden: Invalid signature");
        }
    }
}
