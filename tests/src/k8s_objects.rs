//! Kubernetes-like objects the way the API server stores them in etcd, for
//! measuring compression on realistic data (`etcd-fill --kind k8s`), and the
//! updates a busy control plane makes to them (`etcd-churn`:
//! [`pod_status_update`], [`lease_renewal`]).
//!
//! Each value is the API server's protobuf storage form: the magic `k8s\0`,
//! then a `runtime.Unknown` (`typeMeta{apiVersion, kind}`, `raw` holding the
//! object's own protobuf, empty `contentEncoding` and `contentType`). The
//! objects are hand-encoded with plausible field numbers and shapes, not the
//! generated `k8s.io/api` types: what matters here is the redundancy a real
//! keyspace has, not byte-exact compatibility.
//!
//! The mix, by count: pods 20 % (labels, owner references, managedFields with
//! `fieldsV1` JSON blobs, one to three containers with env, resources and
//! mounts, status with conditions and container statuses), events 40 %,
//! configmaps 15 % (configuration text, and CA bundles repeated across
//! namespaces as OpenShift injects them), secrets 20 % (random bytes:
//! incompressible, as key material or secrets encrypted at rest are), leases
//! 5 %. Names, namespaces, images and nodes come from small vocabularies;
//! UIDs, IPs, hashes and secret bytes are random.

use std::fmt::Write as _;

/// The prefix of every value the API server stores as protobuf.
pub const MAGIC: &[u8; 4] = b"k8s\0";

/// What kind of object a value is (also its key's resource name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `/kubernetes.io/pods/<ns>/<name>`, `v1 Pod`.
    Pod,
    /// `/kubernetes.io/events/<ns>/<name>`, `v1 Event`.
    Event,
    /// `/kubernetes.io/configmaps/<ns>/<name>`, `v1 ConfigMap`.
    ConfigMap,
    /// `/kubernetes.io/secrets/<ns>/<name>`, `v1 Secret`.
    Secret,
    /// `/kubernetes.io/leases/<ns>/<name>`, `coordination.k8s.io/v1 Lease`.
    Lease,
}

impl Kind {
    /// Every kind, in the order [`Kind::index`] numbers them.
    pub const ALL: [Kind; 5] = [
        Kind::Pod,
        Kind::Event,
        Kind::ConfigMap,
        Kind::Secret,
        Kind::Lease,
    ];

    /// The resource name in the etcd key.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Event => "events",
            Kind::ConfigMap => "configmaps",
            Kind::Secret => "secrets",
            Kind::Lease => "leases",
        }
    }

    /// The position in [`Kind::ALL`].
    pub fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }

    fn type_meta(self) -> (&'static str, &'static str) {
        match self {
            Kind::Pod => ("v1", "Pod"),
            Kind::Event => ("v1", "Event"),
            Kind::ConfigMap => ("v1", "ConfigMap"),
            Kind::Secret => ("v1", "Secret"),
            Kind::Lease => ("coordination.k8s.io/v1", "Lease"),
        }
    }
}

/// One object as etcd holds it.
#[derive(Clone, Debug)]
pub struct Object {
    /// Its kind.
    pub kind: Kind,
    /// `/kubernetes.io/<resource>/<namespace>/<name>`.
    pub key: String,
    /// `k8s\0` + `runtime.Unknown`.
    pub value: Vec<u8>,
}

/// xorshift64*: deterministic, fast, good enough for filler (also
/// `etcd-fill`'s random values). The seed must not be zero.
pub struct Rng(pub u64);

impl Rng {
    /// The next pseudo-random number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }

    fn hex(&mut self, n: usize) -> String {
        let mut s = String::with_capacity(n + 16);
        while s.len() < n {
            let _ = write!(s, "{:016x}", self.next_u64());
        }
        s.truncate(n);
        s
    }

    fn uid(&mut self) -> String {
        let h = self.hex(32);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// Lowercase alphanumerics, as generated name suffixes are.
    fn suffix(&mut self, n: usize) -> String {
        const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..n)
            .map(|_| ALPHA[self.below(ALPHA.len())] as char)
            .collect()
    }

    fn base64(&mut self, n: usize) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        (0..n).map(|_| ALPHABET[self.below(64)] as char).collect()
    }
}

/// A protobuf message being written: tags, varints and length-delimited
/// fields, enough for the shapes here.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Self {
        self.tag(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    fn str(&mut self, field: u32, s: &str) -> &mut Self {
        self.bytes(field, s.as_bytes())
    }

    fn int(&mut self, field: u32, v: u64) -> &mut Self {
        self.tag(field, 0);
        self.varint(v);
        self
    }

    fn msg(&mut self, field: u32, build: impl FnOnce(&mut Pb)) -> &mut Self {
        let mut inner = Pb::default();
        build(&mut inner);
        self.bytes(field, &inner.0)
    }

    /// A `map<string, string>` entry.
    fn entry(&mut self, field: u32, k: &str, v: &str) -> &mut Self {
        self.msg(field, |e| {
            e.str(1, k).str(2, v);
        })
    }

    /// A `metav1.Time` (seconds, nanos).
    fn time(&mut self, field: u32, seconds: u64) -> &mut Self {
        self.msg(field, |t| {
            t.int(1, seconds).int(2, 0);
        })
    }
}

const NAMESPACES: [&str; 24] = [
    "openshift-etcd",
    "openshift-kube-apiserver",
    "openshift-kube-controller-manager",
    "openshift-kube-scheduler",
    "openshift-apiserver",
    "openshift-authentication",
    "openshift-console",
    "openshift-dns",
    "openshift-image-registry",
    "openshift-ingress",
    "openshift-machine-config-operator",
    "openshift-monitoring",
    "openshift-multus",
    "openshift-network-diagnostics",
    "openshift-ovn-kubernetes",
    "openshift-cluster-node-tuning-operator",
    "openshift-marketplace",
    "openshift-operator-lifecycle-manager",
    "kube-system",
    "default",
    "shop-frontend",
    "shop-backend",
    "payments",
    "data-pipeline",
];

