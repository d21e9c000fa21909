//! Reads etcd's snapshot stream and throws it away, for `scripts/bench`: the
//! floor under every backup, how fast this member sends its snapshot when
//! nothing downstream slows it (no file, no digest, no destination).
//!
//! Usage: `snapshot-drain ENDPOINT`
//!
//! Prints `<bytes> bytes in <seconds> s: <MB/s> MB/s` on stdout.

use std::time::Instant;

use etcd_client::Client;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint] = args.as_slice() else {
        eprintln!("usage: snapshot-drain ENDPOINT");
        std::process::exit(2);
    };
    let fail = |what: &str, e: etcd_client::Error| -> ! {
        eprintln!("snapshot-drain: {what} at {endpoint}: {e}");
        std::process::exit(1);
    };
    let mut client = Client::connect([endpoint.as_str()], None)
        .await
        .unwrap_or_else(|e| fail("cannot connect to etcd", e));
    let start = Instant::now();
    let mut stream = client
        .snapshot()
        .await
        .unwrap_or_else(|e| fail("Maintenance.Snapshot failed", e));
    let mut total = 0u64;
    while let Some(msg) = stream
        .message()
        .await
        .unwrap_or_else(|e| fail("the snapshot stream broke", e))
    {
        total += msg.blob().len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    if total == 0 {
        eprintln!("snapshot-drain: etcd at {endpoint} sent an empty snapshot");
        std::process::exit(1);
    }
    println!(
        "{total} bytes in {secs:.3} s: {:.0} MB/s",
        total as f64 / secs / 1e6
    );
}
