//! The S3 destination's file protocol on a real three-node Garage cluster,
//! operation by operation (the whole agent on S3 is tests/tests/s3.rs):
//! `.partial` files are multipart uploads for the final key, invisible as
//! objects until the rename completes them; renames never overwrite; listing
//! shows uploads as `.partial` files; deleting a `.partial` name or dropping
//! an unfinished upload aborts it; the set claim refuses a second writer.
//! Every object and upload is cross-checked with rclone, a separate client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use etcd_backup_agent::config::{Config, Environment};
use etcd_backup_agent::store::destination::{self, Destination, DestinationError, PART_SIZE};
use etcd_backup_tests::garage::{GarageCluster, Rclone};
use etcd_backup_tests::ranges;
use etcd_backup_tests::s3_setup::{garage_destination_yaml, s3_destination_yaml};
use etcd_backup_tests::tls::TlsFiles;

const PREFIX: &str = "dest-test";

fn open(garage: &GarageCluster) -> impl std::future::Future<Output = Box<dyn Destination>> {
    open_with(garage_destination_yaml(garage, PREFIX))
}

fn open_with(destination_yaml: String) -> impl std::future::Future<Output = Box<dyn Destination>> {
    let text = format!(
        "node_name: n\ncluster_name: c\netcd:\n  endpoints: [\"http://127.0.0.1:1\"]\nresources:\n  layout: none\nretry:\n  attempts: 2\n  initial_delay: 100ms\n  max_delay: 200ms\n{destination_yaml}"
    );
    let config = Config::parse(
        &text,
        &Environment {
            node_name: None,
            hostname: Some("h".into()),
        },
    )
    .unwrap_or_else(|e| panic!("config {text}: {e:?}"));
    async move { destination::open(config.destination()).await.unwrap() }
}

/// A TLS-terminating relay on a free loopback port, presenting `tls`'s
/// server certificate (signed by its test CA) and forwarding to `upstream`
/// (`http://host:port`); returns the port.
async fn tls_relay(tls: &TlsFiles, upstream: &str) -> u16 {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{crypto::ring, ServerConfig};

    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.server_cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&tls.server_key).unwrap();
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = upstream.trim_start_matches("http://").to_string();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                // A client refusing the certificate ends the handshake here.
                let Ok(mut client) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    port
}

/// Deterministic bytes that differ from part to part.
fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

async fn write_file(dest: &dyn Destination, path: &str, bytes: &[u8]) -> u64 {
    let mut up = dest.create(path).await.unwrap();
    // Odd chunk sizes, so parts never line up with writes.
    for chunk in bytes.chunks(1_000_003) {
        up.write(chunk).await.unwrap();
    }
    up.finish().await.unwrap()
}

async fn read(dest: &dyn Destination, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    dest.open(path)
        .await
        .unwrap()
        .read_to_end(&mut out)
        .await
        .unwrap();
    out
}

async fn names(dest: &dyn Destination, dir: &str) -> Vec<(String, u64)> {
    dest.list(dir)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.size))
        .collect()
}

fn objects(rclone: &Rclone, bucket: &str) -> Vec<String> {
    rclone.list(bucket, PREFIX)
}