const APPS: [&str; 20] = [
    "etcd-guard",
    "apiserver",
    "router-default",
    "dns-default",
    "node-exporter",
    "multus",
    "ovnkube-node",
    "image-registry",
    "console",
    "oauth-openshift",
    "prometheus-k8s",
    "alertmanager-main",
    "thanos-querier",
    "machine-config-daemon",
    "tuned",
    "network-metrics-daemon",
    "frontend",
    "checkout",
    "redis",
    "kafka-consumer",
];

const NODES: [&str; 9] = [
    "master-0.ocp.example.internal",
    "master-1.ocp.example.internal",
    "master-2.ocp.example.internal",
    "worker-0.ocp.example.internal",
    "worker-1.ocp.example.internal",
    "worker-2.ocp.example.internal",
    "worker-3.ocp.example.internal",
    "worker-4.ocp.example.internal",
    "worker-5.ocp.example.internal",
];

const ENV_NAMES: [&str; 12] = [
    "POD_NAME",
    "POD_NAMESPACE",
    "NODE_NAME",
    "KUBERNETES_SERVICE_HOST",
    "GOMAXPROCS",
    "LOG_LEVEL",
    "HTTP_PROXY",
    "NO_PROXY",
    "OPERATOR_IMAGE_VERSION",
    "RELEASE_VERSION",
    "METRICS_PORT",
    "TLS_MIN_VERSION",
];

const REASONS: [(&str, &str); 10] = [
    ("Scheduled", "Normal"),
    ("AddedInterface", "Normal"),
    ("Pulled", "Normal"),
    ("Created", "Normal"),
    ("Started", "Normal"),
    ("Killing", "Normal"),
    ("SuccessfulCreate", "Normal"),
    ("ProbeError", "Warning"),
    ("Unhealthy", "Warning"),
    ("BackOff", "Warning"),
];

/// A cluster's worth of shared state: images per app and CA bundles, which
/// real keyspaces repeat across many objects.
pub struct Generator {
    rng: Rng,
    count: u64,
    images: Vec<String>,
    ca_bundles: Vec<String>,
    /// Seconds since the epoch of the cluster's "now".
    now: u64,
}

