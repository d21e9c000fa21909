//! An agent config that backs up to a [`GarageCluster`]: `destination.s3`
//! with the cluster's endpoint, region and bucket, path-style addressing, and
//! the key read from the cluster's 0600 files.

use std::path::Path;

use crate::agent::AgentConfig;
use crate::etcd::EtcdServer;
use crate::garage::GarageCluster;

/// The `destination:` YAML for `bucket` on `endpoint` under `prefix`, with
/// the key id and secret read from these files.
pub fn s3_destination_yaml(
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    access_key_id_file: &Path,
    secret_access_key_file: &Path,
) -> String {
    format!(
        "destination:\n  s3:\n    endpoint: \"{endpoint}\"\n    region: {region}\n    bucket: {bucket}\n    prefix: {prefix}\n    path_style: true\n    access_key_id_file: {}\n    secret_access_key_file: {}\n",
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
