//! Uploads one local file through the agent's own SFTP destination, for
//! `scripts/bench`: the agent's SFTP throughput alone, without etcd in front,
//! to set beside OpenSSH's `sftp put` of the same file.
//!
//! Usage: `sftp-put HOST PORT USER KNOWN_HOSTS PRIVATE_KEY FILE REMOTE_DIR`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use etcd_backup_agent::config::{HostKeyCheck, SftpAuth, SftpConfig};
use etcd_backup_agent::store::destination::{Destination, SftpDir};
use tokio::io::AsyncReadExt;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 8 {
        eprintln!("usage: sftp-put HOST PORT USER KNOWN_HOSTS PRIVATE_KEY FILE REMOTE_DIR");
        std::process::exit(2);
    }
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
    };
    let file = PathBuf::from(&args[6]);
    // The same runtime shape as the agent's.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dest = SftpDir::new(config);
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
    });
}
