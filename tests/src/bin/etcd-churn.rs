//! One interval of a busy control plane on the k8s-like data `etcd-fill
//! --kind k8s` wrote, for `scripts/bench --suite incremental`: what changes
//! in etcd between two scheduled backups.
//!
//! Usage: `etcd-churn ENDPOINT [--seconds-of-churn 300] [--seed N]
//! [--no-scale] [--in-flight N]`
//!
//! Not in real time: it performs the interval's writes as fast as etcd takes
//! them, each the way the API server writes (one guarded transaction per
//! object), then compacts as the API server does. Per 300 seconds, on the
//! reference database (190,000 keys, 1.28 GB: issue 25's "about 4,300 writes
//! and 800 deletes"):
//!
//! - 1,200 pod status updates: existing pods rewritten by the kubelet
//!   (`k8s_objects::pod_status_update`: conditions, container statuses,
//!   resourceVersion), each pod at most once, guarded on its mod revision;
//! - 2,300 lease renewals: existing leases renewed every 10 s (30 times per
//!   300 s; as many leases as that takes), `spec.renewTime` moved;
//! - 800 events created (new `/kubernetes.io/events/...` keys, create-only
//!   transactions);
//! - 800 events expired: the oldest events (by create revision) deleted, in
//!   transactions of up to 128 keys as an expiring lease removes its events.
//!
//! Unless `--no-scale`, the counts scale with the keys under
//! `/kubernetes.io/` (relative to 190,000: a cluster with more objects has
//! more nodes and pods writing) and with `--seconds-of-churn`.
//!
//! Compaction, as kube-apiserver's compactor does it every 5 minutes: it puts
//! `compact_rev_key` and compacts to the revision it recorded at its previous
//! tick. The previous tick is the previous interval's end, which is this
//! interval's start: the tool compacts to the revision current when it
//! started. Unlike the API server it waits until etcd has applied the
//! compaction (`physical`), so the backups that follow all see the
//! interval's final database rather than one still being compacted.
//!
//! `--seed` (default: that start revision, so consecutive intervals differ)
//! picks the pods, leases and new events. At the end it prints one line:
//! `etcd-churn: <writes> writes (...), <deletes> deletes, compacted to
//! revision <R> (revision now <N>) in <s>s`.

use std::time::Instant;

use etcd_backup_tests::k8s_objects::{lease_renewal, pod_status_update, Generator, Kind, Rng};
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse,
};

const USAGE: &str =
    "usage: etcd-churn ENDPOINT [--seconds-of-churn 300] [--seed N] [--no-scale] [--in-flight N]";
/// The keys of the database the issue measured.
const REFERENCE_KEYS: f64 = 190_000.0;
/// Per 300 s on it: pod status updates, lease renewals, events created,
/// events expired.
const REFERENCE: [f64; 4] = [1200.0, 2300.0, 800.0, 800.0];
/// How often a lease is renewed (a kubelet's node lease: every 10 s).
const LEASE_PERIOD_SECS: u64 = 10;
/// Keys per range request when listing (well under gRPC's 4 MiB answers).
const LIST_PAGE: i64 = 5000;
/// The API server's storage prefix, as etcd-fill writes it.
const PREFIX: &str = "/kubernetes.io/";
/// kube-apiserver's compactor key.
const COMPACT_REV_KEY: &str = "compact_rev_key";

struct Args {
    endpoint: String,
    seconds: u64,
    seed: Option<u64>,
    scale: bool,
    in_flight: usize,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut positional = Vec::new();
    let (mut seconds, mut seed, mut scale, mut in_flight) = (300u64, None, true, 16usize);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or_else(|| format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name} {v}: not a whole number"))
        };
        match a.as_str() {
            "--seconds-of-churn" => {
                seconds = number("--seconds-of-churn")?;
                if seconds == 0 {
                    return Err("--seconds-of-churn 0: must be at least 1".into());
                }
            }
            "--seed" => seed = Some(number("--seed")?),
            "--no-scale" => scale = false,
            "--in-flight" => {
                in_flight = usize::try_from(number("--in-flight")?)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--in-flight: must be a positive number")?;
            }
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ => positional.push(a.clone()),
        }
    }
    let [endpoint] = positional.as_slice() else {
        return Err("ENDPOINT is required (and nothing else without a flag)".into());
    };
    Ok(Args {
        endpoint: endpoint.clone(),
        seconds,
        seed,
        scale,
        in_flight,
    })
}

