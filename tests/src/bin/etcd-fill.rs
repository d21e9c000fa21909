//! Fills an etcd member until the values add up to a given size, for
//! `scripts/bench`.
//!
//! Usage: `etcd-fill ENDPOINT MIB [--kind random|k8s] [--value-size BYTES]
//! [--in-flight N] [--seed N]`
//!
//! - `--kind random` (the default): keys look like
//!   `/kubernetes.io/<resource>/<namespace>/<name>`; values are JSON-shaped
//!   text of 2–64 KiB with pseudo-random content (so neither etcd nor gzip can
//!   make them vanish; zstd gets them to about 3/4, the entropy of their
//!   64-letter alphabet). With `--value-size BYTES` every value has that size
//!   instead (e.g. 1024 for the scale rows: many keys, many bbolt pages).
//! - `--kind k8s`: Kubernetes-like objects in the API server's protobuf
//!   storage form (`k8s\0` + `runtime.Unknown`), a realistic mix of pods,
//!   events, configmaps, secrets and leases (see
//!   `etcd_backup_tests::k8s_objects`).
//!
//! Puts go in transactions of at most 128 operations (etcd's default
//! `--max-txn-ops`) and 1 MiB (under its default 1.5 MiB
//! `--max-request-bytes`), `--in-flight` transactions at a time (default 16).
//! At the end it prints the keys, MiB of values, seconds and, for `k8s`, the
//! share of each kind.

use std::time::Instant;

use etcd_backup_tests::k8s_objects::{Generator, Kind, Rng};
use etcd_client::{Client, Txn, TxnOp};

const RESOURCES: [&str; 6] = [
    "secrets",
    "configmaps",
    "pods",
    "deployments",
    "events",
    "leases",
];
const MAX_TXN_OPS: usize = 128;
const MAX_TXN_BYTES: usize = 1 << 20;
const USAGE: &str = "usage: etcd-fill ENDPOINT MIB [--kind random|k8s] [--value-size BYTES] [--in-flight N] [--seed N]";

/// A JSON-shaped value of `size` bytes (or 2–64 KiB when `None`) whose payload
/// is pseudo-random text.
fn object(rng: &mut Rng, kind: &str, ns: &str, name: &str, size: Option<usize>) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    // Drawn first when random, so the default values are the ones earlier
    // versions of this tool wrote.
    let random_size = size
        .is_none()
        .then(|| 2048 + (rng.next_u64() % (62 * 1024)) as usize);
    let mut v = format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"{kind}\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"{ns}\",\"uid\":\"{:016x}\"}},\"data\":{{\"payload\":\"",
        rng.next_u64()
    )
    .into_bytes();
    // The payload runs up to the size (less the closing `"}}` when the size
    // is exact).
    let payload_end = random_size.unwrap_or_else(|| size.unwrap_or(0).saturating_sub(3));
    while v.len() < payload_end {
        let r = rng.next_u64();
        for i in 0..8 {
            v.push(ALPHABET[((r >> (i * 6)) & 63) as usize]);
        }
    }
    if size.is_some() {
        v.truncate(payload_end);
    }
    v.extend_from_slice(b"\"}}");
    v
}

/// What to write.
enum Source {
    Random { rng: Rng, value_size: Option<usize> },
    K8s(Box<Generator>),
}

impl Source {
    /// The next key and value, and the index of its kind for the summary.
    fn next(&mut self, n: u64) -> (String, Vec<u8>, usize) {
        match self {
            Source::Random { rng, value_size } => {
                let kind = RESOURCES[(n % RESOURCES.len() as u64) as usize];
                let ns = format!("namespace-{}", n % 97);
                let name = format!("{kind}-{n:08}");
                let value = object(rng, kind, &ns, &name, *value_size);
                (format!("/kubernetes.io/{kind}/{ns}/{name}"), value, 0)
            }
            Source::K8s(g) => {
                let o = g.next_object();
                (o.key, o.value, o.kind.index())
            }
        }
    }
}

