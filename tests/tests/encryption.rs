//! Client-side encryption: sets encrypted with age to age and SSH recipients
//! decrypt with the reference `age` tool to byte-identical plaintext that the
//! real etcdctl restores; `verify` checks ciphertext without a key and
//! plaintext with one; `fetch`, `restore` and `drill` decrypt with
//! `--identity`; a wrong or missing identity is a clear error that leaves no
//! output file.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use etcd_backup_proto::{FileKind, Manifest};
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig, AgentRun};
use etcd_backup_tests::etcd::{
    dump, restore_and_start, snapshot_status, write_history, EtcdServer, EtcdVersion,
};
use etcd_backup_tests::fixtures::{openshift_tree, tar_gz_entries};
use etcd_backup_tests::sshd::{ClientKey, KeyKind};
use etcd_backup_tests::{assert_cluster_restore_dir, complete_sets, files_below, require_tool};

/// An age key pair made by the reference `age-keygen`.
struct AgeKey {
    identity: PathBuf,
    public: String,
}

fn age_keygen(dir: &Path, name: &str) -> AgeKey {
    require_tool("age-keygen", "age");
    let identity = dir.join(name);
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&identity)
        .output()
        .expect("run age-keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(&identity)
        .output()
        .expect("run age-keygen -y");
    assert!(out.status.success());
    AgeKey {
        identity,
        public: String::from_utf8(out.stdout).unwrap().trim().to_string(),
    }
}