impl Generator {
    /// A deterministic generator: the same seed gives the same objects.
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng(seed | 1);
        let images = APPS
            .iter()
            .map(|_| {
                format!(
                    "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:{}",
                    rng.hex(64)
                )
            })
            .collect();
        let ca_bundles = (0..4)
            .map(|i| {
                let mut pem = String::new();
                for _ in 0..(2 + i * 8) {
                    pem.push_str("-----BEGIN CERTIFICATE-----\n");
                    for _ in 0..20 {
                        pem.push_str(&rng.base64(64));
                        pem.push('\n');
                    }
                    pem.push_str("-----END CERTIFICATE-----\n");
                }
                pem
            })
            .collect();
        Self {
            rng,
            count: 0,
            images,
            ca_bundles,
            now: 1_764_000_000,
        }
    }

    /// The next object of the mix.
    pub fn next_object(&mut self) -> Object {
        let roll = self.rng.below(100);
        let kind = match roll {
            0..20 => Kind::Pod,
            20..60 => Kind::Event,
            60..75 => Kind::ConfigMap,
            75..95 => Kind::Secret,
            _ => Kind::Lease,
        };
        self.object(kind)
    }

    /// The next object, of the kind asked for.
    pub fn object(&mut self, kind: Kind) -> Object {
        self.count += 1;
        // Half the leases are the kubelets' node leases, in their own namespace.
        let ns = if kind == Kind::Lease && self.rng.below(2) == 0 {
            "kube-node-lease"
        } else {
            self.rng.pick(&NAMESPACES)
        };
        let (name, raw) = match kind {
            Kind::Pod => self.pod(ns),
            Kind::Event => self.event(ns),
            Kind::ConfigMap => self.configmap(ns),
            Kind::Secret => self.secret(ns),
            Kind::Lease => self.lease(ns),
        };
        let (api_version, kind_name) = kind.type_meta();
        let mut unknown = Pb::default();
        unknown
            .msg(1, |t| {
                t.str(1, api_version).str(2, kind_name);
            })
            .bytes(2, &raw)
            .str(3, "")
            .str(4, "");
        let mut value = MAGIC.to_vec();
        value.extend_from_slice(&unknown.0);
        Object {
            kind,
            key: format!("/kubernetes.io/{}/{ns}/{name}", kind.resource()),
            value,
        }
    }

    /// A name suffix unique to this object (its number, in the letters of
    /// generated names), so no two objects share a key: a fill writes each
    /// byte it counts.
    fn serial(&self) -> String {
        const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let (mut n, mut s) = (self.count, Vec::new());
        while s.len() < 5 || n > 0 {
            s.push(ALPHA[(n % ALPHA.len() as u64) as usize]);
            n /= ALPHA.len() as u64;
        }
        s.reverse();
        String::from_utf8(s).unwrap_or_default()
    }

    fn timestamp(&mut self) -> u64 {
        self.now - self.rng.below(90 * 24 * 3600) as u64
    }

    /// ObjectMeta (field 1 of every object) with labels, annotations, owner
    /// references and managedFields.
    #[allow(clippy::too_many_arguments)]
    fn meta(
        &mut self,
        m: &mut Pb,
        name: &str,
        generate_name: &str,
        ns: &str,
        labels: &[(&str, String)],
        annotations: &[(&str, String)],
        owner: Option<(&str, &str, &str)>,
        managed: &[(&str, &str, Option<&str>, String)],
    ) {
        let created = self.timestamp();
        m.str(1, name).str(2, generate_name).str(3, ns).str(4, "");
        m.str(5, &self.rng.uid());
        m.str(6, &(100_000_000 + self.count * 7).to_string());
        m.int(7, 0).time(8, created);
        for (k, v) in labels {
            m.entry(11, k, v);
        }
        for (k, v) in annotations {
            m.entry(12, k, v);
        }
        if let Some((kind, owner_name, api)) = owner {
            let uid = self.rng.uid();
            m.msg(13, |o| {
                o.str(1, kind).str(3, owner_name).str(4, &uid).str(5, api);
                o.int(6, 1).int(7, 1);
            });
        }
        for (manager, operation, subresource, fields) in managed {
            m.msg(17, |e| {
                e.str(1, manager)
                    .str(2, operation)
                    .str(3, "v1")
                    .time(4, created)
                    .str(6, "FieldsV1")
                    .msg(7, |f| {
                        f.bytes(1, fields.as_bytes());
                    });
                if let Some(s) = subresource {
                    e.str(8, s);
                }
            });
        }
    }

    fn pod(&mut self, ns: &str) -> (String, Vec<u8>) {
        let app_i = self.rng.below(APPS.len());
        let app = APPS[app_i];
        let image = self.images[app_i].clone();
        let template_hash = self.rng.suffix(10);
        let generate_name = format!("{app}-{template_hash}-");
        let name = format!("{generate_name}{}", self.rng.suffix(5));
        let node = self.rng.pick(&NODES);
        let pod_ip = format!(
            "10.{}.{}.{}",
            128 + self.rng.below(4),
            self.rng.below(256),
            2 + self.rng.below(250)
        );
        let host_ip = format!("10.0.{}.{}", self.rng.below(4), 10 + self.rng.below(200));
        let containers: Vec<String> = (0..1 + self.rng.below(3))
            .map(|i| {
                if i == 0 {
                    app.to_string()
                } else {
                    ["kube-rbac-proxy", "oauth-proxy", "config-reloader"][i - 1].to_string()
                }
            })
            .collect();
        let envs: Vec<&str> = (0..3 + self.rng.below(6)).map(|i| ENV_NAMES[i]).collect();
        let sa_volume = format!("kube-api-access-{}", self.rng.suffix(5));
        let labels = [
            ("app", app.to_string()),
            ("app.kubernetes.io/name", app.to_string()),
            ("app.kubernetes.io/component", "server".to_string()),
            (
                "app.kubernetes.io/part-of",
                "openshift-monitoring".to_string(),
            ),
            ("pod-template-hash", template_hash.clone()),
        ];
        let pod_networks = format!(
            "{{\"default\":{{\"ip_addresses\":[\"{pod_ip}/23\"],\"mac_address\":\"0a:58:{}:{}:{}:{}\",\"gateway_ips\":[\"10.128.0.1\"],\"ip_address\":\"{pod_ip}/23\",\"gateway_ip\":\"10.128.0.1\"}}}}",
            self.rng.hex(2), self.rng.hex(2), self.rng.hex(2), self.rng.hex(2)
        );
        let annotations = [
            ("k8s.ovn.org/pod-networks", pod_networks),
            ("openshift.io/scc", "restricted-v2".to_string()),
            ("seccomp.security.alpha.kubernetes.io/pod", "runtime/default".to_string()),
            ("k8s.v1.cni.cncf.io/network-status", format!("[{{\"name\":\"ovn-kubernetes\",\"interface\":\"eth0\",\"ips\":[\"{pod_ip}\"],\"default\":true,\"dns\":{{}}}}]")),
        ];
        let owner_name = format!("{app}-{template_hash}");
        let spec_fields = pod_spec_fields(&containers, &envs, &sa_volume);
        let status_fields = pod_status_fields(&pod_ip);
        let managed = [
            ("kube-controller-manager", "Update", None, spec_fields),
            (
                "ovnkube-controller",
                "Update",
                Some("status"),
                "{\"f:metadata\":{\"f:annotations\":{\"f:k8s.ovn.org/pod-networks\":{}}}}"
                    .to_string(),
            ),
            (
                "multus-daemon",
                "Update",
                Some("status"),
                "{\"f:metadata\":{\"f:annotations\":{\"f:k8s.v1.cni.cncf.io/network-status\":{}}}}"
                    .to_string(),
            ),
            ("kubelet", "Update", Some("status"), status_fields),
        ];
        let started = self.timestamp();
        let mut pod = Pb::default();
        pod.msg(1, |m| {
            self.meta(
                m,
                &name,
                &generate_name,
                ns,
                &labels,
                &annotations,
                Some(("ReplicaSet", &owner_name, "apps/v1")),
                &managed,
            )
        });
        let container_ids: Vec<String> = containers.iter().map(|_| self.rng.hex(64)).collect();
        let image_id = image.clone();
        pod.msg(2, |s| {
            s.msg(1, |v| {
                v.str(1, &sa_volume).msg(2, |src| {
                    src.msg(26, |p| {
                        p.msg(1, |x| {
                            x.msg(4, |t| {
                                t.str(1, "").int(2, 3607).str(3, "token");
                            });
                        });
                        p.int(2, 420);
                    });
                });
            });
            for c in &containers {
                s.msg(2, |k| {
                    k.str(1, c).str(2, &image);
                    k.str(3, "/bin/bash").str(3, "-c");
                    k.str(4, &format!("exec /usr/bin/{c} --config=/etc/{c}/config.yaml --v=2 --listen=0.0.0.0:8443 --tls-cert-file=/etc/tls/private/tls.crt --tls-private-key-file=/etc/tls/private/tls.key"));
                    k.msg(6, |p| {
                        p.str(1, "https").int(3, 8443).str(4, "TCP");
                    });
                    for e in &envs {
                        k.msg(7, |v| {
                            v.str(1, e).str(2, "");
                            v.msg(3, |from| {
                                from.msg(1, |f| {
                                    f.str(1, "v1").str(2, "metadata.name");
                                });
                            });
                        });
                    }
                    k.msg(8, |r| {
                        r.msg(2, |e| {
                            e.str(1, "cpu").msg(2, |q| {
                                q.str(1, "10m");
                            });
                        });
                        r.msg(2, |e| {
                            e.str(1, "memory").msg(2, |q| {
                                q.str(1, "50Mi");
                            });
                        });
                    });
                    k.msg(9, |m| {
                        m.str(1, &sa_volume).int(2, 1).str(3, "/var/run/secrets/kubernetes.io/serviceaccount");
                    });
                    k.str(13, "/dev/termination-log").str(14, "IfNotPresent");
                    k.msg(15, |sc| {
                        sc.msg(1, |cap| {
                            cap.str(2, "ALL");
                        });
                        sc.int(3, 1).int(6, 0);
                    });
                    k.str(20, "FallbackToLogsOnError");
                });
            }
            s.str(3, "Always").int(4, 30).str(6, "ClusterFirst");
            s.entry(7, "kubernetes.io/os", "linux");
            s.str(8, "default").str(9, "default").str(10, node);
            s.msg(14, |sc| {
                sc.str(1, "s0:c25,c0").int(5, 1).int(6, 1000650000);
            });
            s.str(19, "default-scheduler");
            for (key, effect) in [("node.kubernetes.io/not-ready", "NoExecute"), ("node.kubernetes.io/unreachable", "NoExecute"), ("node.kubernetes.io/memory-pressure", "NoSchedule")] {
                s.msg(22, |t| {
                    t.str(1, key).str(2, "Exists").str(4, effect).int(5, 300);
                });
            }
            s.str(24, "system-cluster-critical").int(25, 2000000000);
            s.str(33, "PreemptLowerPriority");
        });
        pod.msg(3, |st| {
            st.str(1, "Running");
            for cond in [
                "PodReadyToStartContainers",
                "Initialized",
                "Ready",
                "ContainersReady",
                "PodScheduled",
            ] {
                st.msg(2, |c| {
                    c.str(1, cond)
                        .str(2, "True")
                        .msg(3, |_| {})
                        .time(4, started);
                });
            }
            st.str(5, &host_ip).str(6, &pod_ip).time(7, started);
            for (c, id) in containers.iter().zip(&container_ids) {
                st.msg(8, |cs| {
                    cs.str(1, c);
                    cs.msg(2, |state| {
                        state.msg(2, |running| {
                            running.time(1, started);
                        });
                    });
                    cs.msg(3, |_| {});
                    cs.int(4, 1).int(5, 0).str(6, &image).str(7, &image_id);
                    cs.str(8, &format!("cri-o://{id}")).int(9, 1);
                });
            }
            st.str(9, "Burstable");
            st.msg(12, |ip| {
                ip.str(1, &pod_ip);
            });
            st.msg(14, |ip| {
                ip.str(1, &host_ip);
            });
        });
        (name, pod.0)
    }

    fn event(&mut self, ns: &str) -> (String, Vec<u8>) {
        let app = self.rng.pick(&APPS);
        let pod = format!("{app}-{}-{}", self.rng.suffix(10), self.rng.suffix(5));
        let name = format!("{pod}.{}", self.rng.hex(16));
        let (reason, kind) = REASONS[self.rng.below(REASONS.len())];
        let node = self.rng.pick(&NODES);
        let message = match reason {
            "Scheduled" => format!("Successfully assigned {ns}/{pod} to {node}"),
            "AddedInterface" => format!("Add eth0 [10.{}.{}.{}/23] from ovn-kubernetes", 128 + self.rng.below(4), self.rng.below(256), self.rng.below(256)),
            "Pulled" => format!("Container image \"{}\" already present on machine", self.images[self.rng.below(APPS.len())]),
            "Created" => format!("Created container {app}"),
            "Started" => format!("Started container {app}"),
            "Killing" => format!("Stopping container {app}"),
            "SuccessfulCreate" => format!("Created pod: {pod}"),
            "BackOff" => format!("Back-off restarting failed container {app} in pod {pod}_{ns}({})", self.rng.uid()),
            _ => format!("Readiness probe failed: Get \"https://10.{}.{}.{}:8443/healthz\": dial tcp 10.{}.{}.{}:8443: connect: connection refused", 128 + self.rng.below(4), self.rng.below(256), self.rng.below(256), 128 + self.rng.below(4), self.rng.below(256), self.rng.below(256)),
        };
        let first = self.timestamp();
        let count = 1 + self.rng.below(40) as u64;
        let pod_uid = self.rng.uid();
        let mut e = Pb::default();
        e.msg(1, |m| self.meta(m, &name, "", ns, &[], &[], None, &[]));
        e.msg(2, |o| {
            o.str(1, "Pod")
                .str(2, ns)
                .str(3, &pod)
                .str(4, &pod_uid)
                .str(5, "v1");
            o.str(6, &(100_000_000 + self.count * 3).to_string());
            o.str(7, &format!("spec.containers{{{app}}}"));
        });
        e.str(3, reason).str(4, &message);
        e.msg(5, |s| {
            s.str(1, "kubelet").str(2, node);
        });
        e.time(6, first)
            .time(7, first + count * 30)
            .int(8, count)
            .str(9, kind);
        e.msg(10, |_| {});
        e.str(13, "").str(14, "kubelet").str(15, node);
        (name, e.0)
    }

    fn configmap(&mut self, ns: &str) -> (String, Vec<u8>) {
        let bundle = self.rng.below(3) == 0;
        let name = if bundle {
            [
                "trusted-ca-bundle",
                "service-ca-bundle",
                "kube-root-ca.crt",
                "openshift-service-ca.crt",
            ][self.rng.below(4)]
            .to_string()
                + "-"
                + &self.serial()
        } else {
            format!("{}-config-{}", self.rng.pick(&APPS), self.serial())
        };
        let mut data: Vec<(String, String)> = Vec::new();
        if bundle {
            let b = self.ca_bundles[self.rng.below(self.ca_bundles.len())].clone();
            data.push(("ca-bundle.crt".to_string(), b));
        } else {
            let mut yaml = String::from("apiVersion: config.openshift.io/v1\nkind: Config\n");
            for i in 0..20 + self.rng.below(200) {
                let app = self.rng.pick(&APPS);
                let _ = writeln!(
                    yaml,
                    "{app}_{i}:\n  enabled: {}\n  replicas: {}\n  endpoint: https://{app}.{ns}.svc:{}\n  timeout: {}s\n  labels:\n    app.kubernetes.io/name: {app}",
                    self.rng.below(2) == 0,
                    1 + self.rng.below(5),
                    8000 + self.rng.below(1000),
                    self.rng.below(120)
                );
            }
            data.push(("config.yaml".to_string(), yaml));
        }
        let keys: String = data
            .iter()
            .map(|(k, _)| format!(",\"f:{k}\":{{}}"))
            .collect();
        let managed = [(
            "cluster-network-operator",
            "Update",
            None,
            format!("{{\"f:data\":{{\".\":{{}}{keys}}},\"f:metadata\":{{\"f:annotations\":{{\".\":{{}},\"f:openshift.io/owning-component\":{{}}}},\"f:labels\":{{\".\":{{}},\"f:config.openshift.io/inject-trusted-cabundle\":{{}}}}}}}}"),
        )];
        let labels = [(
            "config.openshift.io/inject-trusted-cabundle",
            "true".to_string(),
        )];
        let annotations = [(
            "openshift.io/owning-component",
            "Networking / cluster-network-operator".to_string(),
        )];
        let mut cm = Pb::default();
        cm.msg(1, |m| {
            self.meta(m, &name, "", ns, &labels, &annotations, None, &managed)
        });
        for (k, v) in &data {
            cm.entry(2, k, v);
        }
        (name, cm.0)
    }

    fn secret(&mut self, ns: &str) -> (String, Vec<u8>) {
        let app = self.rng.pick(&APPS);
        let (name, ty, keys): (String, &str, &[(&str, usize)]) = match self.rng.below(3) {
            0 => (
                format!("{app}-tls-{}", self.serial()),
                "kubernetes.io/tls",
                &[("tls.crt", 2400), ("tls.key", 1700)],
            ),
            1 => (
                format!("{app}-dockercfg-{}", self.serial()),
                "kubernetes.io/dockercfg",
                &[(".dockercfg", 1200)],
            ),
            _ => (
                format!("{app}-token-{}", self.serial()),
                "kubernetes.io/service-account-token",
                &[
                    ("token", 1100),
                    ("ca.crt", 1200),
                    ("namespace", 24),
                    ("service-ca.crt", 1300),
                ],
            ),
        };
        let fields: String = keys
            .iter()
            .map(|(k, _)| format!(",\"f:{k}\":{{}}"))
            .collect();
        let managed = [(
            "service-ca-operator",
            "Update",
            None,
            format!("{{\"f:data\":{{\".\":{{}}{fields}}},\"f:metadata\":{{\"f:annotations\":{{\".\":{{}},\"f:service.beta.openshift.io/expiry\":{{}},\"f:service.beta.openshift.io/originating-service-name\":{{}}}}}},\"f:type\":{{}}}}"),
        )];
        let annotations = [
            (
                "service.beta.openshift.io/expiry",
                "2028-11-24T12:00:00Z".to_string(),
            ),
            (
                "service.beta.openshift.io/originating-service-name",
                app.to_string(),
            ),
        ];
        let mut s = Pb::default();
        s.msg(1, |m| {
            self.meta(m, &name, "", ns, &[], &annotations, None, &managed)
        });
        for (k, n) in keys {
            let len = n * (3 + self.rng.below(3)) / 4;
            let v = self.rng.bytes(len);
            s.msg(2, |e| {
                e.str(1, k).bytes(2, &v);
            });
        }
        s.str(3, ty);
        (name, s.0)
    }

    fn lease(&mut self, ns: &str) -> (String, Vec<u8>) {
        let node = self.rng.pick(&NODES);
        let name = if ns == "kube-node-lease" {
            format!("{node}-{}", self.serial())
        } else {
            format!("{}-lock-{}", self.rng.pick(&APPS), self.serial())
        };
        let holder = format!("{node}_{}", self.rng.uid());
        let managed = [(
            "kubelet",
            "Update",
            None,
            "{\"f:metadata\":{\"f:ownerReferences\":{\".\":{},\"k:{\\\"uid\\\":\\\"\\\"}\":{}}},\"f:spec\":{\"f:holderIdentity\":{},\"f:leaseDurationSeconds\":{},\"f:renewTime\":{}}}".to_string(),
        )];
        let renewed = self.now;
        let mut l = Pb::default();
        l.msg(1, |m| {
            self.meta(
                m,
                &name,
                "",
                ns,
                &[],
                &[],
                Some(("Node", node, "v1")),
                &managed,
            )
        });
        l.msg(2, |s| {
            s.str(1, &holder)
                .int(2, 40)
                .time(3, renewed - 86_400)
                .time(4, renewed)
                .int(5, 3);
        });
        (name, l.0)
    }
}