/// Waits (at most 30 s) until no multipart upload is left in the bucket.
fn await_no_uploads(rclone: &Rclone, bucket: &str) {
    let start = Instant::now();
    loop {
        let left = rclone.multipart_uploads(bucket);
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "uploads never aborted: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_files_are_uploads_published_by_the_rename_never_overwriting_and_aborted_when_abandoned(
) {
    let garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let bucket = garage.bucket.clone();
    let dest = open(&garage).await;
    assert!(dest.durability().await.is_ok());

    // A file of two parts and a bit: an upload for the final key, not yet an
    // object, listed as the .partial file.
    let big = data(2 * PART_SIZE + 12_345, 1);
    let size = write_file(dest.as_ref(), "c/n/t/big.partial", &big).await;
    assert_eq!(size, big.len() as u64);
    assert_eq!(
        names(dest.as_ref(), "c/n/t").await,
        [("big.partial".into(), 0)]
    );
    assert_eq!(objects(&rclone, &bucket), Vec::<String>::new());
    assert_eq!(
        rclone.multipart_uploads(&bucket),
        [format!("{PREFIX}/c/n/t/big")]
    );
    assert_eq!(names(dest.as_ref(), "c/n").await, [("t".into(), 0)]);

    dest.rename("c/n/t/big.partial", "c/n/t/big").await.unwrap();
    assert_eq!(
        names(dest.as_ref(), "c/n/t").await,
        [("big".into(), big.len() as u64)]
    );
    assert!(rclone.multipart_uploads(&bucket).is_empty());
    assert!(read(dest.as_ref(), "c/n/t/big").await == big);
    assert!(rclone.cat(&bucket, &format!("{PREFIX}/c/n/t/big")) == big);

    // A small file waits in memory and is put at the rename.
    write_file(dest.as_ref(), "c/n/t/small.partial", b"first").await;
    dest.rename("c/n/t/small.partial", "c/n/t/small")
        .await
        .unwrap();
    assert_eq!(read(dest.as_ref(), "c/n/t/small").await, b"first");

    // Renames never overwrite: a second small file, and a second big one
    // (whose upload is aborted), both refused, the originals untouched.
    write_file(dest.as_ref(), "c/n/t/small.partial", b"second").await;
    assert!(matches!(
        dest.rename("c/n/t/small.partial", "c/n/t/small").await,
        Err(DestinationError::AlreadyExists { .. })
    ));
    write_file(dest.as_ref(), "c/n/t/big.partial", &data(PART_SIZE + 1, 2)).await;
    assert!(matches!(
        dest.rename("c/n/t/big.partial", "c/n/t/big").await,
        Err(DestinationError::AlreadyExists { .. })
    ));
    assert_eq!(read(dest.as_ref(), "c/n/t/small").await, b"first");
    assert!(read(dest.as_ref(), "c/n/t/big").await == big);
    assert!(rclone.multipart_uploads(&bucket).is_empty());

    // Renaming an existing object (prune's manifest.json -> .partial)
    // copies it and deletes the original, refusing an existing target.
    dest.rename("c/n/t/small", "c/n/t/small.partial")
        .await
        .unwrap();
    assert_eq!(read(dest.as_ref(), "c/n/t/small.partial").await, b"first");
    assert_eq!(
        objects(&rclone, &bucket),
        ["c/n/t/big", "c/n/t/small.partial"]
    );
    assert!(matches!(
        dest.rename("c/n/t/small.partial", "c/n/t/big").await,
        Err(DestinationError::AlreadyExists { .. })
    ));

    // Deleting a .partial name removes the object of that name and aborts
    // the uploads for the final key.
    write_file(
        dest.as_ref(),
        "c/n/t/orphan.partial",
        &data(PART_SIZE + 7, 3),
    )
    .await;
    assert_eq!(
        rclone.multipart_uploads(&bucket),
        [format!("{PREFIX}/c/n/t/orphan")]
    );
    dest.delete("c/n/t/orphan.partial").await.unwrap();
    dest.delete("c/n/t/small.partial").await.unwrap();
    assert!(rclone.multipart_uploads(&bucket).is_empty());
    assert_eq!(objects(&rclone, &bucket), ["c/n/t/big"]);

    // An upload dropped unfinished (a cancelled run) is aborted on its own.
    let mut up = dest.create("c/n/t/dropped.partial").await.unwrap();
    up.write(&data(3 * PART_SIZE, 4)).await.unwrap();
    assert!(!rclone.multipart_uploads(&bucket).is_empty());
    drop(up);
    await_no_uploads(&rclone, &bucket);

    // Missing things: deleting is fine, opening is a not-found error.
    dest.delete("c/n/t/nothing").await.unwrap();
    dest.delete("c/n/t/nothing.partial").await.unwrap();
    dest.remove_dir("c/n/t").await.unwrap();
    match dest.open("c/n/t/nothing").await {
        Err(DestinationError::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        Err(e) => panic!("not a not-found error: {e}"),
        Ok(_) => panic!("a missing object opened"),
    }
    dest.delete("c/n/t/big").await.unwrap();
    // Garage (three nodes) may still list the emptied prefix `t` for a
    // moment after its last object went; it is gone within seconds.
    let start = Instant::now();
    loop {
        let left = dest.list("c/n").await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(dest.list("c/n/t").await.unwrap().is_empty());
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still listed: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_set_is_refused_to_a_second_writer_and_its_manifest_completes_the_claim() {
    let garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let bucket = garage.bucket.clone();
    let first = open(&garage).await;
    let second = open(&garage).await;

    first.claim("c/n/t").await.unwrap();
    assert_eq!(
        names(first.as_ref(), "c/n/t").await,
        [("manifest.json.partial".into(), 0)]
    );
    // Another agent (another destination, as another process has) sees the
    // claim and refuses, leaving the first claim alone.
    assert!(matches!(
        second.claim("c/n/t").await,
        Err(DestinationError::AlreadyExists { .. })
    ));
    assert_eq!(
        rclone.multipart_uploads(&bucket),
        [format!("{PREFIX}/c/n/t/manifest.json")]
    );
    // A set with anything in it is refused too.
    write_file(second.as_ref(), "c/n/u/file.partial", b"x").await;
    second
        .rename("c/n/u/file.partial", "c/n/u/file")
        .await
        .unwrap();
    assert!(matches!(
        first.claim("c/n/u").await,
        Err(DestinationError::AlreadyExists { .. })
    ));

    // The claimant's manifest completes the claim's upload: one object, no
    // upload left.
    let manifest = br#"{"format": 1}"#;
    write_file(first.as_ref(), "c/n/t/manifest.json.partial", manifest).await;
    first
        .rename("c/n/t/manifest.json.partial", "c/n/t/manifest.json")
        .await
        .unwrap();
    assert_eq!(read(first.as_ref(), "c/n/t/manifest.json").await, manifest);
    assert!(rclone.multipart_uploads(&bucket).is_empty());
    assert_eq!(
        objects(&rclone, &bucket),
        ["c/n/t/manifest.json", "c/n/u/file"]
    );

    // Claims at the same moment: exactly one is kept, however they
    // interleave, and the other leaves nothing behind.
    for round in 0..10 {
        let dir = format!("c/race/{round}");
        let (a, b) = tokio::join!(first.claim(&dir), second.claim(&dir));
        let kept = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(kept, 1, "round {round}: {a:?} {b:?}");
        for r in [&a, &b] {
            if let Err(e) = r {
                assert!(matches!(e, DestinationError::AlreadyExists { .. }), "{e}");
            }
        }
        assert_eq!(
            rclone.multipart_uploads(&bucket),
            [format!("{PREFIX}/{dir}/manifest.json")]
        );
        let keeper = if a.is_ok() { &first } else { &second };
        keeper
            .delete(&format!("{dir}/manifest.json.partial"))
            .await
            .unwrap();
        assert!(rclone.multipart_uploads(&bucket).is_empty());
    }

    // A claim given up (a failed run's clean-up) leaves nothing.
    first.claim("c/n/v").await.unwrap();
    first.delete("c/n/v/manifest.json.partial").await.unwrap();
    assert!(rclone.multipart_uploads(&bucket).is_empty());
    assert!(first.list("c/n/v").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_works_with_ca_file_and_an_untrusted_certificate_fails_at_once_naming_ca_file() {
    let garage = GarageCluster::start(3);
    let tls = TlsFiles::generate();
    let port = tls_relay(&tls, &garage.endpoint()).await;
    let yaml = |ca_file: Option<&std::path::Path>| {
        let mut y = s3_destination_yaml(
            &format!("https://127.0.0.1:{port}"),
            &garage.bucket,
            PREFIX,
            &garage.access_key_id_file,
            &garage.secret_access_key_file,
        );
        if let Some(ca) = ca_file {
            y.push_str(&format!("    ca_file: {}\n", ca.display()));
        }
        y
    };

    let trusted = open_with(yaml(Some(&tls.ca_cert))).await;
    trusted.durability().await.unwrap();
    let bytes = data(PART_SIZE + 5, 9);
    write_file(trusted.as_ref(), "c/n/t/f.partial", &bytes).await;
    trusted.rename("c/n/t/f.partial", "c/n/t/f").await.unwrap();
    assert!(read(trusted.as_ref(), "c/n/t/f").await == bytes);

    // The system's roots do not know the test CA; nor does another CA.
    let other_ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other_ca.path(), TlsFiles::unrelated_ca_pem()).unwrap();
    for ca in [None, Some(other_ca.path())] {
        let untrusted = open_with(yaml(ca)).await;
        let e = untrusted.durability().await.unwrap_err();
        let text = e.to_string();
        assert!(!e.is_transient(), "{text}");
        assert!(text.contains("certificate"), "{text}");
        assert!(text.contains("destination.s3.ca_file"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_reads_return_exactly_the_bytes_asked_for_across_part_boundaries() {
    let garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let dest = open(&garage).await;
    // Stored as a multipart upload: ranges across its parts' boundaries.
    let data = ranges::pattern(2 * PART_SIZE + 12_345);
    write_file(dest.as_ref(), "packs/p1.partial", &data).await;
    dest.rename("packs/p1.partial", "packs/p1").await.unwrap();
    assert!(rclone.cat(&garage.bucket, &format!("{PREFIX}/packs/p1")) == data);
    let part = PART_SIZE as u64;
    ranges::assert_ranged_reads(dest.as_ref(), "packs/p1", &data, &[part, 2 * part]).await;

    // A small object, put whole.
    let small = ranges::pattern(5000);
    write_file(dest.as_ref(), "packs/p2.partial", &small).await;
    dest.rename("packs/p2.partial", "packs/p2").await.unwrap();
    assert_eq!(
        ranges::read_range(dest.as_ref(), "packs/p2", 4999, 1).await,
        small[4999..]
    );
    assert_eq!(
        ranges::read_range(dest.as_ref(), "packs/p2", 0, 5000).await,
        small
    );
    assert!(matches!(
        dest.open_range("packs/p2", 4000, 1001).await,
        Err(DestinationError::OutOfRange { size: 5000, .. })
    ));
}
