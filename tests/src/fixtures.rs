//! `/etc/kubernetes` trees in the shapes the agent bundles, with the archive
//! paths each should produce.

use std::io::Read;
use std::path::Path;

fn write(root: &Path, rel: &str, content: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
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
