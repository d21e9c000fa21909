//! Every kind of bad configuration exits 2 and names its field; nothing is
//! started and nothing is written.

use etcd_backup_tests::agent::run_agent;

fn check(yaml: &str) -> etcd_backup_tests::agent::AgentRun {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.yaml");
    std::fs::write(&p, yaml).unwrap();
    let run = run_agent(&["backup", "--config", p.to_str().unwrap()]);
    assert!(
        !dir.path().join("backups").exists(),
        "a bad config wrote a backup"
    );
    run
}

/// Runs `backup` on `yaml`: exit 2, `field` named (unless empty), `message` said.
fn exits_2_naming(yaml: &str, field: &str, message: &str) -> etcd_backup_tests::agent::AgentRun {
    let run = check(yaml);
    assert_eq!(run.code, 2, "config:\n{yaml}\nstderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("  {field}: ")) || field.is_empty(),
        "field {field} not named for config:\n{yaml}\nstderr:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(message),
        "message {message:?} missing:\n{}",
        run.stderr
    );
    run
}

fn good(dest_dir: &str) -> String {
    format!(
        "node_name: master-0\netcd:\n  endpoints: [\"http://127.0.0.1:1\"]\nresources:\n  layout: none\ndestination:\n  local:\n    path: {dest_dir}\n"
    )
}

#[test]
fn each_bad_value_exits_2_naming_its_field() {
    let base = good("/nonexistent-dir-for-config-test/backups");
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("{base}destinations:\n  - name: b\n    local:\n      path: /x\n"),
            "destinations",
            "both destination and destinations are set: use one",
        ),
        (
            base.replace(
                "destination:\n  local:\n    path: /nonexistent-dir-for-config-test/backups\n",
                "destinations:\n  - name: a\n    local:\n      path: /x\n  - name: a\n    local:\n      path: /y\n",
            ),
            "destinations[1].name",
            "names must be unique",
        ),
        (
            base.replace("http://127.0.0.1:1", "htp://x"),
            "etcd.endpoints[0]",
            "invalid URL \"htp://x\"",
        ),
        (
            base.replace("http://127.0.0.1:1", "http://127.0.0.1"),
            "etcd.endpoints[0]",
            "port",
        ),
        (
            base.replace("[\"http://127.0.0.1:1\"]", "[]"),
            "etcd.endpoints",
            "empty",
        ),
        (
            base.replace("  endpoints", "  dial_timeout: soon\n  endpoints"),
            "etcd.dial_timeout",
            "invalid duration",
        ),
        (
            base.replace("  endpoints", "  stall_timeout: 0s\n  endpoints"),
            "etcd.stall_timeout",
            "zero",
        ),
        (
            base.replace("  endpoints", "  ca_file: /nonexistent/ca.crt\n  endpoints"),
            "etcd.ca_file",
            "/nonexistent/ca.crt",
        ),
        (
            base.replace("http://", "https://"),
            "etcd.ca_file",
            "required with https",
        ),
        (
            base.replace("layout: none", "layout: windows"),
            "resources.layout",
            "expected one of openshift, kubeadm, none",
        ),
        (
            base.replace("layout: none", "layout: kubeadm\n  root: /nonexistent/k8s"),
            "resources.root",
            "/nonexistent/k8s",
        ),
        (
            base.replace("node_name: master-0", "node_name: ../up"),
            "node_name",
            "directory name",
        ),
        (
            format!("{base}cluster_name: a/b\n"),
            "cluster_name",
            "directory name",
        ),
        (
            base.replace("    path: /nonexistent-dir-for-config-test/backups\n", ""),
            "destination.local.path",
            "required",
        ),
        (
            base.replace(
                "  local:\n    path: /nonexistent-dir-for-config-test/backups\n",
                "  gcs: {}\n",
            ),
            "destination.gcs",
            "unknown field `gcs`",
        ),
        (
            base.replace(
                "  local:\n    path: /nonexistent-dir-for-config-test/backups\n",
                "  s3: {}\n",
            ),
            "destination.s3.endpoint",
            "required",
        ),
        (
            format!("{base}colour: blue\n"),
            "colour",
            "unknown field `colour`",
        ),
        (
            base.replace("  endpoints", "  endpoint: x\n  endpoints"),
            "etcd.endpoint",
            "unknown field `endpoint`",
        ),
        (
            base.replace("[\"http://127.0.0.1:1\"]", "5"),
            "etcd.endpoints",
            "invalid type",
        ),
        (
            format!("{base}log:\n  format: xml\n"),
            "log.format",
            "text or json",
        ),
        (
            format!("{base}coordination: raft\n"),
            "coordination",
            "unknown value \"raft\"; expected per_node or leader",
        ),
        (
            "etcd:\n  endpoints: [\"unclosed\n  x: {\n".to_string(),
            "",
            "line ",
        ),
    ];
    for (yaml, field, message) in cases {
        exits_2_naming(&yaml, field, message);
    }
}

