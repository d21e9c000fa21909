# Shared helpers for scripts/demo, scripts/test and scripts/bench. Source it.

# ensure_tools CMD:PACKAGE ...
# Installs (apt-get, as root) the Debian package of every command that is
# missing. Anything already present is left alone.
ensure_tools() {
  local missing=() pair cmd pkg
  for pair in "$@"; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -e "$cmd" ]; then
      missing+=("$pkg")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "error: missing packages ${missing[*]}; run as root or install them with apt-get" >&2
      return 1
    fi
  fi
  echo "==> installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_tools_force PACKAGE...: installs Debian packages unconditionally.
ensure_tools_force() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The tools every script needs: etcd and etcdctl for the real member, protoc
# for etcd-client's generated gRPC code.
ensure_base_tools() {
  ensure_tools etcd:etcd-server etcdctl:etcd-client protoc:protobuf-compiler /usr/include/google/protobuf/descriptor.proto:libprotobuf-dev \
    curl:curl gcc:gcc
}

# free_port: prints a TCP port on 127.0.0.1 with nothing listening on it.
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "error: no free port found on 127.0.0.1" >&2
  return 1
}

# wait_for_etcd URL: waits up to 30 s for a member to report healthy.
wait_for_etcd() {
  local url=$1
  for _ in $(seq 1 150); do
    if ETCDCTL_API=3 etcdctl --endpoints "$url" endpoint health >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  echo "error: etcd at $url did not become healthy within 30s" >&2
  return 1
}

# The OpenSSH server and client tools (sshd for the throwaway server; ssh-keygen
# for its keys; sftp for comparisons).
ensure_ssh_tools() {
  ensure_tools /usr/sbin/sshd:openssh-server ssh-keygen:openssh-client sftp:openssh-client
}

# start_sshd DIR: starts a throwaway OpenSSH server on a free 127.0.0.1 port,
# with its own host key, a generated ed25519 client key for the current user and
# internal-sftp, all in DIR. Sets SSHD_PORT, SSHD_PID, SSHD_KNOWN_HOSTS (a
# known_hosts file with the server's key) and SSHD_CLIENT_KEY.
start_sshd() {
  local dir=$1
  mkdir -p "$dir" /run/sshd
  ssh-keygen -q -t ed25519 -N "" -C "throwaway host key" -f "$dir/host_ed25519_key"
  ssh-keygen -q -t ed25519 -N "" -C "etcd-backup-agent" -f "$dir/client_ed25519_key"
  cp "$dir/client_ed25519_key.pub" "$dir/authorized_keys"
  SSHD_PORT=$(free_port)
  cat >"$dir/sshd_config" <<CFG
ListenAddress 127.0.0.1
Port $SSHD_PORT
HostKey $dir/host_ed25519_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
Subsystem sftp internal-sftp
CFG
  /usr/sbin/sshd -D -e -f "$dir/sshd_config" >"$dir/sshd.log" 2>&1 &
  SSHD_PID=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$SSHD_PORT") 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "[127.0.0.1]:$SSHD_PORT $(cut -d' ' -f1,2 "$dir/host_ed25519_key.pub")" >"$dir/known_hosts"
  SSHD_KNOWN_HOSTS=$dir/known_hosts
  SSHD_CLIENT_KEY=$dir/client_ed25519_key
}

# start_etcd DIR [extra etcd flags...]: starts a throwaway single-member etcd
# on free 127.0.0.1 ports with its data in DIR. Sets ETCD_URL and ETCD_PID.
start_etcd() {
  local dir=$1
  shift
  local client_port peer_port
  client_port=$(free_port)
  peer_port=$(free_port)
  ETCD_URL=http://127.0.0.1:$client_port
  mkdir -p "$dir"
  etcd --name throwaway --data-dir "$dir/data" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "throwaway=http://127.0.0.1:$peer_port" \
    --listen-metrics-urls "http://127.0.0.1:$(free_port)" \
    "$@" >"$dir/etcd.log" 2>&1 &
  ETCD_PID=$!
  wait_for_etcd "$ETCD_URL"
}