/// A key as a keys-only listing gives it.
struct Listed {
    key: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// Every key under `prefix`, keys only, page by page.
async fn list(kv: &mut KvClient, prefix: &str) -> Result<Vec<Listed>, String> {
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut out = Vec::new();
    loop {
        let resp = kv
            .get(
                from.clone(),
                Some(
                    GetOptions::new()
                        .with_range(end.clone())
                        .with_keys_only()
                        .with_limit(LIST_PAGE),
                ),
            )
            .await
            .map_err(|e| format!("listing {prefix} failed: {e}"))?;
        for kv in resp.kvs() {
            out.push(Listed {
                key: kv.key().to_vec(),
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
            });
        }
        match (resp.more(), out.last()) {
            (true, Some(last)) => {
                from = last.key.clone();
                from.push(0);
            }
            _ => return Ok(out),
        }
    }
}

/// `n` distinct indexes below `len` (all of them when `n >= len`), in a
/// seeded random order.
fn pick(rng: &mut Rng, len: usize, n: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..len).collect();
    let n = n.min(len);
    for i in 0..n {
        let j = i + (rng.next_u64() % (len - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

/// The revision a response header carries.
fn revision(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map_or(0, |h| h.revision())
}

/// Runs `tasks` at most `in_flight` at a time; the first error ends it.
async fn run_all<F>(in_flight: usize, tasks: Vec<F>) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for t in tasks {
        if set.len() >= in_flight {
            if let Some(r) = set.join_next().await {
                r.map_err(|e| format!("a task failed: {e}"))??;
            }
        }
        set.spawn(t);
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| format!("a task failed: {e}"))??;
    }
    Ok(())
}

/// A guarded update, the API server's way: put `value` only if the key is
/// still at `mod_revision`. Gives the revision of the write.
async fn guarded_put(
    kv: &mut KvClient,
    key: Vec<u8>,
    mod_revision: i64,
    value: Vec<u8>,
) -> Result<i64, String> {
    let resp = kv
        .txn(
            Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then([TxnOp::put(key.clone(), value, None)]),
        )
        .await
        .map_err(|e| format!("updating {} failed: {e}", String::from_utf8_lossy(&key)))?;
    if !resp.succeeded() {
        return Err(format!(
            "{} changed under this tool (mod revision no longer {mod_revision}): is something else writing to this etcd?",
            String::from_utf8_lossy(&key)
        ));
    }
    Ok(revision(resp.header()))
}

fn not_k8s(key: &[u8]) -> String {
    format!(
        "{}: not an object etcd-fill --kind k8s wrote (fill this etcd with `etcd-fill ENDPOINT MIB --kind k8s` first)",
        String::from_utf8_lossy(key)
    )
}

async fn churn(args: Args) -> Result<String, String> {
    let start = Instant::now();
    let client = Client::connect([args.endpoint.as_str()], None)
        .await
        .map_err(|e| format!("cannot connect to etcd at {}: {e}", args.endpoint))?;
    let mut kv = client.kv_client();
    let total = kv
        .get(
            PREFIX,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .map_err(|e| format!("counting the keys under {PREFIX} failed: {e}"))?;
    let start_revision = revision(total.header());
    let keys = total.count();
    let factor = if args.scale {
        keys as f64 / REFERENCE_KEYS
    } else {
        1.0
    } * args.seconds as f64
        / 300.0;
    let [pod_n, renew_n, create_n, expire_n] =
        REFERENCE.map(|n| ((n * factor).round() as usize).max(1));
    let pods = list(&mut kv, &format!("{PREFIX}pods/")).await?;
    let leases = list(&mut kv, &format!("{PREFIX}leases/")).await?;
    let mut events = list(&mut kv, &format!("{PREFIX}events/")).await?;
    if pods.is_empty() || leases.is_empty() {
        return Err(format!(
            "no pods or no leases under {PREFIX} at {}: fill this etcd with `etcd-fill ENDPOINT MIB --kind k8s` first",
            args.endpoint
        ));
    }
    let seed = args.seed.unwrap_or(start_revision as u64);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // The cluster's "now": after the fill's objects, later each interval.
    let now = 1_764_000_000 + start_revision as u64;
    let mut rv = 1_000_000_000 + start_revision as u64 * 100_000;

    // Pod status updates: read each chosen pod, rewrite its status.
    let chosen = pick(&mut rng, pods.len(), pod_n);
    let mut updates = Vec::with_capacity(chosen.len());
    for batch in chosen.chunks(64) {
        let ops: Vec<TxnOp> = batch
            .iter()
            .map(|i| TxnOp::get(pods[*i].key.clone(), None))
            .collect();
        let resp = kv
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| format!("reading pods failed: {e}"))?;
        for (i, r) in batch.iter().zip(resp.op_responses()) {
            let TxnOpResponse::Get(g) = r else {
                return Err("etcd answered a get with something else".into());
            };
            let p = &pods[*i];
            let Some(current) = g.kvs().first() else {
                return Err(format!(
                    "{} vanished while this tool ran: is something else writing to this etcd?",
                    String::from_utf8_lossy(&p.key)
                ));
            };
            rv += 1;
            let value = pod_status_update(current.value(), now + rng.next_u64() % 300, rv)
                .ok_or_else(|| not_k8s(&p.key))?;
            updates.push((p.key.clone(), current.mod_revision(), value));
        }
    }
    let pod_updates = updates.len();
    run_all(
        args.in_flight,
        updates
            .into_iter()
            .map(|(key, m, value)| {
                let mut kv = client.kv_client();
                async move { guarded_put(&mut kv, key, m, value).await.map(|_| ()) }
            })
            .collect(),
    )
    .await?;

    // Lease renewals: each chosen lease renewed every LEASE_PERIOD_SECS.
    let rounds = (args.seconds / LEASE_PERIOD_SECS).max(1) as usize;
    let holders = pick(&mut rng, leases.len(), renew_n.div_ceil(rounds));
    let mut renewals = 0usize;
    let mut lease_tasks = Vec::new();
    for (n, i) in holders.iter().enumerate() {
        let times = renew_n / holders.len() + usize::from(n < renew_n % holders.len());
        renewals += times;
        let key = leases[*i].key.clone();
        let mut kv = client.kv_client();
        let first_rv = rv + (n * rounds * 2) as u64;
        lease_tasks.push(async move {
            let got = kv
                .get(key.clone(), None)
                .await
                .map_err(|e| format!("reading {} failed: {e}", String::from_utf8_lossy(&key)))?;
            let current = got.kvs().first().ok_or_else(|| {
                format!(
                    "{} vanished while this tool ran",
                    String::from_utf8_lossy(&key)
                )
            })?;
            let (mut value, mut m) = (current.value().to_vec(), current.mod_revision());
            for t in 0..times {
                value = lease_renewal(
                    &value,
                    now + (t as u64) * LEASE_PERIOD_SECS,
                    first_rv + t as u64,
                )
                .ok_or_else(|| not_k8s(&key))?;
                m = guarded_put(&mut kv, key.clone(), m, value.clone()).await?;
            }
            Ok::<(), String>(())
        });
    }
    run_all(args.in_flight, lease_tasks).await?;

    // Events created: new keys, create-only as the API server creates.
    let mut generator = Generator::new(seed ^ 0xE7E7_E7E7);
    let mut creates = Vec::with_capacity(create_n);
    for _ in 0..create_n {
        let o = generator.object(Kind::Event);
        let mut kv = client.kv_client();
        creates.push(async move {
            let resp = kv
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(o.key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(o.key.clone(), o.value, None)]),
                )
                .await
                .map_err(|e| format!("creating {} failed: {e}", o.key))?;
            if resp.succeeded() {
                Ok::<(), String>(())
            } else {
                Err(format!("{} exists already (--seed used twice?)", o.key))
            }
        });
    }
    run_all(args.in_flight, creates).await?;

