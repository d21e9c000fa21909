//! A WAN link on loopback for `scripts/bench`: relays every connection to
//! TARGET with a one-way delay in each direction and an optional rate cap
//! (`etcd_backup_tests::relay`), until killed.
//!
//! Usage: `wan-relay TARGET_HOST:PORT [--delay-ms N] [--rate-mbit N] [--addr-file FILE]`
//!
//! `--delay-ms` is one way (the round trip is twice it), applied in both
//! directions; `--rate-mbit` caps each direction at N Mbit/s (10^6 bits).
//! Prints the address it listens on (`127.0.0.1:<port>`) on stdout and, with
//! `--addr-file`, writes it to FILE (written whole, then renamed into place,
//! so a reader never sees half of it).

use std::net::SocketAddr;
use std::time::Duration;

use etcd_backup_tests::relay::{Relay, RelayOptions, Shape};

const USAGE: &str =
    "usage: wan-relay TARGET_HOST:PORT [--delay-ms N] [--rate-mbit N] [--addr-file FILE]";

fn fail(msg: &str) -> ! {
    eprintln!("wan-relay: {msg}\n{USAGE}");
    std::process::exit(2);
}

fn main() {
    let mut target = None;
    let mut delay_ms = 0u64;
    let mut rate_mbit = None;
    let mut addr_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--delay-ms" => {
                let v = value();
                delay_ms = v.parse().unwrap_or_else(|_| {
                    fail(&format!("--delay-ms {v}: not a number of milliseconds"))
                });
            }
            "--rate-mbit" => {
                let v = value();
                let n: u64 = v.parse().ok().filter(|n| *n > 0).unwrap_or_else(|| {
                    fail(&format!(
                        "--rate-mbit {v}: must be a positive number of Mbit/s"
                    ))
                });
                rate_mbit = Some(n);
            }
            "--addr-file" => addr_file = Some(value()),
            s if s.starts_with("--") => fail(&format!("unknown option {s}")),
            _ if target.is_none() => {
                let t: SocketAddr = a
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("{a}: not an IP:PORT address")));
                target = Some(t);
            }
            _ => fail(&format!("unexpected argument {a}")),
        }
    }
    let target = target.unwrap_or_else(|| fail("TARGET_HOST:PORT is required"));
    let shape = Shape {
        rate: rate_mbit.map(|m| m * 1_000_000 / 8),
        delay: Duration::from_millis(delay_ms),
    };
    let relay = Relay::start(
        target,
        RelayOptions {
            up: shape,
            down: shape,
        },
    );
    let addr = relay.addr.to_string();
    if let Some(file) = addr_file {
        let tmp = format!("{file}.tmp");
        std::fs::write(&tmp, format!("{addr}\n"))
            .and_then(|()| std::fs::rename(&tmp, &file))
            .unwrap_or_else(|e| {
                eprintln!("wan-relay: cannot write {file}: {e}");
                std::process::exit(1);
            });
    }
    println!("{addr}");
    // The relay runs on its own thread; this one only keeps the process up
    // until it is killed.
    loop {
        std::thread::park();
    }
}