# openshift_tree ROOT [KIB]: an OpenShift-shaped /etc/kubernetes under ROOT:
# two revisions of each static pod, the manifests pointing at the first, an
# encryption config, and about KIB KiB of text per revision (default 64).
openshift_tree() {
  local root=$1 kib=${2:-64} name rev
  mkdir -p "$root/manifests"
  for name in kube-apiserver kube-controller-manager kube-scheduler etcd; do
    for rev in 3 4; do
      mkdir -p "$root/static-pod-resources/$name-pod-$rev/configmaps/config" \
        "$root/static-pod-resources/$name-pod-$rev/secrets/serving-cert"
      echo "revision: $rev" >"$root/static-pod-resources/$name-pod-$rev/configmaps/config/config.yaml"
      head -c $((kib * 768)) /dev/urandom | base64 >"$root/static-pod-resources/$name-pod-$rev/secrets/serving-cert/tls.crt"
    done
    printf 'kind: Pod\nspec:\n  volumes:\n  - hostPath:\n      path: /etc/kubernetes/static-pod-resources/%s-pod-3\n' "$name" \
      >"$root/manifests/$name-pod.yaml"
  done
  mkdir -p "$root/static-pod-resources/kube-apiserver-pod-3/secrets/encryption-config"
  echo "kind: EncryptionConfiguration" \
    >"$root/static-pod-resources/kube-apiserver-pod-3/secrets/encryption-config/encryption-config"
}

# The Garage version the S3 tests and the s3 bench run (tests/src/garage.rs).
GARAGE_VERSION=2.5.0

# ensure_garage: installs Garage $GARAGE_VERSION once, with cargo, into
# ${ETCD_BACKUP_TOOL_CACHE:-/var/cache/etcd-backup-agent}/garage-$GARAGE_VERSION
# (a build of about 5 minutes; skipped when the cached binary already reports
# that version), exports GARAGE_BIN and prints where it is. Debian has no
# Garage package.
ensure_garage() {
  local dir=${ETCD_BACKUP_TOOL_CACHE:-/var/cache/etcd-backup-agent}/garage-$GARAGE_VERSION
  # It prints "garage cargo:2.5.0 [features: ...]" when built by cargo install.
  if ! "$dir/bin/garage" --version 2>/dev/null | grep -qE "(^|[^0-9.])${GARAGE_VERSION//./\\.}([^0-9.]|$)"; then
    command -v cargo >/dev/null || { echo "error: cargo not found; it builds Garage $GARAGE_VERSION" >&2; return 1; }
    # Its libsodium-sys builds the bundled libsodium with autotools, whose
    # configure needs make and file; the other C parts need only gcc.
    ensure_tools make:make file:file
    mkdir -p "$dir"
    echo "==> building Garage $GARAGE_VERSION into $dir (about 5 minutes, once)" >&2
    cargo install --locked garage --version "$GARAGE_VERSION" --root "$dir" || {
      echo "error: cargo install of Garage $GARAGE_VERSION into $dir failed" >&2
      return 1
    }
  fi
  GARAGE_BIN=$dir/bin/garage
  export GARAGE_BIN
  echo "==> garage $GARAGE_VERSION: $GARAGE_BIN" >&2
}

# garage_cli NODE ARGS...: the garage CLI against node NODE of start_garage's
# cluster.
garage_cli() {
  local node=$1
  shift
  "$GARAGE_BIN" -c "$GARAGE_DIR/node$node/garage.toml" "$@"
}