/// A protobuf field as read back: a varint or a length-delimited payload
/// (the only wire types the objects here use).
#[derive(Clone, Debug)]
enum Field {
    Varint(u64),
    Bytes(Vec<u8>),
}

/// Reads a varint at the start of `b`: its value and the rest.
fn read_varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

/// Every field of a message, in order; `None` when it does not parse.
fn decode(mut b: &[u8]) -> Option<Vec<(u32, Field)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (tag, rest) = read_varint(b)?;
        let number = u32::try_from(tag >> 3).ok()?;
        match tag & 7 {
            0 => {
                let (v, rest) = read_varint(rest)?;
                out.push((number, Field::Varint(v)));
                b = rest;
            }
            2 => {
                let (len, rest) = read_varint(rest)?;
                let len = usize::try_from(len).ok().filter(|l| *l <= rest.len())?;
                out.push((number, Field::Bytes(rest[..len].to_vec())));
                b = &rest[len..];
            }
            _ => return None,
        }
    }
    Some(out)
}

fn encode(fields: &[(u32, Field)]) -> Vec<u8> {
    let mut pb = Pb::default();
    for (n, f) in fields {
        match f {
            Field::Varint(v) => pb.int(*n, *v),
            Field::Bytes(b) => pb.bytes(*n, b),
        };
    }
    pb.0
}