#[test]
fn several_problems_are_reported_together() {
    let run = check(
        "etcd:\n  endpoints: [\"ftp://x:1\"]\n  dial_timeout: ten\nresources:\n  layout: windows\n",
    );
    assert_eq!(run.code, 2);
    for field in [
        "etcd.endpoints[0]",
        "etcd.dial_timeout",
        "resources.layout",
        "destination",
    ] {
        assert!(
            run.stderr.contains(&format!("  {field}: ")),
            "{field}:\n{}",
            run.stderr
        );
    }
}

#[test]
fn missing_config_file_and_bad_arguments_exit_2() {
    let run = run_agent(&["backup", "--config", "/nonexistent/config.yaml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("/nonexistent/config.yaml"),
        "{}",
        run.stderr
    );
    let run = run_agent(&["backup"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--config"), "{}", run.stderr);
    let run = run_agent(&["backup", "--config", "x", "--password", "hunter2"]);
    assert_eq!(run.code, 2);
    let run = run_agent(&["frobnicate"]);
    assert_eq!(run.code, 2);
}

#[test]
fn check_config_accepts_a_good_file_and_lists_problems_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.yaml");
    std::fs::write(&p, good(dir.path().join("backups").to_str().unwrap())).unwrap();
    let run = run_agent(&["check-config", "--config", p.to_str().unwrap()]);
    run.assert_code(0);
    assert!(run.stdout.contains("valid"), "{}", run.stdout);
    std::fs::write(&p, "etcd: {}\n").unwrap();
    let run = run_agent(&["check-config", "--config", p.to_str().unwrap()]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("etcd.endpoints: required"),
        "{}",
        run.stderr
    );
}

#[test]
fn json_logs_are_one_object_per_line_and_carry_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.yaml");
    let secret = dir.path().join("password");
    std::fs::write(&secret, "pa55-do-not-log\n").unwrap();
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, "").unwrap();
    let port = etcd_backup_tests::free_port();
    std::fs::write(
        &p,
        format!(
            "node_name: m\netcd:\n  endpoints: [\"http://127.0.0.1:{port}\"]\nresources:\n  layout: none\ndestination:\n  sftp:\n    host: 127.0.0.1\n    port: {port}\n    user: u\n    path: /x\n    known_hosts_file: {}\n    password_file: {}\nretry:\n  attempts: 1\nlog:\n  format: json\n  level: debug\n",
            known.display(),
            secret.display()
        ),
    )
    .unwrap();
    let run = run_agent(&["backup", "--config", p.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let json_lines: Vec<serde_json::Value> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!json_lines.is_empty(), "{}", run.stderr);
    assert!(json_lines
        .iter()
        .all(|v| v["level"].is_string() && v["timestamp"].is_string()));
    assert!(!run.stderr.contains("pa55-do-not-log"), "{}", run.stderr);
}

#[test]
fn bad_encryption_settings_exit_2_naming_the_field_and_never_echo_a_secret_key() {
    let base = good("/nonexistent-dir-for-config-test/backups");
    let dir = tempfile::tempdir().unwrap();
    let secret = "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX";
    let bad_file = dir.path().join("recipients.txt");
    std::fs::write(&bad_file, "# team\nage1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\nssh-dss AAAAB3NzaC1kc3M=\n").unwrap();
    let empty_file = dir.path().join("empty.txt");
    std::fs::write(&empty_file, "# nobody yet\n\n").unwrap();
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("{base}encryption:\n"),
            "encryption",
            "names no recipient",
        ),
        (
            format!("{base}encryption:\n  recipients: []\n"),
            "encryption",
            "names no recipient",
        ),
        (
            format!("{base}encryption:\n  recipients: [age1nope]\n"),
            "encryption.recipients[0]",
            "not a valid age public key",
        ),
        (
            format!("{base}encryption:\n  recipients: [\"{secret}\"]\n"),
            "encryption.recipients[0]",
            "age-keygen -y",
        ),
        (
            format!("{base}encryption:\n  recipients: [\"ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNuG5N87uRgg6CLrbo5wAdT/y6v0mKV0U2w0WZ2YB/++Tpockg=\"]\n"),
            "encryption.recipients[0]",
            "ssh-ed25519 or ssh-rsa",
        ),
        (
            format!("{base}encryption:\n  recipients_file: /nonexistent/recipients.txt\n"),
            "encryption.recipients_file",
            "cannot read /nonexistent/recipients.txt",
        ),
        (
            format!("{base}encryption:\n  recipients_file: {}\n", bad_file.display()),
            "encryption.recipients_file",
            "line 3:",
        ),
        (
            format!("{base}encryption:\n  recipients_file: {}\n", empty_file.display()),
            "encryption.recipients_file",
            "lists no recipient",
        ),
        (
            format!("{base}encryption:\n  recipients: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]\n  identity_file: /nonexistent/id.txt\n"),
            "encryption.identity_file",
            "/nonexistent/id.txt",
        ),
        (
            format!("{base}encryption:\n  recipient: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]\n"),
            "",
            "unknown field `recipient`",
        ),
    ];
    for (yaml, field, message) in cases {
        let run = exits_2_naming(&yaml, field, message);
        assert!(
            !run.stderr.contains(&secret[15..]),
            "a secret key was echoed:\n{}",
            run.stderr
        );
    }
}

