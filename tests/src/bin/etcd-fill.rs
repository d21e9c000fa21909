//! Fills an etcd member with Kubernetes-like objects until the values add up to
//! a given size, for `scripts/bench`.
//!
//! Usage: `etcd-fill ENDPOINT MIB`
//!
//! Keys look like `/kubernetes.io/<resource>/<namespace>/<name>`; values are
//! JSON-shaped text of 2–64 KiB with pseudo-random content (so neither etcd
//! nor gzip can make them vanish), written 16 at a time.

use std::time::Instant;

use etcd_client::Client;

const RESOURCES: [&str; 6] = [
    "secrets",
    "configmaps",
    "pods",
    "deployments",
    "events",
    "leases",
];
const IN_FLIGHT: usize = 16;

/// xorshift64*: deterministic, fast, good enough for filler.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn object(rng: &mut Rng, kind: &str, ns: &str, name: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let size = 2048 + (rng.next() % (62 * 1024)) as usize;
    let mut v = format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"{kind}\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"{ns}\",\"uid\":\"{:016x}\"}},\"data\":{{\"payload\":\"",
        rng.next()
    )
    .into_bytes();
    while v.len() < size {
        let r = rng.next();
        for i in 0..8 {
            v.push(ALPHABET[((r >> (i * 6)) & 63) as usize]);
        }
    }
    v.extend_from_slice(b"\"}}");
    v
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: etcd-fill ENDPOINT MIB");
        std::process::exit(2);
    }
    let endpoint = args[1].clone();
    let target: u64 = args[2].parse::<u64>().expect("MIB must be a number") << 20;
    let client = Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect to etcd");
    let start = Instant::now();
    let mut written = 0u64;
    let mut keys = 0u64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut tasks = tokio::task::JoinSet::new();
    while written < target {
        let kind = RESOURCES[(keys % RESOURCES.len() as u64) as usize];
        let ns = format!("namespace-{}", keys % 97);
        let name = format!("{kind}-{keys:08}");
        let value = object(&mut rng, kind, &ns, &name);
        written += value.len() as u64;
        keys += 1;
        let mut kv = client.kv_client();
        let key = format!("/kubernetes.io/{kind}/{ns}/{name}");
        if tasks.len() >= IN_FLIGHT {
            tasks.join_next().await.expect("task").expect("put");
        }
        tasks.spawn(async move {
            kv.put(key, value, None).await.map(|_| ()).expect("put");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("put");
    }
    eprintln!(
        "etcd-fill: {keys} keys, {} MiB of values in {:.1}s",
        written >> 20,
        start.elapsed().as_secs_f64()
    );
}
