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
# on free 127.0.0.1 ports with its data in DIR. Sets ETCD_URL, ETCD_PID,
# ETCD_DIR and ETCD_CMD (the command line; both for restart_etcd).
start_etcd() {
  local dir=$1
  shift
  local client_port peer_port
  client_port=$(free_port)
  peer_port=$(free_port)
  ETCD_URL=http://127.0.0.1:$client_port
  ETCD_DIR=$dir
  mkdir -p "$dir"
  ETCD_CMD=(etcd --name throwaway --data-dir "$dir/data"
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL"
    --listen-peer-urls "http://127.0.0.1:$peer_port"
    --initial-advertise-peer-urls "http://127.0.0.1:$peer_port"
    --initial-cluster "throwaway=http://127.0.0.1:$peer_port"
    --listen-metrics-urls "http://127.0.0.1:$(free_port)"
    "$@")
  "${ETCD_CMD[@]}" >"$dir/etcd.log" 2>&1 &
  ETCD_PID=$!
  wait_for_etcd "$ETCD_URL"
}

# restart_etcd: starts start_etcd's member again after it was stopped: the
# same data, the same ports (ETCD_URL stays true). Sets ETCD_PID.
restart_etcd() {
  "${ETCD_CMD[@]}" >>"$ETCD_DIR/etcd.log" 2>&1 &
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
    # Without CARGO_TARGET_DIR, cargo install builds in a temporary directory
    # and removes it: the build (GiBs) does not stay in the project's target.
    env -u CARGO_TARGET_DIR cargo install --locked garage --version "$GARAGE_VERSION" --root "$dir" || {
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

# The cargo-deny version scripts/test checks the dependency policy (deny.toml) with.
CARGO_DENY_VERSION=0.20.2

# ensure_cargo_deny: installs cargo-deny $CARGO_DENY_VERSION once, with cargo,
# into ${ETCD_BACKUP_TOOL_CACHE:-/var/cache/etcd-backup-agent}/cargo-deny-$CARGO_DENY_VERSION
# (a build of a few minutes; skipped when the cached binary already reports
# that version) and exports CARGO_DENY_BIN. Debian has no cargo-deny package.
ensure_cargo_deny() {
  local dir=${ETCD_BACKUP_TOOL_CACHE:-/var/cache/etcd-backup-agent}/cargo-deny-$CARGO_DENY_VERSION
  if ! "$dir/bin/cargo-deny" --version 2>/dev/null | grep -qF "cargo-deny $CARGO_DENY_VERSION"; then
    command -v cargo >/dev/null || { echo "error: cargo not found; it builds cargo-deny $CARGO_DENY_VERSION" >&2; return 1; }
    mkdir -p "$dir"
    echo "==> building cargo-deny $CARGO_DENY_VERSION into $dir (a few minutes, once)" >&2
    # A temporary build directory, as for Garage above.
    env -u CARGO_TARGET_DIR cargo install --locked cargo-deny --version "$CARGO_DENY_VERSION" --root "$dir" || {
      echo "error: cargo install of cargo-deny $CARGO_DENY_VERSION into $dir failed" >&2
      return 1
    }
  fi
  CARGO_DENY_BIN=$dir/bin/cargo-deny
  export CARGO_DENY_BIN
}

# The second etcd the tests run (tests/src/etcd.rs, ETCD_VERSION=3.5): Debian
# 13's etcd-server and etcd-client, unpacked beside Debian 12's 3.4.23, which
# stays installed as the default.
ETCD35_VERSION=3.5.16

# debian_main_uri SUITE: prints the archive URI this machine's own apt sources
# use for SUITE's main component (/etc/apt/sources.list and sources.list.d's
# one-line *.list and deb822 *.sources files), so the project never names a
# mirror itself. Fails when no enabled `deb` entry carries SUITE and main.
debian_main_uri() {
  local suite=$1 f files=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -s "$f" ] && files+=("$f")
  done
  local uri=
  if [ ${#files[@]} -gt 0 ]; then
    # deb [opt=val ...] URI SUITE COMPONENT...
    uri=$(sed -e 's/#.*//' -e 's/\[[^]]*\]//' "${files[@]}" |
      awk -v s="$suite" '$1 == "deb" && $3 == s { for (i = 4; i <= NF; i++) if ($i == "main") { print $2; exit } }')
  fi
  if [ -z "$uri" ]; then
    files=()
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -s "$f" ] && files+=("$f")
    done
    if [ ${#files[@]} -gt 0 ]; then
      # Stanzas separated by blank lines; a field's values on one line.
      uri=$(awk -v s="$suite" '
        function has(list, word,   n, a, i) { n = split(list, a, /[ \t]+/); for (i = 1; i <= n; i++) if (a[i] == word) return 1; return 0 }
        function flush() {
          if (has(f["types"], "deb") && has(f["suites"], s) && has(f["components"], "main") && tolower(f["enabled"]) != "no") {
            split(f["uris"], u, /[ \t]+/); print u[1]; found = 1; exit
          }
          delete f
        }
        /^#/ { next }
        /^[ \t]*$/ { flush(); next }
        /^[A-Za-z-]+:/ { key = tolower(substr($0, 1, index($0, ":") - 1)); val = substr($0, index($0, ":") + 1); gsub(/^[ \t]+|[ \t]+$/, "", val); f[key] = val; next }
        END { if (!found) flush() }
      ' "${files[@]}")
    fi
  fi
  [ -n "$uri" ] || {
    echo "error: no enabled 'deb' entry for $suite main in /etc/apt/sources.list or /etc/apt/sources.list.d; the archive to fetch Debian packages from is taken from there" >&2
    return 1
  }
  echo "$uri"
}

# ensure_etcd35: makes etcd, etcdctl and etcdutl $ETCD35_VERSION available in
# ${ETCD_BACKUP_TOOL_CACHE:-/var/cache/etcd-backup-agent}/etcd-$ETCD35_VERSION/bin
# (skipped when they are there and report that version), exports ETCD35_BIN
# (that directory; tests/src/etcd.rs reads it) and prints where it is.
#
# Debian 13 (trixie) packages them; Debian 12 has 3.4.23, which stays
# installed. apt fetches the two .debs with a configuration of its own: a
# sources list naming trixie at the URI this machine uses for bookworm's main
# (debian_main_uri), its own state, lists and cache directories, no
# sources.list.d and an empty dpkg status. The machine's apt.conf.d (proxies,
# validity checks) still applies; nothing is added to it, and nothing is
# installed: `dpkg-deb -x` unpacks the packages' files into the cache
# directory (the binaries are static Go programs). trixie's Release file must
# verify with Debian 12's own debian-archive-keyring.gpg, which carries the
# bookworm and trixie archive keys since 2023.3+deb12u1; apt refuses the
# index otherwise, and so does this function.
ensure_etcd35() {
  local dir=${ETCD_BACKUP_TOOL_CACHE:-/var/cache/etcd-backup-agent}/etcd-$ETCD35_VERSION
  local ok=1 want="version: ${ETCD35_VERSION//./\\.}$"
  # "etcd Version: 3.5.16"; "etcdctl version: 3.5.16"; "etcdutl version: 3.5.16".
  "$dir/bin/etcd" --version 2>/dev/null | grep -qiE "^etcd $want" || ok=0
  "$dir/bin/etcdctl" version 2>/dev/null | grep -qiE "^etcdctl $want" || ok=0
  "$dir/bin/etcdutl" version 2>/dev/null | grep -qiE "^etcdutl $want" || ok=0
  if [ "$ok" -eq 0 ]; then
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg uri work ver pkg deb
    [ -s "$keyring" ] || { echo "error: $keyring is missing (package debian-archive-keyring); it verifies Debian's archive" >&2; return 1; }
    uri=$(debian_main_uri bookworm) || return 1
    echo "==> fetching etcd $ETCD35_VERSION (Debian trixie's etcd-server and etcd-client from $uri) into $dir" >&2
    work=$(mktemp -d -t etcd-backup-etcd35.XXXXXX)
    # apt's download sandbox user (_apt) must reach the work directory.
    chmod 755 "$work"
    mkdir -p "$work/state/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
    : >"$work/status"
    # apt-get download writes as apt's sandbox user when run as root.
    if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$work/debs"; fi
    echo "deb [signed-by=$keyring] $uri trixie main" >"$work/sources.list"
    local apt=(
      -o "Dir::Etc::sourcelist=$work/sources.list" -o "Dir::Etc::sourceparts=-"
      -o "Dir::State=$work/state" -o "Dir::State::status=$work/status"
      -o "Dir::Cache=$work/cache" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
      -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
      -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
      -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
      -o "APT::Update::Error-Mode=any"
    )
    if ! apt-get "${apt[@]}" -qq update; then
      echo "error: apt could not read trixie's index from $uri with $keyring (see above); etcd $ETCD35_VERSION is fetched from there" >&2
      rm -rf "$work"
      return 1
    fi
    for pkg in etcd-server etcd-client; do
      ver=$(apt-cache "${apt[@]}" show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
      case $ver in
        "$ETCD35_VERSION"-*) ;;
        *)
          echo "error: trixie at $uri has $pkg ${ver:-(none)}, not $ETCD35_VERSION" >&2
          rm -rf "$work"
          return 1
          ;;
      esac
      (cd "$work/debs" && apt-get "${apt[@]}" -qq download "$pkg=$ver") || {
        echo "error: apt-get download $pkg=$ver from $uri failed" >&2
        rm -rf "$work"
        return 1
      }
    done
    for deb in "$work"/debs/*.deb; do
      dpkg-deb -x "$deb" "$work/root"
    done
    rm -rf "$dir"
    mkdir -p "$dir/bin"
    for tool in etcd etcdctl etcdutl; do
      # etcd-server puts etcd in /usr/bin; etcd-client etcdctl and etcdutl.
      if [ ! -x "$work/root/usr/bin/$tool" ]; then
        echo "error: the trixie packages carry no /usr/bin/$tool" >&2
        rm -rf "$work"
        return 1
      fi
      cp "$work/root/usr/bin/$tool" "$dir/bin/$tool"
    done
    rm -rf "$work"
  fi
  ETCD35_BIN=$dir/bin
  export ETCD35_BIN
  echo "==> etcd $ETCD35_VERSION: $ETCD35_BIN (etcd, etcdctl, etcdutl)" >&2
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
