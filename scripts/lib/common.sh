# Shared settings and helpers for perfbox's setup scripts (sourced, not executed).
# Every path can be overridden from the environment; the defaults match systemd/ and README.md.
PERFBOX_USER=${PERFBOX_USER:-perfbox}
PERFBOX_CACHE=${PERFBOX_CACHE:-/var/cache/perfbox}
PERFBOX_STATE=${PERFBOX_STATE:-/var/lib/perfbox}
PERFBOX_RUN=${PERFBOX_RUN:-/run/perfbox}
PERFBOX_REGISTRY=${PERFBOX_REGISTRY:-127.0.0.1:5000}
# Name of perfbox's cgroups (`$PERFBOX_CGROUP` for jobs, `$PERFBOX_CGROUP-build` for builds) and
# where setup links buildkitd, buildctl and youki (a CI run from nothing uses its own of each).
PERFBOX_CGROUP=${PERFBOX_CGROUP:-perfbox}
PERFBOX_BIN=${PERFBOX_BIN:-/usr/local/bin}
# The service scripts/up runs.
PERFBOX_BIND=${PERFBOX_BIND:-127.0.0.1:8080}
export PERFBOX_USER PERFBOX_CACHE PERFBOX_STATE PERFBOX_RUN PERFBOX_REGISTRY PERFBOX_CGROUP \
  PERFBOX_BIN PERFBOX_BIND
BUILDKIT_VERSION=v0.13.2
YOUKI_VERSION=0.7.0
BUILDKIT_SOCKET="$PERFBOX_RUN/buildkit/buildkitd.sock"
# The opt-in networked rootless buildkitd (scripts/buildkitd-net): RUN steps get a network, not
# the host's loopback.
BUILDKIT_NET_SOCKET="$PERFBOX_RUN/buildkit-net/buildkitd.sock"
PERFBOX_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

say() { printf '[setup] %s\n' "$*"; }
# A long step, said before it starts and timed when it ends: step "what" command...
step() {
  local what=$1 t0 rc=0
  shift
  t0=$(date +%s)
  say "$what ..."
  "$@" || rc=$?
  if [ $rc = 0 ]; then say "$what: done in $(($(date +%s) - t0)) s"
  else say "$what: FAILED after $(($(date +%s) - t0)) s (exit $rc)"; fi
  return $rc
}
# Run a command with its output in a log file: logged LOG command...
logged() { local log=$1; shift; "$@" >"$log" 2>&1; }
warn() { printf '[setup] WARNING: %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Run a command as the unprivileged perfbox user, with a clean, explicit environment.
as_perfbox() {
  local home
  home=$(getent passwd "$PERFBOX_USER" | cut -d: -f6)
  setpriv --reuid="$PERFBOX_USER" --regid="$PERFBOX_USER" --init-groups --reset-env \
    env HOME="$home" USER="$PERFBOX_USER" XDG_RUNTIME_DIR="$PERFBOX_RUN" \
    PATH="$PERFBOX_BIN:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" "$@"
}

# The first Debian archive URI of this machine's apt sources (deb822 or one-line format).
debian_mirror() {
  local m
  m=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | grep -oE '^(URIs:|deb) +[^ ]+' | awk '{print $2}' | grep -m1 -E '/debian/?$' || true)
  [ -n "$m" ] && echo "$m"
}

# Substitute @VARS@ in a template.
render() {
  sed -e "s#@STATE@#$PERFBOX_STATE#g" -e "s#@RUN@#$PERFBOX_RUN#g" \
    -e "s#@REGISTRY@#$PERFBOX_REGISTRY#g" -e "s#@READONLY@#${READONLY:-false}#g" \
    -e "s#@CGROUP@#$PERFBOX_CGROUP#g" -e "s#@BUILD_RUNS@#${BUILD_RUNS:-}#g" "$1"
}

# "a.b.c" >= "x.y.z" for dotted numeric versions.
version_ge() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]; }
