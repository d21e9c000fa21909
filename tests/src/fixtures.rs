//! `/etc/kubernetes` trees in the shapes the agent bundles, with the archive
//! paths each should produce.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn write(root: &Path, rel: &str, content: &str, mode: u32) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn static_pod_manifest(name: &str, rev: u32) -> String {
    // Shaped like the manifests OpenShift's installer writes: the revision is
    // referenced as a hostPath, after an unnumbered static-pod-resources path.
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: openshift-{name}\n  labels:\n    revision: \"{rev}\"\nspec:\n  volumes:\n  - hostPath:\n      path: /etc/kubernetes/static-pod-resources/{name}-certs\n    name: cert-dir\n  - hostPath:\n      path: /etc/kubernetes/static-pod-resources/{name}-pod-{rev}\n    name: resource-dir\n"
    )
}

/// Builds an OpenShift-shaped tree under `root`: several revisions per static
/// pod, the live manifests pointing at one that is not the highest, an
/// encryption config, cert dirs that must not be taken, and a symlink that
/// points outside the root. Returns the archive paths expected, sorted.
pub fn openshift_tree(root: &Path) -> Vec<String> {
    let live = [
        ("kube-apiserver", 7, [6, 7, 8]),
        ("kube-controller-manager", 5, [4, 5, 6]),
        ("kube-scheduler", 3, [2, 3, 4]),
        ("etcd", 2, [1, 2, 3]),
    ];
    let mut expected = Vec::new();
    for (name, rev, all) in live {
        write(
            root,
            &format!("manifests/{name}-pod.yaml"),
            &static_pod_manifest(name, rev),
            0o600,
        );
        for r in all {
            let dir = format!("static-pod-resources/{name}-pod-{r}");
            write(
                root,
                &format!("{dir}/{name}-pod.yaml"),
                &static_pod_manifest(name, r),
                0o644,
            );
            write(
                root,
                &format!("{dir}/configmaps/config/config.yaml"),
                &format!("rev: {r}\n"),
                0o644,
            );
            write(
                root,
                &format!("{dir}/secrets/serving-cert/tls.key"),
                "KEY",
                0o600,
            );
            if r == rev {
                expected.extend([
                    dir.clone(),
                    format!("{dir}/{name}-pod.yaml"),
                    format!("{dir}/configmaps"),
                    format!("{dir}/configmaps/config"),
                    format!("{dir}/configmaps/config/config.yaml"),
                    format!("{dir}/secrets"),
                    format!("{dir}/secrets/serving-cert"),
                    format!("{dir}/secrets/serving-cert/tls.key"),
                ]);
            }
        }
        write(
            root,
            &format!("static-pod-resources/{name}-certs/secrets/ca.crt"),
            "CA",
            0o644,
        );
    }
    let enc = "static-pod-resources/kube-apiserver-pod-7/secrets/encryption-config";
    write(
        root,
        &format!("{enc}/encryption-config"),
        "kind: EncryptionConfiguration\n",
        0o600,
    );
    expected.extend([enc.to_string(), format!("{enc}/encryption-config")]);
    let link = "static-pod-resources/kube-apiserver-pod-7/outside";
    std::os::unix::fs::symlink("/etc", root.join(link)).unwrap();
    expected.push(link.to_string());
    expected.sort();
    expected
}

/// Builds a kubeadm-shaped tree: manifests (and a non-YAML file beside them),
/// `pki/`, an encryption provider config outside `pki/`, and files that must
/// not be taken. Returns the archive paths expected, sorted.
pub fn kubeadm_tree(root: &Path) -> Vec<String> {
    let apiserver = "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - command:\n    - kube-apiserver\n    - --advertise-address=10.0.0.5\n    - --encryption-provider-config=/etc/kubernetes/enc/encryption.yaml\n    name: kube-apiserver\n";
    write(root, "manifests/kube-apiserver.yaml", apiserver, 0o600);
    for m in ["etcd", "kube-controller-manager", "kube-scheduler"] {
        write(
            root,
            &format!("manifests/{m}.yaml"),
            &format!("name: {m}\n"),
            0o600,
        );
    }
    write(root, "manifests/README.txt", "not a manifest", 0o644);
    write(root, "pki/ca.crt", "CA", 0o644);
    write(root, "pki/ca.key", "CAKEY", 0o600);
    write(root, "pki/etcd/ca.crt", "ETCDCA", 0o644);
    write(root, "pki/etcd/healthcheck-client.key", "HCKEY", 0o600);
    write(
        root,
        "enc/encryption.yaml",
        "kind: EncryptionConfiguration\n",
        0o600,
    );
    write(root, "enc/other.yaml", "not referenced", 0o600);
    write(root, "admin.conf", "kubeconfig", 0o600);
    let mut expected: Vec<String> = [
        "manifests/etcd.yaml",
        "manifests/kube-apiserver.yaml",
        "manifests/kube-controller-manager.yaml",
        "manifests/kube-scheduler.yaml",
        "pki",
        "pki/ca.crt",
        "pki/ca.key",
        "pki/etcd",
        "pki/etcd/ca.crt",
        "pki/etcd/healthcheck-client.key",
        "enc/encryption.yaml",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    expected.sort();
    expected
}

/// One entry of a tarball.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// Path as stored, without a trailing `/`.
    pub path: String,
    /// `'f'`, `'d'` or `'l'`.
    pub kind: char,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds.
    pub mtime: u64,
    /// Link target, for links.
    pub link: Option<String>,
    /// Content, for files.
    pub content: Vec<u8>,
}

