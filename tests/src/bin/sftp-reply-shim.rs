//! An SFTP subsystem that loses one reply: set as sshd's `Subsystem sftp`,
//! it runs the real OpenSSH `sftp-server` and passes every packet both
//! ways, except the answer to the first rename (SSH_FXP_RENAME or
//! `posix-rename@openssh.com`) whose target ends in the given suffix: the
//! server carries that rename out, and its reply never reaches the client.
//! The client's request then times out, as when a connection dies after
//! the server acted. A marker file records that the reply was dropped, so
//! later sessions (the client reconnecting to look) pass everything.
//!
//! Usage: `sftp-reply-shim <target-suffix> <marker-file> <sftp-server>`

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

const FXP_RENAME: u8 = 18;
const FXP_EXTENDED: u8 = 200;

/// Reads one SFTP packet (length, then that many bytes); `None` at EOF.
fn packet(r: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut body).ok()?;
    Some(body)
}

fn write_packet(w: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    w.write_all(&(body.len() as u32).to_be_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// The SSH string at `at` and the offset after it.
fn string(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
    let s = b.get(at + 4..at + 4 + len)?;
    Some((s, at + 4 + len))
}

/// The request id of a rename into a path ending in `suffix`.
fn rename_into(b: &[u8], suffix: &[u8]) -> Option<u32> {
    let kind = *b.first()?;
    let id = u32::from_be_bytes(b.get(1..5)?.try_into().ok()?);
    let mut at = 5;
    if kind == FXP_EXTENDED {
        let (name, next) = string(b, at)?;
        if name != b"posix-rename@openssh.com" {
            return None;
        }
        at = next;
    } else if kind != FXP_RENAME {
        return None;
    }
    let (_from, next) = string(b, at)?;
    let (to, _) = string(b, next)?;
    to.ends_with(suffix).then_some(id)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, suffix, marker, server] = args.as_slice() else {
        eprintln!("usage: sftp-reply-shim <target-suffix> <marker-file> <sftp-server>");
        std::process::exit(2);
    };
    let armed = !std::path::Path::new(marker).exists();
    let mut child = Command::new(server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sftp-server");
    let mut to_server = child.stdin.take().expect("stdin");
    let mut from_server = child.stdout.take().expect("stdout");
    // The id whose reply is to be dropped, once the rename was seen.
    let doomed: Arc<Mutex<Option<u32>>> = Arc::default();

    let watch = doomed.clone();
    let suffix = suffix.clone().into_bytes();
    let requests = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        while let Some(p) = packet(&mut stdin) {
            if armed {
                if let Some(id) = rename_into(&p, &suffix) {
                    let mut d = watch.lock().unwrap();
                    if d.is_none() {
                        *d = Some(id);
                    }
                }
            }
            if write_packet(&mut to_server, &p).is_err() {
                break;
            }
        }
    });

    let mut stdout = std::io::stdout().lock();
    let mut dropped = false;
    while let Some(p) = packet(&mut from_server) {
        let id = p
            .get(1..5)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()));
        if !dropped && id.is_some() && *doomed.lock().unwrap() == id {
            dropped = true;
            std::fs::write(marker, format!("dropped the reply to request {id:?}\n"))
                .expect("write marker");
            continue;
        }
        if write_packet(&mut stdout, &p).is_err() {
            break;
        }
    }
    let _ = requests.join();
    let _ = child.wait();
}
