# Shared helpers for scripts/demo, scripts/test and scripts/bench. Source it.

# ensure_tools CMD:PACKAGE ...
# Installs (apt-get, as root) the Debian package of every command that is
# missing. Anything already present is left alone.
ensure_tools() {
  local missing=() pair cmd pkg
  for pair in "$@"; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "$cmd" ]; then
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

# The tools every script needs: etcd and etcdctl for the real member, protoc
# for etcd-client's generated gRPC code.
ensure_base_tools() {
  ensure_tools etcd:etcd-server etcdctl:etcd-client protoc:protobuf-compiler \
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
