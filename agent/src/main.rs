//! The `etcd-backup-agent` binary: wiring only, see [`etcd_backup_agent::cli`].

fn main() -> std::process::ExitCode {
    etcd_backup_agent::cli::main()
}