    // Events expired: the oldest ones, a lease's worth per transaction.
    events.sort_by_key(|e| (e.create_revision, e.mod_revision));
    let expired: Vec<Vec<u8>> = events.into_iter().take(expire_n).map(|e| e.key).collect();
    let deletes = expired.len();
    for batch in expired.chunks(128) {
        let ops: Vec<TxnOp> = batch
            .iter()
            .map(|k| TxnOp::delete(k.clone(), None))
            .collect();
        kv.txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| format!("deleting expired events failed: {e}"))?;
    }

    // kube-apiserver's compactor tick: record, then compact to the revision
    // of the previous tick (this interval's start).
    let tick = kv
        .put(COMPACT_REV_KEY, start_revision.to_string(), None)
        .await
        .map_err(|e| format!("writing {COMPACT_REV_KEY} failed: {e}"))?;
    let now_revision = revision(tick.header());
    kv.compact(
        start_revision,
        Some(CompactionOptions::new().with_physical()),
    )
    .await
    .map_err(|e| format!("compacting to revision {start_revision} failed: {e}"))?;
    let writes = pod_updates + renewals + create_n + 1;
    Ok(format!(
        "etcd-churn: {writes} writes ({pod_updates} pod status updates, {renewals} lease renewals of {} leases, {create_n} events created, 1 {COMPACT_REV_KEY}), {deletes} deletes (expired events), compacted to revision {start_revision} (revision now {now_revision}) in {:.1}s; {keys} keys, {:.0} s of churn{}",
        holders.len(),
        start.elapsed().as_secs_f64(),
        args.seconds,
        if args.scale {
            format!(", counts scaled by {factor:.3}")
        } else {
            String::new()
        }
    ))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = parse(&args).unwrap_or_else(|e| {
        eprintln!("etcd-churn: {e}\n{USAGE}");
        std::process::exit(2);
    });
    match churn(args).await {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("etcd-churn: {e}");
            std::process::exit(1);
        }
    }
}
