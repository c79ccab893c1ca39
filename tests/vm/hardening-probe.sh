#!/bin/bash
# Which systemd sandboxing directives still let perfbox's rootless pieces work? Runs in the test VM
# instead of guest.sh:  VM_GUEST_SCRIPT=tests/vm/hardening-probe.sh scripts/vm-test
# Installs perfbox, then for each directive adds it (or removes it) with a drop-in, restarts the
# unit and tries the real work: buildkitd answers `buildctl debug workers` and a build; perfbox
# builds + runs a job that writes perf, under each runtime. Prints `PROBE <unit> <directive> ok|FAIL`.
# The comments in systemd/*.service record the outcome.
set -u
P=/mnt/payload
R=/root/perfbox
api=http://127.0.0.1:8080
rm -rf $R && cp -a $P/repo $R
install -d /var/cache/perfbox/buildkit-v0.13.2/bin /var/cache/perfbox/youki-0.7.0/bin
cp $P/bin/buildkitd $P/bin/buildctl /var/cache/perfbox/buildkit-v0.13.2/bin/
cp $P/bin/youki /var/cache/perfbox/youki-0.7.0/bin/
install -d /var/lib/perfbox/registry
cp -a $P/registry/data $P/registry/seeded /var/lib/perfbox/registry/
journalctl -f -o short-monotonic >/dev/ttyS0 2>&1 &
bash $R/scripts/install >/tmp/install.log 2>&1; tail -n 15 /tmp/install.log
for u in perfbox-registry perfbox-buildkitd perfbox; do
  echo "== $u: $(systemctl is-active $u)"
  systemctl is-active --quiet $u || journalctl -u $u -n 40 --no-pager
done

dropin() { # UNIT LINES...: replace the probe drop-in
  local u=$1
  shift
  mkdir -p /etc/systemd/system/$u.d
  printf '[Service]\n' >/etc/systemd/system/$u.d/probe.conf
  printf '%s\n' "$@" >>/etc/systemd/system/$u.d/probe.conf
  systemctl daemon-reload
}
clear_dropin() { rm -rf /etc/systemd/system/$1.d; systemctl daemon-reload; }

bk_works() {
  systemctl restart perfbox-buildkitd.service || return 1
  buildctl --addr unix:///run/perfbox/buildkit/buildkitd.sock debug workers >/dev/null 2>&1 || return 1
  local d
  d=$(mktemp -d)
  printf 'FROM busybox\nRUN echo probe-%s > /p\n' "$RANDOM" >"$d/Dockerfile"
  timeout 300 buildctl --addr unix:///run/perfbox/buildkit/buildkitd.sock build --frontend dockerfile.v0 \
    --local context="$d" --local dockerfile="$d" --opt force-network-mode=none >"$d/log" 2>&1 \
    || { tail -5 "$d/log"; return 1; }
}
job_works() { # RUNTIME
  sed -i "s/^runtime = .*/runtime = \"$1\"/" /etc/perfbox/config.toml
  systemctl restart perfbox.service || return 1
  for _ in $(seq 150); do curl -m 10 -fsS -o /dev/null $api/healthz 2>/dev/null && break; sleep 0.2; done
  printf 'FROM alpine\nCMD echo '"'"'{"perf":0.5}'"'"' > /data/perf.json\n' >/tmp/p.Dockerfile
  local id r
  id=$(curl -m 30 -fsS -X POST -F file=@/tmp/p.Dockerfile $api/job/build | jq -r .id) || return 1
  for _ in $(seq 300); do
    r=$(curl -m 10 -sS $api/job/performance/"$id")
    case $(echo "$r" | jq -r .status) in queued | building | running) sleep 1 ;; *) break ;; esac
  done
  [ "$(echo "$r" | jq -r .perf)" = 0.5 ] || { echo "    $r"; return 1; }
  [ "$(curl -m 10 -sS $api/job/"$id" | jq -r .limits.memory.by)" = cgroup ] || { echo "    memory not by cgroup"; return 1; }
}
probe() { # UNIT LABEL TESTFN [ARGS] -- LINES...
  local u=$1 label=$2 fn=$3 arg=$4
  shift 5
  dropin "$u" "$@"
  if $fn $arg >/tmp/probe.out 2>&1; then echo "PROBE $u $label ok"; else
    echo "PROBE $u $label FAIL"
    sed 's/^/    /' /tmp/probe.out | tail -5
    journalctl -u "$u" -n 8 --no-pager -o cat | sed 's/^/    | /'
  fi
}

