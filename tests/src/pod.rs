//! The deployment as the kubelet would run it, without a cluster: the
//! manifests rendered with `kubectl kustomize`, the DaemonSet's objects read
//! back through the Kubernetes API types (unknown fields fail), and a master's
//! file system (its `/etc/kubernetes` tree and etcd certificates) to mount
//! into the agent's container. Shared by the deployment tests
//! (`tests/deploy.rs`) and the image test (`tests/image.rs`).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret, Volume};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fixtures::{kubeadm_tree, openshift_tree};

/// The node the simulated pod runs on.
/// The node the simulated pod runs on.
pub const NODE: &str = "master-0";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn manifests() -> PathBuf {
    repo().join("manifests")
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The absolute path of `tool` on `PATH`; panics with `install` when missing.
pub fn tool(tool: &str, install: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| panic!("`{tool}` is not installed: {install}"))
}

pub fn kubectl() -> PathBuf {
    tool(
        "kubectl",
        "it renders the kustomizations (`kubectl kustomize`, with its built-in kustomize v5). \
         The project's machines have it preinstalled; elsewhere install kubectl 1.27 or newer",
    )
}

/// Runs `cmd`, returning its stdout; panics with everything it said if it fails.
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every YAML document in `text`, as JSON values (empty documents dropped).
pub fn yaml_documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubectl kustomize manifests/<dir>`, as objects.
pub fn render(dir: &str) -> Vec<Value> {
    let path = manifests().join(dir);
    let out = run_ok(
        Command::new(kubectl()).arg("kustomize").arg(&path),
        &format!("kubectl kustomize {}", path.display()),
    );
    let objects = yaml_documents(&out);
    assert!(!objects.is_empty(), "{dir} rendered nothing");
    objects
}

/// The overlays an administrator applies, with the platform each targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    Openshift,
    Kubeadm,
}

pub const OVERLAYS: [(&str, Platform); 2] = [
    ("overlays/openshift", Platform::Openshift),
    ("overlays/kubeadm", Platform::Kubeadm),
];

/// The first place where two JSON values differ, as a path and a description.
pub fn first_difference(input: &Value, typed: &Value, path: &str) -> Option<String> {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    None => {
                        return Some(format!(
                            "{p}: not a field of the API type (dropped when deserialized: misspelt, misplaced or unknown to this API version)"
                        ))
                    }
                    Some(vb) => {
                        if let Some(d) = first_difference(va, vb, &p) {
                            return Some(d);
                        }
                    }
                }
            }
            b.keys()
                .find(|k| !a.contains_key(*k))
                .map(|k| format!("{path}.{k}: added by the API type ({})", b[k]))
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Some(format!("{path}: {} items became {}", a.len(), b.len()));
            }
            a.iter()
                .zip(b)
                .enumerate()
                .find_map(|(i, (x, y))| first_difference(x, y, &format!("{path}[{i}]")))
        }
        (a, b) if a == b => None,
        (a, b) => Some(format!("{path}: {a} became {b}")),
    }
}

/// Deserializes `v` as `T` and serializes it back: the two must be equal, so
/// a field `T` does not know (which serde would silently drop) fails.
pub fn roundtrip<T: DeserializeOwned + Serialize>(v: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match first_difference(v, &back, "") {
        None => Ok(typed),
        Some(d) => Err(d),
    }
}

pub fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

pub fn one<T: DeserializeOwned + Serialize>(objects: &[Value], kind: &str) -> T {
    let found = find(objects, kind);
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    roundtrip(found[0]).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

pub fn daemonset(objects: &[Value]) -> DaemonSet {
    one(objects, "DaemonSet")
}

pub fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod spec")
}

pub fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = pod_spec(ds);
    assert_eq!(spec.containers.len(), 1, "one container, the agent");
    assert!(
        spec.init_containers.as_ref().is_none_or(Vec::is_empty),
        "no init containers"
    );
    &spec.containers[0]
}

pub fn volume<'a>(ds: &'a DaemonSet, name: &str) -> &'a Volume {
    pod_spec(ds)
        .volumes
        .as_ref()
        .and_then(|v| v.iter().find(|v| v.name == name))
        .unwrap_or_else(|| panic!("no volume {name:?}"))
}

/// The agent's config file (`config.yaml` of the ConfigMap the DaemonSet
/// mounts), as text.
pub fn agent_config_text(objects: &[Value]) -> String {
    let ds = daemonset(objects);
    let cm_name = volume(&ds, "config")
        .config_map
        .as_ref()
        .expect("the config volume is a ConfigMap")
        .name
        .clone();
    let cm: ConfigMap = find(objects, "ConfigMap")
        .into_iter()
        .map(|o| roundtrip::<ConfigMap>(o).expect("ConfigMap"))
        .find(|c| c.metadata.name.as_deref() == Some(cm_name.as_str()))
        .unwrap_or_else(|| {
            panic!("the DaemonSet mounts ConfigMap {cm_name}, which is not rendered")
        });
    cm.data
        .and_then(|d| d.get("config.yaml").cloned())
        .expect("the ConfigMap has config.yaml")
}

pub fn yaml(text: &str) -> serde_norway::Value {
    serde_norway::from_str(text).expect("valid YAML")
}

/// The etcd certificate files a platform's masters have, by host path:
/// (CA bundle, client certificate, client key). OpenShift's are the ones
/// cluster-backup.sh uses (cluster-etcd-operator, pkg/etcdenvvar: ETCDCTL_CACERT,
/// ETCDCTL_CERT and ETCDCTL_KEY, with static-pod-certs read as
/// static-pod-resources/etcd-certs on the host); kubeadm's are its etcd CA and
/// health-check client.
pub fn platform_cert_paths(platform: Platform, node: &str) -> [String; 3] {
    match platform {
        Platform::Openshift => {
            let d = "/etc/kubernetes/static-pod-resources/etcd-certs";
            [
                format!("{d}/configmaps/etcd-all-bundles/server-ca-bundle.crt"),
                format!("{d}/secrets/etcd-all-certs/etcd-peer-{node}.crt"),
                format!("{d}/secrets/etcd-all-certs/etcd-peer-{node}.key"),
            ]
        }
        Platform::Kubeadm => [
            "/etc/kubernetes/pki/etcd/ca.crt".into(),
            "/etc/kubernetes/pki/etcd/healthcheck-client.crt".into(),
            "/etc/kubernetes/pki/etcd/healthcheck-client.key".into(),
        ],
    }
}

pub fn write_file(path: &Path, content: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A master's file system under `host`: the platform's /etc/kubernetes tree
/// (static pods and their revisions) and its etcd certificates, with `pems`
/// (CA, certificate, key) for this node. Other masters' certificates are
/// there too, as on a real OpenShift master, holding garbage. Returns the
/// paths the resources tarball should hold, sorted.
pub fn fake_master(host: &Path, platform: Platform, pems: [&[u8]; 3]) -> Vec<String> {
    let k8s = host.join("etc/kubernetes");
    let mut expected = match platform {
        Platform::Openshift => openshift_tree(&k8s),
        Platform::Kubeadm => kubeadm_tree(&k8s),
    };
    for (path, pem) in platform_cert_paths(platform, NODE).iter().zip(pems) {
        write_file(&host.join(path.trim_start_matches('/')), pem, 0o600);
    }
    match platform {
        Platform::Openshift => {
            for path in &platform_cert_paths(platform, "master-1")[1..] {
                write_file(
                    &host.join(path.trim_start_matches('/')),
                    b"not this node's",
                    0o600,
                );
            }
        }
        // All of pki/ goes into the kubeadm tarball, the client certificate too.
        Platform::Kubeadm => expected.push("pki/etcd/healthcheck-client.crt".into()),
    }
    expected.sort();
    expected
}

/// `$(VAR)` expanded from the container's environment, as the kubelet does for
/// subPathExpr; NODE_NAME's fieldRef spec.nodeName is [`NODE`].
pub fn expand(text: &str, c: &Container) -> String {
    let mut out = text.to_string();
    for e in c.env.as_deref().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("spec.nodeName") => NODE.to_string(),
                other => panic!("fieldRef {other:?} is not simulated"),
            },
            (None, None) => String::new(),
        };
        out = out.replace(&format!("$({})", e.name), &value);
    }
    assert!(!out.contains("$("), "unexpanded variable in {text:?}");
    out
}

/// The example Secret, its placeholders replaced by `files` (key -> content).
pub fn sftp_secret(files: &[(&str, String)]) -> Secret {
    let example = yaml_documents(&read(&manifests().join("base/sftp-secret.example.yaml")));
    let mut secret: Secret = roundtrip(&example[0]).unwrap();
    let keys: BTreeSet<String> = secret
        .string_data
        .clone()
        .unwrap_or_default()
        .into_keys()
        .collect();
    let given: BTreeSet<String> = files.iter().map(|(k, _)| k.to_string()).collect();
    assert_eq!(keys, given, "the example Secret's keys");
    secret.string_data = Some(
        files
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    );
    secret
}

/// What the kubelet mounts at one of the agent container's volumeMounts.
#[derive(Debug, Clone)]
pub struct PodMount {
    /// The volumeMount's mountPath.
    pub mount_path: String,
    /// The file or directory mounted there: a hostPath under the fake host,
    /// or the volume's contents written out under the volumes directory.
    pub source: PathBuf,
    /// Read-only in the container: as the volumeMount says for hostPath and
    /// emptyDir; always for ConfigMaps and Secrets, as the kubelet mounts them.
    pub read_only: bool,
    /// An emptyDir: a fresh directory (`memory`: a tmpfs).
    pub empty_dir: Option<EmptyDirMedium>,
}

/// Where an emptyDir lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyDirMedium {
    /// The node's disk (no medium set).
    Disk,
    /// `medium: Memory`, a tmpfs.
    Memory,
}

/// The agent container's volumeMounts as the kubelet would resolve them, parents
/// before children: each hostPath under `host`, each ConfigMap's and Secret's
/// keys written out under `volumes_dir` (the Secret's with its `defaultMode`),
/// each emptyDir a new directory there, with subPath and subPathExpr applied.
/// Panics if a mount's source does not exist (for a hostPath subPath the
/// kubelet would create an empty directory instead).
pub fn pod_mounts(
    host: &Path,
    volumes_dir: &Path,
    objects: &[Value],
    ds: &DaemonSet,
    secret: &Secret,
) -> Vec<PodMount> {
    let c = agent_container(ds);
    let mut mounts = c.volume_mounts.clone().unwrap_or_default();
    mounts.sort_by_key(|m| m.mount_path.len());
    let mut out = Vec::new();
    for m in &mounts {
        let v = volume(ds, &m.name);
        let mut read_only = m.read_only.unwrap_or(false);
        let mut empty_dir = None;
        let source_dir = if let Some(hp) = &v.host_path {
            let p = host.join(hp.path.trim_start_matches('/'));
            if hp.type_.as_deref() == Some("Directory") {
                assert!(p.is_dir(), "hostPath {} must be a directory", hp.path);
            }
            p
        } else if let Some(cm) = &v.config_map {
            let cm: ConfigMap = find(objects, "ConfigMap")
                .into_iter()
                .map(|o| roundtrip::<ConfigMap>(o).unwrap())
                .find(|c| c.metadata.name.as_deref() == Some(cm.name.as_str()))
                .unwrap_or_else(|| panic!("ConfigMap {} is not rendered", cm.name));
            let dir = volumes_dir.join(&m.name);
            for (k, text) in cm.data.unwrap_or_default() {
                write_file(&dir.join(k), text.as_bytes(), 0o644);
            }
            read_only = true;
            dir
        } else if let Some(s) = &v.secret {
            assert_eq!(s.secret_name.as_deref(), secret.metadata.name.as_deref());
            let mode = u32::try_from(s.default_mode.unwrap_or(0o644)).unwrap();
            let dir = volumes_dir.join(&m.name);
            for (k, text) in secret.string_data.clone().unwrap_or_default() {
                write_file(&dir.join(k), text.as_bytes(), mode);
            }
            for (k, bytes) in secret.data.clone().unwrap_or_default() {
                write_file(&dir.join(k), &bytes.0, mode);
            }
            read_only = true;
            dir
        } else if let Some(e) = &v.empty_dir {
            empty_dir = Some(match e.medium.as_deref() {
                Some("Memory") => EmptyDirMedium::Memory,
                None | Some("") => EmptyDirMedium::Disk,
                Some(other) => panic!("emptyDir medium {other:?} is not simulated"),
            });
            let dir = volumes_dir.join(&m.name);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        } else {
            panic!("volume {} is of a kind this test does not simulate", v.name);
        };
        let sub = match (&m.sub_path, &m.sub_path_expr) {
            (Some(s), None) => Some(s.clone()),
            (None, Some(e)) => Some(expand(e, c)),
            (None, None) => None,
            (Some(_), Some(_)) => panic!("{}: subPath and subPathExpr", m.mount_path),
        };
        let source = match sub {
            Some(s) => source_dir.join(s),
            None => source_dir,
        };
        assert!(
            source.exists(),
            "the mount at {} has no source: {} does not exist on the node",
            m.mount_path,
            source.display()
        );
        out.push(PodMount {
            mount_path: m.mount_path.clone(),
            source,
            read_only,
            empty_dir,
        });
    }
    out
}

/// A master for a real backup, under `host`: the platform's tree with `tls`'s
/// CA and client certificate as its etcd certificates, and the SFTP Secret
/// holding `key` and `sshd`'s host key. Returns the paths the resources
/// tarball should hold (as [`fake_master`]) and the Secret.
pub fn real_master(
    host: &Path,
    platform: Platform,
    tls: &crate::tls::TlsFiles,
    key: &crate::sshd::ClientKey,
    sshd: &crate::sshd::SshServer,
) -> (Vec<String>, Secret) {
    let pem = |p: &Path| std::fs::read(p).unwrap();
    let expected = fake_master(
        host,
        platform,
        [
            &pem(&tls.ca_cert),
            &pem(&tls.client_cert),
            &pem(&tls.client_key),
        ],
    );
    let secret = sftp_secret(&[
        ("id_ed25519", read(&key.private_key)),
        ("known_hosts", format!("{}\n", sshd.known_hosts_line())),
    ]);
    (expected, secret)
}

/// Changes in an overlay's config only what differs from a real master: where
/// etcd and the SFTP server listen, who logs in, and the base directory (on
/// `sshd`, `backups/`, returned).
pub fn point_at_test_servers(
    config: &mut serde_norway::Value,
    etcd_url: &str,
    sshd: &crate::sshd::SshServer,
) -> PathBuf {
    config["etcd"]["endpoints"] = serde_norway::to_value([etcd_url]).unwrap();
    let sftp = &mut config["destination"]["sftp"];
    sftp["host"] = "127.0.0.1".into();
    sftp["port"] = sshd.port.into();
    sftp["user"] = crate::sshd::SshServer::key_user().into();
    let base = sshd.sftp_root.join("backups");
    sftp["path"] = base.to_str().unwrap().into();
    base
}