/// Rewrites the payload of every length-delimited field `n` with `f`
/// (which may give it back unchanged); `None` when `f` fails on one.
fn rewrite(
    fields: &mut [(u32, Field)],
    n: u32,
    mut f: impl FnMut(&[u8]) -> Option<Vec<u8>>,
) -> Option<()> {
    for (number, field) in fields.iter_mut() {
        if let (true, Field::Bytes(b)) = (*number == n, field) {
            *b = f(b)?;
        }
    }
    Some(())
}

/// Sets field `n` (the first of that number, or a new one at the end).
fn set(fields: &mut Vec<(u32, Field)>, n: u32, value: Field) {
    match fields.iter_mut().find(|(number, _)| *number == n) {
        Some((_, f)) => *f = value,
        None => fields.push((n, value)),
    }
}

/// A `metav1.Time` message at `seconds`.
fn time_message(seconds: u64) -> Vec<u8> {
    let mut t = Pb::default();
    t.int(1, seconds).int(2, 0);
    t.0
}

fn string_field(fields: &[(u32, Field)], n: u32) -> Option<&[u8]> {
    fields.iter().find_map(|(number, f)| match f {
        Field::Bytes(b) if *number == n => Some(b.as_slice()),
        _ => None,
    })
}

/// Applies `f` to the object inside a stored value (`k8s\0` +
/// `runtime.Unknown`, the object in its `raw` field) and to its ObjectMeta:
/// a new `resourceVersion`, and the time of the managedFields entry of
/// `manager` set to `now`.
fn update_object(
    value: &[u8],
    manager: &str,
    now: u64,
    resource_version: u64,
    mut f: impl FnMut(&mut Vec<(u32, Field)>) -> Option<()>,
) -> Option<Vec<u8>> {
    let mut unknown = decode(value.strip_prefix(MAGIC)?)?;
    rewrite(&mut unknown, 2, |raw| {
        let mut object = decode(raw)?;
        rewrite(&mut object, 1, |meta| {
            let mut meta = decode(meta)?;
            set(
                &mut meta,
                6,
                Field::Bytes(resource_version.to_string().into_bytes()),
            );
            rewrite(&mut meta, 17, |entry| {
                let mut entry = decode(entry)?;
                if string_field(&entry, 1) == Some(manager.as_bytes()) {
                    set(&mut entry, 4, Field::Bytes(time_message(now)));
                }
                Some(encode(&entry))
            })?;
            Some(encode(&meta))
        })?;
        f(&mut object)?;
        Some(encode(&object))
    })?;
    let mut value = MAGIC.to_vec();
    value.extend_from_slice(&encode(&unknown));
    Some(value)
}

