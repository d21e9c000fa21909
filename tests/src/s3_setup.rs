//! An agent config that backs up to a [`GarageCluster`]: `destination.s3`
//! with the cluster's endpoint, region and bucket, path-style addressing, and
//! the key read from the cluster's 0600 files; and checks of a bucket's sets
//! made with rclone, never with the agent's own S3 client.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use etcd_backup_proto::Manifest;

use crate::agent::AgentConfig;
use crate::etcd::EtcdServer;
use crate::garage::{GarageCluster, Rclone};
use crate::wait_for;

/// The `destination:` YAML for `bucket` on `endpoint` under `prefix`, with
/// the key id and secret read from these files. An `http://` endpoint (the
/// test's Garage on loopback) gets `allow_plaintext_http: true`, which the
/// agent requires for plain HTTP without `encryption:`.
pub fn s3_destination_yaml(
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    access_key_id_file: &Path,
    secret_access_key_file: &Path,
) -> String {
    let plaintext = if endpoint.starts_with("http://") {
        "    allow_plaintext_http: true\n"
    } else {
        ""
    };
    format!(
        "destination:\n  s3:\n    endpoint: \"{endpoint}\"\n    region: {region}\n    bucket: {bucket}\n    prefix: {prefix}\n    path_style: true\n    access_key_id_file: {}\n    secret_access_key_file: {}\n{plaintext}",
        access_key_id_file.display(),
        secret_access_key_file.display(),
        region = crate::garage::REGION,
    )
}

/// [`s3_destination_yaml`] for `cluster`'s endpoint (node 0), bucket and key.
pub fn garage_destination_yaml(cluster: &GarageCluster, prefix: &str) -> String {
    s3_destination_yaml(
        &cluster.endpoint(),
        &cluster.bucket,
        prefix,
        &cluster.access_key_id_file,
        &cluster.secret_access_key_file,
    )
}

/// A config backing up `etcd` (no resources) to `cluster` under `prefix`.
pub fn s3_config(etcd: &EtcdServer, cluster: &GarageCluster, prefix: &str) -> AgentConfig {
    let mut cfg = AgentConfig::new(etcd, &cluster.dir().join("unused-local"));
    cfg.destination_yaml = Some(garage_destination_yaml(cluster, prefix));
    cfg
}

/// `hex(sha256(bytes))`, as manifests write it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The set directories (`<cluster>/<node>/<ts>`) among `objects` (object
/// keys relative to a prefix, as [`Rclone::list`] gives them) that hold a
/// `manifest.json`: the complete sets.
pub fn complete_sets_in(objects: &[String]) -> Vec<String> {
    objects
        .iter()
        .filter_map(|o| o.strip_suffix("/manifest.json").map(str::to_string))
        .collect()
}

/// The stored manifest of set `set` (`<cluster>/<node>/<ts>`) under
/// `prefix`, read by rclone.
pub fn stored_manifest(rclone: &Rclone, bucket: &str, prefix: &str, set: &str) -> Manifest {
    let bytes = rclone.cat(bucket, &format!("{prefix}/{set}/manifest.json"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{set}/manifest.json is no manifest ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// Asserts that every file the manifest `m` of `set` under `prefix` lists
/// is stored with its size and sha256, read back by rclone; returns the
/// stored bytes by name.
pub fn assert_stored_as_manifest_says(
    rclone: &Rclone,
    bucket: &str,
    prefix: &str,
    set: &str,
    m: &Manifest,
) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for f in &m.files {
        let bytes = rclone.cat(bucket, &format!("{prefix}/{set}/{}", f.name));
        assert_eq!(bytes.len() as u64, f.size, "{set}/{}", f.name);
        assert_eq!(sha256_hex(&bytes), f.sha256, "{set}/{}", f.name);
        out.insert(f.name.clone(), bytes);
    }
    out
}

/// Waits (at most 60 s) until `agent` has a multipart upload of the
/// snapshot open in `bucket` (seen by rclone): the upload is under way.
/// Panics with the agent's `log` when it exits first.
pub fn wait_mid_upload(rclone: &Rclone, bucket: &str, agent: &mut Child, log: &Path) {
    wait_for(
        "a multipart upload of the snapshot",
        Duration::from_secs(60),
        || {
            if let Some(status) = agent.try_wait().unwrap() {
                panic!(
                    "the agent exited ({status}) before its upload was seen:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            rclone
                .multipart_uploads(bucket)
                .into_iter()
                .find(|k| k.contains("/snapshot_"))
        },
    );
}