struct Args {
    endpoint: String,
    target: u64,
    source: Source,
    in_flight: usize,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut kind = "random".to_string();
    let mut value_size = None;
    let mut in_flight = 16usize;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--kind" => kind = value("--kind")?,
            "--value-size" => {
                let v = value("--value-size")?;
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("--value-size {v}: not a number of bytes"))?;
                if !(256..=1 << 20).contains(&n) {
                    return Err(format!(
                        "--value-size {n}: must be between 256 bytes (the JSON frame around the payload) and 1 MiB (etcd's request limit)"
                    ));
                }
                value_size = Some(n);
            }
            "--in-flight" => {
                let v = value("--in-flight")?;
                in_flight = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--in-flight {v}: must be a positive number"))?;
            }
            "--seed" => {
                let v = value("--seed")?;
                seed = v.parse().map_err(|_| format!("--seed {v}: not a number"))?;
            }
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ => positional.push(a.clone()),
        }
    }
    let [endpoint, mib] = positional.as_slice() else {
        return Err("ENDPOINT and MIB are required".into());
    };
    let mib: u64 = mib
        .parse()
        .map_err(|_| format!("MIB {mib}: not a number of MiB"))?;
    let source = match kind.as_str() {
        "random" => Source::Random {
            rng: Rng(seed),
            value_size,
        },
        "k8s" if value_size.is_some() => {
            return Err(
                "--value-size applies to --kind random only (k8s objects have their own sizes)"
                    .into(),
            )
        }
        "k8s" => Source::K8s(Box::new(Generator::new(seed))),
        other => return Err(format!("--kind {other}: expected random or k8s")),
    };
    Ok(Args {
        endpoint: endpoint.clone(),
        target: mib << 20,
        source,
        in_flight,
    })
}

/// Exits (1) with etcd's error when a transaction failed.
fn done(r: Option<Result<Result<(), String>, tokio::task::JoinError>>) {
    match r {
        Some(Ok(Err(e))) => {
            eprintln!("etcd-fill: {e}");
            std::process::exit(1);
        }
        Some(Err(e)) => {
            eprintln!("etcd-fill: a put task failed: {e}");
            std::process::exit(1);
        }
        Some(Ok(Ok(()))) | None => {}
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Args {
        endpoint,
        target,
        mut source,
        in_flight,
    } = parse(&args).unwrap_or_else(|e| {
        eprintln!("etcd-fill: {e}\n{USAGE}");
        std::process::exit(2);
    });
    let client = Client::connect([endpoint.as_str()], None)
        .await
        .unwrap_or_else(|e| {
            eprintln!("etcd-fill: cannot connect to etcd at {endpoint}: {e}");
            std::process::exit(1);
        });
    let start = Instant::now();
    let mut written = 0u64;
    let mut keys = 0u64;
    let mut per_kind = [0u64; Kind::ALL.len()];
    let mut tasks = tokio::task::JoinSet::new();
    while written < target {
        let mut ops = Vec::with_capacity(MAX_TXN_OPS);
        let mut batch = 0usize;
        while ops.len() < MAX_TXN_OPS && batch < MAX_TXN_BYTES && written < target {
            let (key, value, kind) = source.next(keys);
            written += value.len() as u64;
            batch += key.len() + value.len();
            per_kind[kind] += value.len() as u64;
            keys += 1;
            ops.push(TxnOp::put(key, value, None));
        }
        if tasks.len() >= in_flight {
            done(tasks.join_next().await);
        }
        let mut kv = client.kv_client();
        let to = endpoint.clone();
        tasks.spawn(async move {
            kv.txn(Txn::new().and_then(ops))
                .await
                .map(|_| ())
                .map_err(|e| format!("writing to etcd at {to} failed (is it running, with room under its quota?): {e}"))
        });
    }
    while let Some(r) = tasks.join_next().await {
        done(Some(r));
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "etcd-fill: {keys} keys, {} MiB of values in {secs:.1}s ({:.0} MB/s)",
        written >> 20,
        written as f64 / secs / 1e6
    );
    if let Source::K8s(_) = source {
        let shares: Vec<String> = Kind::ALL
            .iter()
            .map(|k| {
                format!(
                    "{} {:.0}%",
                    k.resource(),
                    per_kind[k.index()] as f64 * 100.0 / written.max(1) as f64
                )
            })
            .collect();
        eprintln!("etcd-fill: bytes by kind: {}", shares.join(", "));
    }
}