/// A pod as the kubelet's status update at `now` leaves it (a container
/// restarted, readiness flipped): `resourceVersion`, the kubelet's
/// managedFields time, the `Ready` and `ContainersReady` conditions'
/// transition time, and each container's restart count and start time.
/// `None` when `value` is not a pod this module wrote.
pub fn pod_status_update(value: &[u8], now: u64, resource_version: u64) -> Option<Vec<u8>> {
    update_object(value, "kubelet", now, resource_version, |pod| {
        rewrite(pod, 3, |status| {
            let mut status = decode(status)?;
            rewrite(&mut status, 2, |condition| {
                let mut c = decode(condition)?;
                if matches!(
                    string_field(&c, 1),
                    Some(b"Ready") | Some(b"ContainersReady")
                ) {
                    set(&mut c, 4, Field::Bytes(time_message(now)));
                }
                Some(encode(&c))
            })?;
            rewrite(&mut status, 8, |container| {
                let mut cs = decode(container)?;
                let mut running = Pb::default();
                running.msg(2, |r| {
                    r.bytes(1, &time_message(now));
                });
                set(&mut cs, 2, Field::Bytes(running.0));
                let restarts = cs.iter().find_map(|(n, f)| match f {
                    Field::Varint(v) if *n == 5 => Some(*v),
                    _ => None,
                });
                set(&mut cs, 5, Field::Varint(restarts.unwrap_or(0) + 1));
                Some(encode(&cs))
            })?;
            Some(encode(&status))
        })
    })
}

/// A lease as its holder's renewal at `now` leaves it: `resourceVersion`,
/// the managedFields time and `spec.renewTime`. `None` when `value` is not
/// a lease this module wrote.
pub fn lease_renewal(value: &[u8], now: u64, resource_version: u64) -> Option<Vec<u8>> {
    update_object(value, "kubelet", now, resource_version, |lease| {
        rewrite(lease, 2, |spec| {
            let mut spec = decode(spec)?;
            set(&mut spec, 4, Field::Bytes(time_message(now)));
            Some(encode(&spec))
        })
    })
}

