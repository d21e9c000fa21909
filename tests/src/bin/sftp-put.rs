//! Uploads one local file through the agent's own SFTP destination, for
//! `scripts/bench`: the agent's SFTP throughput alone, without etcd in front,
//! to set beside OpenSSH's `sftp put` of the same file.
//!
//! Usage: `sftp-put HOST PORT USER KNOWN_HOSTS PRIVATE_KEY FILE REMOTE_DIR
//! [STREAMS [connections|channels]]`: STREAMS is `destination.sftp.streams`
//! (default 1, one session, as before striping); the last word says how the
//! sessions of a striped upload reach the server (default: connections).
//! With `SFTP_PUT_READ_BACK=1` in the environment the file is then read
//! back the way `verify` reads it, and that speed printed too.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use etcd_backup_agent::config::{HostKeyCheck, SftpAuth, SftpConfig};
use etcd_backup_agent::store::destination::{Destination, SftpDir, StripeOver};
use tokio::io::AsyncReadExt;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !(8..=10).contains(&args.len()) {
        eprintln!("usage: sftp-put HOST PORT USER KNOWN_HOSTS PRIVATE_KEY FILE REMOTE_DIR [STREAMS [connections|channels]]");
        std::process::exit(2);
    }
    let streams: u32 = args.get(8).map_or(1, |s| s.parse().expect("STREAMS"));
    let over = match args.get(9).map(String::as_str) {
        None | Some("connections") => StripeOver::Connections,
        Some("channels") => StripeOver::Channels,
        Some(other) => {
            eprintln!("sftp-put: {other:?} is neither connections nor channels");
            std::process::exit(2);
        }
    };
    let config = SftpConfig {
        host: args[1].clone(),
        port: args[2].parse().expect("port"),
        user: args[3].clone(),
        path: args[7].clone(),
        host_key: HostKeyCheck::KnownHosts(PathBuf::from(&args[4])),
        auth: SftpAuth::PrivateKey {
            key_file: PathBuf::from(&args[5]),
            passphrase_file: None,
        },
        connect_timeout: Duration::from_secs(10),
        io_timeout: Duration::from_secs(60),
        require_fsync: true,
        streams,
    };
    let file = PathBuf::from(&args[6]);
    // The same runtime shape as the agent's.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dest = SftpDir::new(config).stripe_over(over);
        let mut input = tokio::fs::File::open(&file).await.expect("open input");
        let start = Instant::now();
        let mut up = dest
            .create("sftp-put.bin")
            .await
            .expect("create remote file");
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = input.read(&mut buf).await.expect("read input");
            if n == 0 {
                break;
            }
            up.write(&buf[..n]).await.expect("upload");
            total += n as u64;
        }
        let stored = up.finish().await.expect("finish upload");
        assert_eq!(stored, total);
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{total} bytes in {secs:.3} s: {:.0} MB/s",
            total as f64 / secs / 1e6
        );
        if std::env::var_os("SFTP_PUT_READ_BACK").is_some_and(|v| v == "1") {
            let start = Instant::now();
            let mut back = dest.open("sftp-put.bin").await.expect("open remote file");
            let mut read = 0u64;
            loop {
                let n = back.read(&mut buf).await.expect("read back");
                if n == 0 {
                    break;
                }
                read += n as u64;
            }
            assert_eq!(read, total, "read back as many bytes as were written");
            let secs = start.elapsed().as_secs_f64();
            println!(
                "read back {read} bytes in {secs:.3} s: {:.0} MB/s",
                read as f64 / secs / 1e6
            );
        }
    });
}