#[test]
fn an_api_on_a_non_loopback_address_without_a_token_is_refused_unless_allowed() {
    let work = tempfile::tempdir().unwrap();
    let token = work.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let base = good(&work.path().join("backups").display().to_string());
    let remote = format!("{base}schedule: \"@daily\"\nhttp:\n  listen: 0.0.0.0:10290\n");
    for command in ["check-config", "run"] {
        let p = work.path().join("config.yaml");
        std::fs::write(&p, &remote).unwrap();
        let run = run_agent(&[command, "--config", p.to_str().unwrap()]);
        assert_eq!(run.code, 2, "{command}: {}", run.stderr);
        assert!(
            run.stderr.contains("  http.listen: 0.0.0.0:10290 is not a loopback address and http.token_file is not set"),
            "{command}: {}",
            run.stderr
        );
        assert!(
            run.stderr
                .contains("http.allow_unauthenticated_remote: true"),
            "{}",
            run.stderr
        );
    }
    for ok in [
        format!("{remote}  token_file: {}\n", token.display()),
        format!("{remote}  allow_unauthenticated_remote: true\n"),
        remote.replace("0.0.0.0", "127.0.0.1"),
        remote.replace("0.0.0.0:10290", "\"[::1]:10290\""),
    ] {
        let p = work.path().join("ok.yaml");
        std::fs::write(&p, &ok).unwrap();
        let run = run_agent(&["check-config", "--config", p.to_str().unwrap()]);
        assert_eq!(run.code, 0, "{ok}\n{}", run.stderr);
    }
}

#[test]
fn a_plain_http_s3_endpoint_is_refused_unless_encrypted_or_explicitly_allowed() {
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("key");
    std::fs::write(&key, "k\n").unwrap();
    let s3 = |indent: &str| {
        format!(
            "{indent}s3:\n{indent}  endpoint: http://store.example:3900\n{indent}  bucket: etcd-backups\n{indent}  access_key_id_file: {k}\n{indent}  secret_access_key_file: {k}\n",
            k = key.display()
        )
    };
    let head = "node_name: master-0\netcd:\n  endpoints: [\"http://127.0.0.1:1\"]\nresources:\n  layout: none\n";
    let single = format!("{head}destination:\n{}", s3("  "));
    let listed = format!(
        "{head}destinations:\n  - name: local\n    local:\n      path: {}\n  - name: store\n{}",
        work.path().join("backups").display(),
        s3("    ")
    );
    for (yaml, field) in [(&single, "destination.s3"), (&listed, "destinations[1].s3")] {
        for command in ["check-config", "backup", "run"] {
            let p = work.path().join("config.yaml");
            std::fs::write(&p, format!("{yaml}schedule: \"@daily\"\n")).unwrap();
            let run = run_agent(&[command, "--config", p.to_str().unwrap()]);
            assert_eq!(run.code, 2, "{command}: {}", run.stderr);
            for says in [
                format!("  {field}.endpoint: http://store.example:3900 is plain HTTP"),
                "every Secret of the cluster".to_string(),
                "private keys".to_string(),
                "encryption:".to_string(),
                format!("{field}.allow_plaintext_http: true"),
            ] {
                assert!(
                    run.stderr.contains(&says),
                    "{command}: {says}: {}",
                    run.stderr
                );
            }
        }
    }
    // Either way out is accepted.
    let recipients = "encryption:\n  recipients: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]\n";
    for ok in [
        format!("{single}    allow_plaintext_http: true\n"),
        format!("{listed}      allow_plaintext_http: true\n"),
        format!("{single}{recipients}"),
        format!("{listed}{recipients}"),
        single.replace("http://store", "https://store"),
    ] {
        let p = work.path().join("ok.yaml");
        std::fs::write(&p, &ok).unwrap();
        let run = run_agent(&["check-config", "--config", p.to_str().unwrap()]);
        assert_eq!(run.code, 0, "{ok}\n{}", run.stderr);
    }
}