# buildkitd: the shipped unit, then one directive at a time.
probe perfbox-buildkitd.service shipped bk_works "" --
probe perfbox-buildkitd.service Type=notify-without-NotifyAccess bk_works "" -- NotifyAccess=main
probe perfbox-buildkitd.service no-CapabilityBoundingSet bk_works "" -- CapabilityBoundingSet=~CAP_WAKE_ALARM
probe perfbox-buildkitd.service CapabilityBoundingSet=CAP_SETUID+CAP_SETGID bk_works "" -- CapabilityBoundingSet= "CapabilityBoundingSet=CAP_SETUID CAP_SETGID"
probe perfbox-buildkitd.service CapabilityBoundingSet-without-CAP_SYS_ADMIN bk_works "" -- CapabilityBoundingSet= "CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_DAC_OVERRIDE"
probe perfbox-buildkitd.service Type=simple bk_works "" -- Type=simple
for d in NoNewPrivileges=yes ProtectKernelTunables=yes ProtectKernelLogs=yes ProtectKernelModules=yes \
  ProtectControlGroups=yes ProtectClock=yes ProtectHostname=yes PrivateDevices=yes ProtectProc=invisible \
  ProcSubset=pid RestrictSUIDSGID=yes LockPersonality=yes RestrictRealtime=yes MemoryDenyWriteExecute=yes \
  SystemCallArchitectures=native RestrictNamespaces=yes PrivateUsers=yes PrivateIPC=yes; do
  probe perfbox-buildkitd.service "$d" bk_works "" -- "$d"
done
# Keep a buildkitd that works for the perfbox probes: the shipped unit if it works, else none of
# the hardening.
clear_dropin perfbox-buildkitd.service
bk_works >/dev/null 2>&1 || { dropin perfbox-buildkitd.service ProtectSystem=no ProtectHome=no PrivateTmp=no \
  CapabilityBoundingSet=~CAP_WAKE_ALARM IPAddressDeny= RemoveIPC=no; systemctl restart perfbox-buildkitd.service; }
echo "buildkitd for the perfbox probes: $(systemctl is-active perfbox-buildkitd.service)"

# perfbox: the shipped unit with each runtime, then one directive at a time (runc).
for rt in runc crun youki; do probe perfbox.service "shipped-$rt" job_works $rt --; done
probe perfbox.service CapabilityBoundingSet=CAP_SETUID+CAP_SETGID job_works runc -- CapabilityBoundingSet= "CapabilityBoundingSet=CAP_SETUID CAP_SETGID"
probe perfbox.service CapabilityBoundingSet=empty job_works runc -- CapabilityBoundingSet=
probe perfbox.service CapabilityBoundingSet-without-CAP_SYS_ADMIN job_works runc -- CapabilityBoundingSet= "CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_DAC_OVERRIDE"
for d in NoNewPrivileges=yes ProtectKernelTunables=yes ProtectKernelLogs=yes ProtectKernelModules=yes \
  ProtectControlGroups=yes ProtectClock=yes ProtectHostname=yes PrivateDevices=yes ProtectProc=invisible \
  ProcSubset=pid RestrictSUIDSGID=yes LockPersonality=yes RestrictRealtime=yes MemoryDenyWriteExecute=yes \
  SystemCallArchitectures=native RestrictNamespaces=yes PrivateUsers=yes PrivateIPC=yes; do
  probe perfbox.service "$d" job_works runc -- "$d"
done
clear_dropin perfbox.service
echo "probe done"