/// `age -d -i identity file`: the plaintext, or the tool's error.
fn age_decrypt(identity: &Path, file: &Path) -> Result<Vec<u8>, String> {
    require_tool("age", "age");
    let out = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg(file)
        .output()
        .expect("run age -d");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

struct Fixture {
    _etcd: EtcdServer,
    work: tempfile::TempDir,
    config: PathBuf,
    set_dir: PathBuf,
    manifest: Manifest,
    age: AgeKey,
    ed25519: ClientKey,
    rsa: ClientKey,
    expected_tar: Vec<String>,
    keyspace: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Fixture {
    fn config(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn file(&self, kind: FileKind) -> PathBuf {
        self.set_dir.join(&self.manifest.file(kind).unwrap().name)
    }

    fn run(&self, args: &[&str]) -> AgentRun {
        let mut all = vec![args[0], "--config", self.config()];
        all.extend_from_slice(&args[1..]);
        run_agent(&all)
    }

    /// `args` with `--identity key`.
    fn run_with_identity(&self, args: &[&str], key: &Path) -> AgentRun {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--identity", key.to_str().unwrap()]);
        self.run(&all)
    }

    /// `restore <source…> --data-dir DIR` as member `m0` on `peer_port`, plus `extra`.
    fn restore(
        &self,
        source: &[&str],
        data_dir: &Path,
        peer_port: u16,
        extra: &[&str],
    ) -> AgentRun {
        let peer = format!("http://127.0.0.1:{peer_port}");
        let cluster = format!("m0={peer}");
        let mut args = vec!["restore"];
        args.extend_from_slice(source);
        args.extend_from_slice(&[
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--name",
            "m0",
            "--initial-cluster",
            &cluster,
            "--initial-advertise-peer-urls",
            &peer,
        ]);
        args.extend_from_slice(EtcdVersion::from_env().restore_args());
        args.extend_from_slice(extra);
        self.run(&args)
    }
}

/// A real etcd with history, an OpenShift tree, and one encrypted backup to an
/// age key and an SSH ed25519 key (in the config) and an SSH RSA key (in a
/// recipients file with comments).
async fn encrypted_set() -> Fixture {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/secrets/kube-system", 300).await;
    client
        .put("/registry/big", vec![b's'; 300_000], None)
        .await
        .unwrap();
    let keyspace = dump(&mut client).await;

    let work = tempfile::tempdir().unwrap();
    let age = age_keygen(work.path(), "age-key.txt");
    let ed25519 = ClientKey::generate(KeyKind::Ed25519, None);
    let rsa = ClientKey::generate(KeyKind::Rsa, None);
    let recipients_file = work.path().join("recipients.txt");
    std::fs::write(
        &recipients_file,
        format!("# break-glass key, kept offline\n\n{}\n", rsa.public_line),
    )
    .unwrap();

    let root = work.path().join("etc-kubernetes");
    std::fs::create_dir_all(&root).unwrap();
    let expected_tar = openshift_tree(&root);
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.layout = "openshift".into();
    cfg.root = Some(root);
    cfg.extra = format!(
        "encryption:\n  recipients:\n    - {}\n    - {}\n  recipients_file: {}\n",
        age.public,
        ed25519.public_line,
        recipients_file.display()
    );
    let config = cfg.write(work.path());
    let run = backup(&config);
    run.assert_code(0);
    let sets = complete_sets(&dest);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&dest));
    let set_dir = dest.join(&sets[0]);
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(set_dir.join("manifest.json")).unwrap()).unwrap();
    Fixture {
        _etcd: etcd,
        work,
        config,
        set_dir,
        manifest,
        age,
        ed25519,
        rsa,
        expected_tar,
        keyspace,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_sets_decrypt_with_the_age_tool_to_the_exact_plaintext_and_restore() {
    let f = encrypted_set().await;
    let m = &f.manifest;
    let ts = m.timestamp;

    // Only ciphertext was stored, under .age names; the manifest says so.
    let mut stored: Vec<String> = std::fs::read_dir(&f.set_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    stored.sort();
    let mut want = vec![
        "manifest.json".to_string(),
        format!("{}.age", ts.snapshot_file_name()),
        format!("{}.age", ts.resources_file_name()),
    ];
    want.sort();
    assert_eq!(stored, want);
    assert_eq!(m.format_version, 2);
    let enc = m.encryption.as_ref().expect("encryption recorded");
    assert_eq!(enc.scheme, "age");
    assert_eq!(enc.recipients.len(), 3, "{:?}", enc.recipients);
    assert_eq!(enc.recipients[0], f.age.public);
    assert!(enc.recipients[1].starts_with("ssh-ed25519 "));
    assert!(enc.recipients[2].starts_with("ssh-rsa "));

    let mut plaintexts = Vec::new();
    for entry in &m.files {
        let path = f.set_dir.join(&entry.name);
        let cipher = std::fs::read(&path).unwrap();
        assert!(
            cipher.starts_with(b"age-encryption.org/v1\n"),
            "{}",
            entry.name
        );
        assert_eq!(cipher.len() as u64, entry.size);
        assert_eq!(sha256_hex(&cipher), entry.sha256);
        let plain_entry = entry.plaintext.as_ref().expect("plaintext recorded");
        // The reference tool decrypts with each recipient's private key to the
        // same bytes, whose size and hash the manifest recorded.
        let with_age = age_decrypt(&f.age.identity, &path).unwrap();
        assert_eq!(with_age.len() as u64, plain_entry.size);
        assert_eq!(sha256_hex(&with_age), plain_entry.sha256);
        for key in [&f.ed25519.private_key, &f.rsa.private_key] {
            let other = age_decrypt(key, &path).unwrap();
            assert!(other == with_age, "{} with {}", entry.name, key.display());
        }
        let out = f.work.path().join(&plain_entry.name);
        std::fs::write(&out, &with_age).unwrap();
        plaintexts.push((entry.kind, out, with_age));
    }

    // The plaintext is a real snapshot with the recorded status, and the
    // real tar of the node's files.
    let (_, snap, _) = plaintexts
        .iter()
        .find(|p| p.0 == FileKind::Snapshot)
        .unwrap();
    let status = snapshot_status(snap);
    let recorded = m.snapshot_status.unwrap();
    assert_eq!(status["hash"].as_u64().unwrap(), u64::from(recorded.hash));
    assert_eq!(status["revision"].as_i64().unwrap(), recorded.revision);
    let (_, tar, _) = plaintexts
        .iter()
        .find(|p| p.0 == FileKind::Resources)
        .unwrap();
    let mut entries: Vec<String> = tar_gz_entries(tar).into_iter().map(|e| e.path).collect();
    entries.sort();
    assert_eq!(entries, f.expected_tar);

    // Restored with the real etcdctl, it serves the keyspace that was backed up.
    let restored = restore_and_start(snap, &f.work.path().join("by-hand"));
    assert_eq!(dump(&mut restored.client().await).await, f.keyspace);
    drop(restored);

    // list shows the set as encrypted.
    let run = f.run(&["list", "-o", "json"]);
    run.assert_code(0);
    let list: etcd_backup_proto::api::SetList = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(list.sets.len(), 1);
    assert!(list.sets[0].encrypted);

    // verify: the ciphertext without a key; everything with one.
    let run = f.run(&["verify", "latest"]);
    run.assert_code(0);
    assert!(
        run.stdout.contains("checking the stored ciphertext only"),
        "{}",
        run.stdout
    );
    for key in [&f.age.identity, &f.ed25519.private_key, &f.rsa.private_key] {
        let run = f.run_with_identity(&["verify", "latest"], key);
        run.assert_code(0);
        assert_eq!(
            run.stdout.matches("decrypted and checked").count(),
            2,
            "{}",
            run.stdout
        );
    }

    // fetch --identity writes the plaintext in the cluster-restore.sh layout,
    // byte-identical to what the age tool gives.
    let out = f.work.path().join("fetched");
    let run = f.run_with_identity(
        &["fetch", "latest", "--to", out.to_str().unwrap()],
        &f.ed25519.private_key,
    );
    run.assert_code(0);
    assert_cluster_restore_dir(&run.stdout, &out, &ts);
    for (_, path, bytes) in &plaintexts {
        let name = path.file_name().unwrap();
        assert!(std::fs::read(out.join(name)).unwrap() == *bytes, "{name:?}");
    }
    // Without one, it hands over the ciphertext as stored, and says the
    // directory is not one for cluster-restore.sh.
    let out = f.work.path().join("fetched-sealed");
    let run = f.run(&["fetch", "latest", "--to", out.to_str().unwrap()]);
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!(
            "{} is not a cluster-restore.sh directory while the files are encrypted",
            out.display()
        )),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("is a cluster-restore.sh directory"),
        "{}",
        run.stdout
    );
    for entry in &m.files {
        assert!(
            std::fs::read(out.join(&entry.name)).unwrap()
                == std::fs::read(f.set_dir.join(&entry.name)).unwrap()
        );
    }

    // restore --identity and drill --identity go through the real etcdctl.
    let data_dir = f.work.path().join("restored-member");
    let port = etcd_backup_tests::free_port();
    let run = f.restore(
        &["latest"],
        &data_dir,
        port,
        &["--identity", f.age.identity.to_str().unwrap()],
    );
    run.assert_code(0);
    let member = EtcdServer::start_on(data_dir, "m0", port);
    assert_eq!(dump(&mut member.client().await).await, f.keyspace);
    let run = f.run_with_identity(&["drill"], &f.rsa.private_key);
    run.assert_code(0);
    assert!(run.stdout.contains("drill passed"), "{}", run.stdout);

    // With encryption.identity_file (what scheduled drills use), no flag is needed.
    let text = std::fs::read_to_string(&f.config).unwrap();
    assert!(
        text.trim_end().ends_with(".txt"),
        "encryption is the last section:\n{text}"
    );
    let with_identity = f.work.path().join("with-identity.yaml");
    std::fs::write(
        &with_identity,
        format!("{text}  identity_file: {}\n", f.age.identity.display()),
    )
    .unwrap();
    let run = run_agent(&["drill", "--config", with_identity.to_str().unwrap()]);
    run.assert_code(0);
    assert!(run.stdout.contains("drill passed"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_or_missing_identity_is_a_clear_error_that_leaves_no_output() {
    let f = encrypted_set().await;
    let other = age_keygen(f.work.path(), "not-a-recipient.txt");
    let other_ssh = ClientKey::generate(KeyKind::Ed25519, None);

    for wrong in [&other.identity, &other_ssh.private_key] {
        let run = f.run_with_identity(&["verify", "latest"], wrong);
        run.assert_code(1);
        assert!(
            run.stderr.contains("can decrypt this set"),
            "{}",
            run.stderr
        );
        assert!(
            run.stderr.contains(&f.age.public),
            "names the recipients: {}",
            run.stderr
        );

        let out = f.work.path().join("wrong-fetch");
        let run = f.run_with_identity(&["fetch", "latest", "--to", out.to_str().unwrap()], wrong);
        run.assert_code(1);
        assert!(
            run.stderr.contains("can decrypt this set"),
            "{}",
            run.stderr
        );
        assert_eq!(files_below(&out), Vec::<String>::new(), "no output file");

        let data_dir = f.work.path().join("wrong-restore");
        let run = f.restore(
            &["latest"],
            &data_dir,
            2380,
            &["--identity", wrong.to_str().unwrap()],
        );
        run.assert_code(1);
        assert!(!data_dir.exists(), "a failed restore leaves no data dir");
        let beside: Vec<String> = files_below(f.work.path())
            .into_iter()
            .filter(|p| p.contains(".etcd-backup-fetch-"))
            .collect();
        assert!(beside.is_empty(), "temporary files left: {beside:?}");
    }

    // No identity at all: restore refuses before fetching anything.
    let data_dir = f.work.path().join("no-identity");
    let run = f.restore(&["latest"], &data_dir, 2380, &[]);
    run.assert_code(2);
    assert!(run.stderr.contains("is encrypted to"), "{}", run.stderr);
    assert!(run.stderr.contains("--identity FILE"), "{}", run.stderr);
    assert!(!data_dir.exists());
    let run = f.run(&["drill"]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("encryption.identity_file"),
        "{}",
        run.stderr
    );

    // An identity file that holds no key, or a public key, is named as such.
    let junk = f.work.path().join("junk.txt");
    std::fs::write(&junk, "hello\n").unwrap();
    for bad in [junk.as_path(), f.ed25519.public_key.as_path()] {
        let run = f.run_with_identity(&["verify", "latest"], bad);
        run.assert_code(2);
        assert!(
            run.stderr.contains("neither an age identity file"),
            "{}",
            run.stderr
        );
    }
    let run = f.run(&["verify", "latest", "--identity", "/nonexistent/key"]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("cannot read identity file /nonexistent/key"),
        "{}",
        run.stderr
    );

    // A restore of a local .age file says how to decrypt it.
    let sealed = f.file(FileKind::Snapshot);
    let run = f.restore(
        &["--snapshot", sealed.to_str().unwrap()],
        &f.work.path().join("from-file"),
        2380,
        &[],
    );
    run.assert_code(1);
    assert!(run.stderr.contains("age-encrypted"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passphrase_protected_ssh_identity_needs_its_passphrase_file() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let key = ClientKey::generate(KeyKind::Ed25519, Some("correct horse"));
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.extra = format!("encryption:\n  recipients: [\"{}\"]\n", key.public_line);
    let config = cfg.write(work.path());
    backup(&config).assert_code(0);
    let config = config.to_str().unwrap();
    let key_path = key.private_key.to_str().unwrap();
    let verify = |passphrase: Option<&str>| {
        let file = passphrase.map(|p| {
            let f = work.path().join(format!("pass-{}", p.len()));
            std::fs::write(&f, format!("{p}\n")).unwrap();
            f
        });
        let mut args = vec![
            "verify",
            "--config",
            config,
            "latest",
            "--identity",
            key_path,
        ];
        if let Some(f) = &file {
            args.extend_from_slice(&["--identity-passphrase-file", f.to_str().unwrap()]);
        }
        run_agent(&args)
    };

    let run = verify(None);
    run.assert_code(2);
    assert!(
        run.stderr.contains("--identity-passphrase-file"),
        "{}",
        run.stderr
    );
    let run = verify(Some("battery staple"));
    run.assert_code(1);
    assert!(
        run.stderr.contains("passphrase does not unlock"),
        "{}",
        run.stderr
    );
    let run = verify(Some("correct horse"));
    run.assert_code(0);
    assert!(
        run.stdout.contains("decrypted and checked"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_ciphertext_is_found_with_and_without_a_key() {
    let f = encrypted_set().await;
    for kind in [FileKind::Snapshot, FileKind::Resources] {
        let path = f.file(kind);
        let original = std::fs::read(&path).unwrap();
        // A byte in the payload, after the header.
        let mut bytes = original.clone();
        let at = bytes.len() - 40;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();

        let run = f.run(&["verify", "latest"]);
        run.assert_code(1);
        assert!(run.stdout.contains("sha256 is"), "{}", run.stdout);
        let run = f.run_with_identity(&["verify", "latest"], &f.age.identity);
        run.assert_code(1);
        assert!(run.stdout.contains("cannot decrypt"), "{}", run.stdout);
        // The reference tool agrees the file is damaged.
        assert!(age_decrypt(&f.age.identity, &path).is_err());

        let out = f.work.path().join(format!("damaged-{kind:?}"));
        let run = f.run_with_identity(
            &["fetch", "latest", "--to", out.to_str().unwrap()],
            &f.age.identity,
        );
        run.assert_code(1);
        let name = f.manifest.file(kind).unwrap().plaintext_name().to_string();
        assert!(
            !files_below(&out).contains(&name),
            "a file that failed decryption is not kept: {:?}",
            files_below(&out)
        );
        std::fs::write(&path, &original).unwrap();
    }
    f.run_with_identity(&["verify", "latest"], &f.age.identity)
        .assert_code(0);
    // A manifest (on a less trusted server) cannot make fetch write outside
    // its directory: a plaintext name other than the stored name without .age
    // makes the set a leftover, never fetched.
    let manifest = f.set_dir.join("manifest.json");
    let original = std::fs::read_to_string(&manifest).unwrap();
    let snapshot_name = f
        .manifest
        .file(FileKind::Snapshot)
        .unwrap()
        .plaintext_name()
        .to_string();
    let evil = original.replace(
        &format!("\"name\": \"{snapshot_name}\""),
        "\"name\": \"../../evil.db\"",
    );
    assert_ne!(evil, original);
    std::fs::write(&manifest, evil).unwrap();
    let out = f.work.path().join("evil-fetch");
    let run = f.run_with_identity(
        &["fetch", "latest", "--to", out.to_str().unwrap()],
        &f.age.identity,
    );
    run.assert_code(1);
    assert!(!f.work.path().join("evil.db").exists());
    let run = f.run(&["list", "--include-partial", "-o", "json"]);
    run.assert_code(0);
    let list: etcd_backup_proto::api::SetList = serde_json::from_str(&run.stdout).unwrap();
    assert!(list.sets.is_empty());
    assert!(
        list.leftovers[0].why.contains("names its plaintext"),
        "{:?}",
        list.leftovers
    );
    std::fs::write(&manifest, original).unwrap();
}