# start_garage DIR: a throwaway three-node Garage cluster on free 127.0.0.1
# ports (replication_factor 3, sqlite metadata, everything in DIR), as
# tests/src/garage.rs starts it, with a bucket and a key that may read, write
# and own it. Needs ensure_garage. Sets GARAGE_DIR, GARAGE_PIDS,
# GARAGE_ENDPOINT (node 0's S3 API), GARAGE_BUCKET, GARAGE_KEY_ID_FILE and
# GARAGE_SECRET_FILE (0600 files) and GARAGE_RCLONE_CONF (an rclone config
# whose remote "garage:" is that endpoint with that key).
start_garage() {
  local dir=$1 i rpc s3 secret ids=() key_out
  GARAGE_DIR=$dir
  GARAGE_PIDS=
  mkdir -p "$dir"
  secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
  for i in 0 1 2; do
    mkdir -p "$dir/node$i"
    rpc=$(free_port)
    s3=$(free_port)
    [ "$i" = 0 ] && GARAGE_ENDPOINT=http://127.0.0.1:$s3
    (
      umask 077
      cat >"$dir/node$i/garage.toml" <<TOML
metadata_dir = "$dir/node$i/meta"
data_dir = "$dir/node$i/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"
bootstrap_peers = []

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"

[admin]
api_bind_addr = "127.0.0.1:$(free_port)"
TOML
    )
    RUST_LOG=garage=warn "$GARAGE_BIN" -c "$dir/node$i/garage.toml" server >"$dir/node$i/garage.log" 2>&1 &
    GARAGE_PIDS+=" $!"
  done
  for i in 0 1 2; do
    for _ in $(seq 1 300); do
      ids[i]=$(garage_cli "$i" node id -q 2>/dev/null) && break
      sleep 0.1
    done
    [ -n "${ids[i]}" ] || { echo "error: garage node $i did not start; its log: $dir/node$i/garage.log" >&2; return 1; }
  done
  garage_cli 0 node connect "${ids[1]}" >/dev/null
  garage_cli 0 node connect "${ids[2]}" >/dev/null
  for i in 0 1 2; do
    garage_cli 0 layout assign -z "zone$i" -c 1G "${ids[i]%@*}" >/dev/null
  done
  garage_cli 0 layout apply --version 1 >/dev/null
  GARAGE_BUCKET=etcd-backups
  for _ in $(seq 1 300); do
    garage_cli 0 bucket create "$GARAGE_BUCKET" >/dev/null 2>&1 && break
    sleep 0.1
  done
  key_out=$(garage_cli 0 key create etcd-backup-agent)
  garage_cli 0 bucket allow --read --write --owner "$GARAGE_BUCKET" --key etcd-backup-agent >/dev/null
  GARAGE_KEY_ID_FILE=$dir/access_key_id
  GARAGE_SECRET_FILE=$dir/secret_access_key
  GARAGE_RCLONE_CONF=$dir/rclone.conf
  (
    umask 077
    sed -n 's/^ *Key ID: *//p' <<<"$key_out" >"$GARAGE_KEY_ID_FILE"
    sed -n 's/^ *Secret key: *//p' <<<"$key_out" >"$GARAGE_SECRET_FILE"
    printf '[garage]\ntype = s3\nprovider = Other\nendpoint = %s\nregion = garage\nforce_path_style = true\naccess_key_id = %s\nsecret_access_key = %s\n' \
      "$GARAGE_ENDPOINT" "$(cat "$GARAGE_KEY_ID_FILE")" "$(cat "$GARAGE_SECRET_FILE")" >"$GARAGE_RCLONE_CONF"
  )
  [ -s "$GARAGE_KEY_ID_FILE" ] && [ -s "$GARAGE_SECRET_FILE" ] || {
    echo "error: garage key create printed no key id and secret" >&2
    return 1
  }
  for _ in $(seq 1 300); do
    # An AWS_CA_BUNDLE in the environment makes rclone's S3 client fail,
    # even for plain http.
    env -u AWS_CA_BUNDLE rclone --config "$GARAGE_RCLONE_CONF" lsf "garage:$GARAGE_BUCKET" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "error: the Garage cluster in $dir does not serve bucket $GARAGE_BUCKET over S3" >&2
  return 1
}

# stop_garage: kills start_garage's nodes.
stop_garage() {
  local pid
  for pid in $GARAGE_PIDS; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  done
  GARAGE_PIDS=
}

# A second S3 implementation for the lost-reply tests (tests/tests/fault_lost_reply.rs,
# tests/src/moto.rs): moto's server from PyPI, pinned, in its own venv. Unlike
# Garage it honours `If-None-Match: *` on PutObject and CompleteMultipartUpload.
MOTO_VERSION=5.2.6
ensure_moto() {
  if ! /opt/moto/bin/python -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
    if ! python3 -m venv /opt/moto >/dev/null 2>&1; then
      rm -rf /opt/moto
      ensure_tools_force python3-venv
      python3 -m venv /opt/moto
    fi
    /opt/moto/bin/pip install --quiet "moto[server]==$MOTO_VERSION"
  fi
}