/// Reads every entry of a tar.gz file.
pub fn tar_gz_entries(file: &Path) -> Vec<TarEntry> {
    let f = std::fs::File::open(file).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut out = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Regular => 'f',
            other => panic!("unexpected entry type {other:?}"),
        };
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        out.push(TarEntry {
            path,
            kind,
            mode: h.mode().unwrap() & 0o7777,
            mtime: h.mtime().unwrap(),
            link,
            content,
        });
    }
    out
}

/// Adds to an [`openshift_tree`] what a header comparison with GNU tar must
/// cover: an executable (0755), a private directory (0750), a path and a
/// symlink target longer than the 100-byte name field (and both at once),
/// hard links (one to a long name), files
/// owned by `nobody` and by ids no user or group has, and set mtimes.
/// Returns the top-level paths `cluster-backup.sh` would pass to tar, in its
/// order (the live revisions).
pub fn gnu_tar_comparison_tree(root: &Path) -> Vec<String> {
    use std::os::unix::fs::{chown, symlink};
    openshift_tree(root);
    let rev = "static-pod-resources/kube-apiserver-pod-7";
    write(root, &format!("{rev}/bin/run.sh"), "#!/bin/sh\n", 0o755);
    write(root, &format!("{rev}/private/token"), "TOKEN", 0o600);
    std::fs::set_permissions(
        root.join(format!("{rev}/private")),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let long = format!(
        "{rev}/configmaps/{}/{}.yaml",
        "a-rather-long-configmap-name-for-the-test",
        "x".repeat(70)
    );
    assert!(long.len() > 100 && long.len() < 255, "{}", long.len());
    write(root, &long, "long: true\n", 0o644);
    symlink(
        format!("/etc/kubernetes/{}", "t".repeat(120)),
        root.join(format!("{rev}/long-target")),
    )
    .unwrap();
    std::fs::hard_link(
        root.join(format!("{rev}/bin/run.sh")),
        root.join(format!("{rev}/bin/run-again.sh")),
    )
    .unwrap();
    // Both a long name and a long target (GNU tar writes K, then L), and a
    // hard link whose first name is long.
    symlink(
        format!("/etc/kubernetes/{}", "u".repeat(120)),
        root.join(format!("{long}-link")),
    )
    .unwrap();
    let long_dir = std::path::Path::new(&long).parent().unwrap();
    std::fs::hard_link(root.join(&long), root.join(long_dir).join("zz-hard")).unwrap();
    let etcd_rev = "static-pod-resources/etcd-pod-2";
    write(root, &format!("{etcd_rev}/owned/by-nobody"), "n", 0o640);
    chown(
        root.join(format!("{etcd_rev}/owned/by-nobody")),
        Some(65534),
        Some(65534),
    )
    .unwrap();
    write(root, &format!("{etcd_rev}/owned/by-no-name"), "?", 0o644);
    chown(
        root.join(format!("{etcd_rev}/owned/by-no-name")),
        Some(424_242),
        Some(424_243),
    )
    .unwrap();
    // Fixed, distinct mtimes, set last (adding entries changes a directory's).
    let mut all = Vec::new();
    collect(&root.join("static-pod-resources"), &mut all);
    for (i, p) in all.iter().enumerate() {
        let t =
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + i as u64 * 97);
        if !std::fs::symlink_metadata(p)
            .unwrap()
            .file_type()
            .is_symlink()
        {
            std::fs::File::open(p).unwrap().set_modified(t).unwrap();
        }
    }
    [
        "kube-apiserver-pod-7",
        "kube-controller-manager-pod-5",
        "kube-scheduler-pod-3",
        "etcd-pod-2",
    ]
    .iter()
    .map(|d| format!("static-pod-resources/{d}"))
    .collect()
}

/// Every path below `dir`, children before their directory (so setting a
/// child's mtime cannot change its parent's afterwards).
fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            collect(&p, out);
        } else {
            out.push(p);
        }
    }
    out.push(dir.to_path_buf());
}

/// One header of a tarball, every field `tar -tvv` shows and a few more,
/// as raw as the tar crate gives them (long names resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarHeader {
    /// The entry type byte (`0` file, `5` directory, `2` symlink, `1` hard link).
    pub kind: char,
    /// The whole `mode` field, file-type bits included if any were written.
    pub mode: u32,
    /// Numeric owner.
    pub uid: u64,
    /// Numeric group.
    pub gid: u64,
    /// Owner name.
    pub uname: String,
    /// Group name.
    pub gname: String,
    /// The `size` field.
    pub size: u64,
    /// The `mtime` field.
    pub mtime: u64,
    /// The full path, trailing `/` included.
    pub path: String,
    /// The full link target.
    pub link: Option<String>,
    /// The `magic` and `version` fields.
    pub magic: String,
}

/// The headers of a tar.gz, in order.
pub fn tar_gz_headers(file: &Path) -> Vec<TarHeader> {
    let f = std::fs::File::open(file).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            TarHeader {
                kind: char::from(h.entry_type().as_byte()),
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                uname: text(h.username_bytes().unwrap_or_default()),
                gname: text(h.groupname_bytes().unwrap_or_default()),
                size: h.size().unwrap(),
                mtime: h.mtime().unwrap(),
                path: text(&e.path_bytes()),
                link: e.link_name_bytes().map(|l| text(&l)),
                magic: text(&h.as_bytes()[257..265]),
            }
        })
        .collect()
}

/// The uncompressed bytes of a tar.gz.
pub fn gunzip(file: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(file).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}