/// managedFields `fieldsV1` for a pod's spec, the way the API server writes
/// it: one `f:` key per field set, `k:{"name":…}` per list item.
fn pod_spec_fields(containers: &[String], envs: &[&str], volume: &str) -> String {
    let mut s = String::from(
        "{\"f:metadata\":{\"f:generateName\":{},\"f:labels\":{\".\":{},\"f:app\":{},\"f:app.kubernetes.io/component\":{},\"f:app.kubernetes.io/name\":{},\"f:app.kubernetes.io/part-of\":{},\"f:pod-template-hash\":{}},\"f:ownerReferences\":{\".\":{},\"k:{\\\"uid\\\":\\\"\\\"}\":{}}},\"f:spec\":{\"f:containers\":{",
    );
    for (i, c) in containers.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "\"k:{{\\\"name\\\":\\\"{c}\\\"}}\":{{\".\":{{}},\"f:args\":{{}},\"f:command\":{{}},\"f:env\":{{\".\":{{}}");
        for e in envs {
            let _ = write!(s, ",\"k:{{\\\"name\\\":\\\"{e}\\\"}}\":{{\".\":{{}},\"f:name\":{{}},\"f:valueFrom\":{{\".\":{{}},\"f:fieldRef\":{{}}}}}}");
        }
        s.push_str("},\"f:image\":{},\"f:imagePullPolicy\":{},\"f:name\":{},\"f:ports\":{\".\":{},\"k:{\\\"containerPort\\\":8443,\\\"protocol\\\":\\\"TCP\\\"}\":{\".\":{},\"f:containerPort\":{},\"f:name\":{},\"f:protocol\":{}}},\"f:resources\":{\".\":{},\"f:requests\":{\".\":{},\"f:cpu\":{},\"f:memory\":{}}},\"f:securityContext\":{\".\":{},\"f:capabilities\":{\".\":{},\"f:drop\":{}},\"f:runAsNonRoot\":{}},\"f:terminationMessagePath\":{},\"f:terminationMessagePolicy\":{},\"f:volumeMounts\":{\".\":{},\"k:{\\\"mountPath\\\":\\\"/var/run/secrets/kubernetes.io/serviceaccount\\\"}\":{\".\":{},\"f:mountPath\":{},\"f:name\":{},\"f:readOnly\":{}}}}");
    }
    let _ = write!(
        s,
        "}},\"f:dnsPolicy\":{{}},\"f:enableServiceLinks\":{{}},\"f:nodeSelector\":{{}},\"f:priorityClassName\":{{}},\"f:restartPolicy\":{{}},\"f:schedulerName\":{{}},\"f:securityContext\":{{}},\"f:serviceAccount\":{{}},\"f:serviceAccountName\":{{}},\"f:terminationGracePeriodSeconds\":{{}},\"f:tolerations\":{{}},\"f:volumes\":{{\".\":{{}},\"k:{{\\\"name\\\":\\\"{volume}\\\"}}\":{{\".\":{{}},\"f:name\":{{}},\"f:projected\":{{\".\":{{}},\"f:defaultMode\":{{}},\"f:sources\":{{}}}}}}}}}}}}"
    );
    s
}

