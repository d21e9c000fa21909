//! Where a backup's bytes come from: the node's own [`etcd`] member (its
//! status, and the snapshot stream with its digest check) and the static-pod
//! [`resources`] (which files, and the streamed tar.gz). It may import
//! `config`, `policy`, `encryption`, `error_chain` and the workspace crates;
//! never `store` or anything above it.

pub mod etcd;
pub mod resources;
