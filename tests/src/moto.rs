//! A throwaway moto S3 server: a second S3 implementation besides Garage,
//! one that honours `If-None-Match: *` on PutObject and on
//! CompleteMultipartUpload (Garage ignores it on both), so a create sent
//! twice is refused the second time with 412, as AWS does.
//!
//! moto's server comes from PyPI, pinned, in `/opt/moto` (scripts/test:
//! `ensure_moto` in scripts/lib/common.sh). It accepts any key; the bucket
//! [`BUCKET`] is created on start.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{free_port, wait_for};

/// The moto release scripts/test installs.
pub const MOTO_VERSION: &str = "5.2.6";

/// The bucket created on start.
pub const BUCKET: &str = "etcd-backups";

/// A running moto server on 127.0.0.1; killed on drop.
pub struct MotoServer {
    /// Where it listens.
    pub port: u16,
    /// A 0600 file holding an access key id (moto takes any).
    pub access_key_id_file: PathBuf,
    /// A 0600 file holding a secret access key (moto takes any).
    pub secret_access_key_file: PathBuf,
    child: Child,
    dir: TempDir,
}

/// moto's server from its venv; a panic naming the script that installs it.
fn moto_server() -> PathBuf {
    let bin = Path::new("/opt/moto/bin/moto_server");
    assert!(
        bin.is_file(),
        "{} is missing: scripts/test installs moto[server]=={MOTO_VERSION} there (ensure_moto in scripts/lib/common.sh)",
        bin.display()
    );
    bin.to_path_buf()
}

/// Sends one plain HTTP request; the answer's status line.
fn http(port: u16, request: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    text.lines().next().map(str::to_string)
}

impl MotoServer {
    /// Starts moto on a free loopback port, waits until it answers, and
    /// creates [`BUCKET`]. Panics with its log if it does not come up in 30 s.
    pub fn start() -> Self {
        let bin = moto_server();
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto log");
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start moto_server");
        let write_secret = |name: &str, value: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, value).expect("write key file");
            std::fs::set_permissions(
                &p,
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
            )
            .expect("chmod key file");
            p
        };
        let server = Self {
            port,
            access_key_id_file: write_secret("access_key_id", "AKIAMOTOTEST"),
            secret_access_key_file: write_secret("secret_access_key", "moto-test-secret"),
            child,
            dir,
        };
        let create = format!(
            "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let status = wait_for("moto to answer", Duration::from_secs(30), || {
            http(port, &create)
        });
        assert!(
            status.contains(" 200"),
            "moto refused to create the bucket: {status}\n{}",
            server.log()
        );
        server
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// moto's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// The keys of the objects in [`BUCKET`] below `prefix/`, relative to
    /// it, sorted; and the keys of multipart uploads still open.
    pub fn objects_and_uploads(&self, prefix: &str) -> (Vec<String>, Vec<String>) {
        let get = |query: &str| {
            let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect moto");
            s.write_all(
                format!(
                    "GET /{BUCKET}?{query} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                    self.port
                )
                .as_bytes(),
            )
            .expect("ask moto");
            let mut answer = String::new();
            s.read_to_string(&mut answer).expect("read moto");
            answer
        };
        let keys = |xml: &str| -> Vec<String> {
            xml.split("<Key>")
                .skip(1)
                .filter_map(|k| k.split("</Key>").next())
                .filter_map(|k| k.strip_prefix(&format!("{prefix}/")))
                .map(str::to_string)
                .collect()
        };
        let mut objects = keys(&get(&format!("list-type=2&prefix={prefix}/")));
        objects.sort();
        let uploads = keys(&get(&format!("uploads&prefix={prefix}/")));
        (objects, uploads)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