/// managedFields `fieldsV1` for what the kubelet writes into a pod's status.
fn pod_status_fields(pod_ip: &str) -> String {
    format!(
        "{{\"f:status\":{{\"f:conditions\":{{\"k:{{\\\"type\\\":\\\"ContainersReady\\\"}}\":{{\".\":{{}},\"f:lastProbeTime\":{{}},\"f:lastTransitionTime\":{{}},\"f:status\":{{}},\"f:type\":{{}}}},\"k:{{\\\"type\\\":\\\"Initialized\\\"}}\":{{\".\":{{}},\"f:lastProbeTime\":{{}},\"f:lastTransitionTime\":{{}},\"f:status\":{{}},\"f:type\":{{}}}},\"k:{{\\\"type\\\":\\\"Ready\\\"}}\":{{\".\":{{}},\"f:lastProbeTime\":{{}},\"f:lastTransitionTime\":{{}},\"f:status\":{{}},\"f:type\":{{}}}}}},\"f:containerStatuses\":{{}},\"f:hostIP\":{{}},\"f:hostIPs\":{{}},\"f:phase\":{{}},\"f:podIP\":{{}},\"f:podIPs\":{{\".\":{{}},\"k:{{\\\"ip\\\":\\\"{pod_ip}\\\"}}\":{{\".\":{{}},\"f:ip\":{{}}}}}},\"f:startTime\":{{}}}}}}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads one protobuf field: (field number, wire type, payload for
    /// length-delimited fields), and the rest.
    fn field(b: &[u8]) -> ((u64, u8, &[u8]), &[u8]) {
        let (tag, rest) = varint(b);
        let wire = (tag & 7) as u8;
        match wire {
            0 => {
                let (_, rest) = varint(rest);
                ((tag >> 3, wire, &[]), rest)
            }
            2 => {
                let (len, rest) = varint(rest);
                let (payload, rest) = rest.split_at(len as usize);
                ((tag >> 3, wire, payload), rest)
            }
            w => panic!("unexpected wire type {w}"),
        }
    }

    fn varint(b: &[u8]) -> (u64, &[u8]) {
        let mut v = 0u64;
        for (i, byte) in b.iter().enumerate() {
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return (v, &b[i + 1..]);
            }
        }
        panic!("truncated varint");
    }

    /// Every field of a message, checking it parses to the end.
    fn fields(mut b: &[u8]) -> Vec<(u64, u8, &[u8])> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let (f, rest) = field(b);
            out.push(f);
            b = rest;
        }
        out
    }

    #[test]
    fn values_are_the_api_servers_protobuf_envelope_with_the_keys_kind() {
        let mut g = Generator::new(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let o = g.next_object();
            seen.insert(o.kind);
            assert!(o.value.starts_with(MAGIC), "{}", o.key);
            let unknown = fields(&o.value[4..]);
            let numbers: Vec<u64> = unknown.iter().map(|f| f.0).collect();
            assert_eq!(numbers, [1, 2, 3, 4], "{}", o.key);
            let type_meta = fields(unknown[0].2);
            let (api_version, kind) = o.kind.type_meta();
            assert_eq!(type_meta[0].2, api_version.as_bytes());
            assert_eq!(type_meta[1].2, kind.as_bytes());
            // raw: the object, whose field 1 is ObjectMeta with name (1) and
            // namespace (3) matching the key.
            let object = fields(unknown[1].2);
            assert_eq!(object[0].0, 1);
            let meta = fields(object[0].2);
            let name = std::str::from_utf8(meta[0].2).unwrap();
            let ns = std::str::from_utf8(meta[2].2).unwrap();
            assert_eq!(
                o.key,
                format!("/kubernetes.io/{}/{ns}/{name}", o.kind.resource())
            );
            // Every managedFields entry's fieldsV1 (7 → Raw 1) is JSON.
            for entry in meta.iter().filter(|f| f.0 == 17) {
                let fields_v1 = fields(entry.2).into_iter().find(|f| f.0 == 7).unwrap();
                let json = fields(fields_v1.2)[0].2;
                serde_json::from_slice::<serde_json::Value>(json)
                    .unwrap_or_else(|e| panic!("{}: fieldsV1 {e}", o.key));
            }
        }
        assert_eq!(seen.len(), Kind::ALL.len(), "every kind in the mix");
    }

    #[test]
    fn pods_carry_labels_owner_references_and_managed_fields() {
        let mut g = Generator::new(3);
        let o = g.object(Kind::Pod);
        let unknown = fields(&o.value[4..]);
        let pod = fields(unknown[1].2);
        let meta = fields(pod[0].2);
        let count = |n: u64| meta.iter().filter(|f| f.0 == n).count();
        assert!(count(11) >= 3, "labels");
        assert_eq!(count(13), 1, "owner reference");
        assert!(count(17) >= 2, "managedFields");
        let managed = meta.iter().find(|f| f.0 == 17).unwrap();
        let fields_v1 = fields(managed.2).into_iter().find(|f| f.0 == 7).unwrap();
        let json = fields(fields_v1.2)[0].2;
        let parsed: serde_json::Value = serde_json::from_slice(json).expect("fieldsV1 is JSON");
        assert!(parsed["f:spec"]["f:containers"].is_object());
        // spec and status follow the metadata.
        assert_eq!(pod.iter().map(|f| f.0).collect::<Vec<_>>(), [1, 2, 3]);
    }

    /// The (seconds) of a `metav1.Time` payload.
    fn seconds(time: &[u8]) -> u64 {
        let f = fields(time);
        let (v, _) = varint(&time[1..]);
        assert_eq!(f[0].0, 1);
        v
    }

    #[test]
    fn a_pod_status_update_changes_status_times_and_resource_version_only() {
        let mut g = Generator::new(9);
        let o = g.object(Kind::Pod);
        let now = g.now + 12_345;
        let updated = pod_status_update(&o.value, now, 424_242).expect("a pod");
        assert_ne!(updated, o.value);
        let (before, after) = (fields(&o.value[4..]), fields(&updated[4..]));
        let (pod_before, pod) = (fields(before[1].2), fields(after[1].2));
        assert_eq!(pod.iter().map(|f| f.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(pod_before[1].2, pod[1].2, "spec unchanged");
        let meta = fields(pod[0].2);
        let meta_before = fields(pod_before[0].2);
        assert_eq!(meta[0].2, meta_before[0].2, "same name");
        assert_eq!(meta[2].2, meta_before[2].2, "same namespace");
        let rv = meta.iter().find(|f| f.0 == 6).unwrap();
        assert_eq!(rv.2, b"424242");
        let status = fields(pod[2].2);
        let mut ready = 0;
        for c in status.iter().filter(|f| f.0 == 2) {
            let c = fields(c.2);
            if c[0].2 == b"Ready" || c[0].2 == b"ContainersReady" {
                assert_eq!(seconds(c.iter().find(|f| f.0 == 4).unwrap().2), now);
                ready += 1;
            }
        }
        assert_eq!(ready, 2);
        assert!(status.iter().any(|f| f.0 == 8), "container statuses");
        // Still a valid value for the whole envelope check.
        assert!(updated.len().abs_diff(o.value.len()) < 64);
    }

    #[test]
    fn a_lease_renewal_moves_renew_time() {
        let mut g = Generator::new(4);
        let o = g.object(Kind::Lease);
        let renewed = lease_renewal(&o.value, g.now + 10, 7).expect("a lease");
        let lease = fields(fields(&renewed[4..])[1].2);
        let spec = fields(lease[1].2);
        assert_eq!(
            seconds(spec.iter().find(|f| f.0 == 4).unwrap().2),
            g.now + 10
        );
        assert_eq!(
            spec[0].2,
            fields(fields(fields(&o.value[4..])[1].2)[1].2)[0].2
        );
        assert!(pod_status_update(b"not a value", 1, 1).is_none());
        assert!(lease_renewal(b"k8s\0\xff", 1, 1).is_none());
    }

    #[test]
    fn no_two_objects_share_a_key() {
        let mut g = Generator::new(5);
        let mut keys = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let o = g.next_object();
            assert!(keys.insert(o.key.clone()), "{} twice", o.key);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_objects() {
        let (mut a, mut b) = (Generator::new(11), Generator::new(11));
        for _ in 0..50 {
            let (x, y) = (a.next_object(), b.next_object());
            assert_eq!((x.key, x.value), (y.key, y.value));
        }
    }
}
