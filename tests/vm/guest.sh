#!/bin/bash
# Runs inside the test VM as root (vmtest.service, from the payload disk mounted at /mnt/payload):
# installs perfbox with scripts/install exactly as an admin would, then checks the deployment.
# Every check prints `PASS name` or `FAIL name`; scripts/vm-test counts them. No network: the
# guest has only lo, and everything talks to 127.0.0.1.
set -u
P=/mnt/payload
R=/root/perfbox
fail=0
check() { # NAME CMD...: run CMD, PASS/FAIL by its status
  local name=$1
  shift
  if "$@"; then echo "PASS $name"; else echo "FAIL $name"; fail=1; fi
}
section() { echo; echo "== $* (uptime $(cut -d' ' -f1 /proc/uptime) s)"; }
timing() { echo "TIMING $1 $2 s"; }
api=http://127.0.0.1:8080

section boot
echo "multi-user.target reached $(($(systemctl show -P ActiveEnterTimestampMonotonic multi-user.target) / 1000)) ms after kernel start"
check pid1-is-systemd test "$(readlink /proc/1/exe)" = /usr/lib/systemd/systemd
check cgroup-v2 test "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs
check no-network sh -c '! ip -o link | grep -v " lo:" | grep -q .'
echo "kernel $(uname -r); runc $(runc --version | head -1); crun $(crun --version | head -1)"

section "payload: repo, binaries from the host caches, seeded registry data"
rm -rf $R && cp -a $P/repo $R
install -d /var/cache/perfbox/buildkit-v0.13.2/bin /var/cache/perfbox/youki-0.7.0/bin
cp $P/bin/buildkitd $P/bin/buildctl /var/cache/perfbox/buildkit-v0.13.2/bin/
cp $P/bin/youki /var/cache/perfbox/youki-0.7.0/bin/
install -d /var/lib/perfbox/registry
cp -a $P/registry/data $P/registry/seeded /var/lib/perfbox/registry/

section "scripts/install"
t=$(date +%s)
bash $R/scripts/install
check install test $? = 0
timing install $(($(date +%s) - t))
for u in perfbox-registry perfbox-buildkitd perfbox; do
  check "unit-active-$u" systemctl is-active --quiet $u.service
  check "unit-verify-$u" systemd-analyze verify /etc/systemd/system/$u.service
done
check perfbox-enabled systemctl is-enabled --quiet perfbox.service
# Debian's own registry service would take :5000.
check debian-registry-disabled sh -c '! systemctl is-active --quiet docker-registry.service'

section "nothing runs as root"
user_of() { ps -o user= -p "$1" 2>/dev/null | tr -d ' '; }
main_pid() { systemctl show -P MainPID "$1"; }
echo "perfbox: $(user_of "$(main_pid perfbox.service)")  registry: $(user_of "$(main_pid perfbox-registry.service)")"
ps -eo user,pid,args | grep -E '[b]uildkitd|[r]ootlesskit|[d]ocker-registry|[p]erfbox serve'
check perfbox-not-root test "$(user_of "$(main_pid perfbox.service)")" = perfbox
check registry-not-root test "$(user_of "$(main_pid perfbox-registry.service)")" = perfbox
bk_pids=$(pgrep -x buildkitd)
check buildkitd-running test -n "$bk_pids"
check buildkitd-not-root sh -c "for p in $bk_pids; do [ \"\$(ps -o user= -p \$p | tr -d ' ')\" = perfbox ] || exit 1; done"
check rootlesskit-not-root test "$(user_of "$(main_pid perfbox-buildkitd.service)")" = perfbox
echo "perfbox's cgroup: $(cat /proc/"$(main_pid perfbox.service)"/cgroup)"
own=/sys/fs/cgroup/system.slice/perfbox.service
echo "$own: subtree_control=[$(cat $own/cgroup.subtree_control)] owner=$(stat -c %U $own)"
check perfbox-in-leaf grep -qx '0::/system.slice/perfbox.service/service' /proc/"$(main_pid perfbox.service)"/cgroup
check delegated-controllers sh -c "for c in memory pids cpu; do grep -qw \$c $own/cgroup.subtree_control || exit 1; done"

section "registry is read-only"
check registry-serves curl -fsS -o /dev/null http://127.0.0.1:5000/v2/library/alpine/tags/list
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST http://127.0.0.1:5000/v2/library/evil/blobs/uploads/)
echo "upload attempt: HTTP $code"
check registry-refuses-uploads test "$code" != 202

section "healthz"
curl -sS $api/healthz; echo
check healthz curl -fsS -o /dev/null $api/healthz

submit() { # DOCKERFILE-TEXT -> job id
  printf '%s\n' "$1" >/tmp/job.Dockerfile
  curl -m 30 -fsS -X POST -F file=@/tmp/job.Dockerfile $api/job/build | jq -r .id
}
wait_job() { # ID SECONDS -> final /job/performance JSON
  local id=$1 deadline=$(($(date +%s) + $2)) r
  while :; do
    r=$(curl -m 10 -sS $api/job/performance/"$id")
    case $(echo "$r" | jq -r .status) in
      queued | building | running) ;;
      *) echo "$r"; return ;;
    esac
    [ "$(date +%s)" -lt $deadline ] || { echo "$r"; return; }
    sleep 2
  done
}

section "curl flow: FROM alpine / RUN / CMD writes perf"
t=$(date +%s)
id1=$(submit 'FROM alpine
RUN echo hi
CMD echo '"'"'{"perf":0.9876}'"'"' > /data/perf.json')
echo "job $id1"
r1=$(wait_job "$id1" 900)
echo "$r1"
timing first-job $(($(date +%s) - t))
check curl-flow-perf test "$(echo "$r1" | jq -r .perf)" = 0.9876
rec=$(curl -sS $api/job/"$id1")
echo "$rec" | jq -c '{status, runtime, cgroup, limits, oom_killed}'
check record-cgroup-v2 test "$(echo "$rec" | jq -r .cgroup)" = v2
for c in memory pids cpu; do
  check "record-$c-by-cgroup" test "$(echo "$rec" | jq -r .limits.$c.by)" = cgroup
done
echo "$rec" | jq -r '.limits.memory.control + " = " + .limits.memory.value'
check spec-api sh -c "curl -fsS $api/job/$id1/spec | jq -e '.linux.namespaces | map(.type) | index(\"user\")' >/dev/null"
check spec-cli sh -c "perfbox spec $id1 | jq -e '.linux.cgroupsPath | startswith(\"/system.slice/perfbox.service/\")' >/dev/null"
check spec-file test -s /var/lib/perfbox/service/jobs/$id1/config.json

section "build isolation: a RUN fork bomb stays in its build's cgroup"
bk_pid=$(main_pid perfbox-buildkitd.service)
curl -sS $api/healthz | jq -r .build_cgroups
check build-cgroups-separated sh -c "curl -sS $api/healthz | jq -r .build_cgroups | grep -q 'of their own below /system.slice/perfbox-buildkitd.service/runs'"
check buildkitd-in-daemon-leaf grep -qx '0::/system.slice/perfbox-buildkitd.service/daemon' /proc/"$bk_pid"/cgroup
t=$(date +%s)
idb=$(submit 'FROM alpine
RUN echo bomb; b() { b | b & }; b; sleep 5; echo the bomb ran out')
idn=$(submit 'FROM alpine
RUN echo ordinary
CMD echo '"'"'{"perf":0.5}'"'"' > /data/perf.json')
rb=$(wait_job "$idb" 600)
rn=$(wait_job "$idn" 600)
recb=$(curl -sS $api/job/"$idb")
echo "bomb: $rb; $(echo "$recb" | jq -c .build.cgroup)"
echo "ordinary: $rn"
timing build-bomb $(($(date +%s) - t))
check bomb-own-cgroup sh -c "echo '$recb' | jq -r .build.cgroup.path | grep -q '^/system.slice/perfbox-buildkitd.service/runs/job-'"
check bomb-cgroup-used test "$(echo "$recb" | jq -r .build.cgroup.used)" = true
check ordinary-after-bomb test "$(echo "$rn" | jq -r .perf)" = 0.5
check buildkitd-survived-bomb test "$(main_pid perfbox-buildkitd.service)" = "$bk_pid"

section "audit and receipts"
perfbox audit --all
check audit-all-pass perfbox audit --all
check receipt-key-private test "$(stat -c %a:%U /var/lib/perfbox/service/receipt.key)" = 600:perfbox
perfbox receipt "$id1" >/tmp/receipt.json
check receipt-verifies perfbox verify /tmp/receipt.json --key /var/lib/perfbox/service/receipt.pub
sed 's/"perf": 0.9876/"perf": 0.99/' /tmp/receipt.json >/tmp/receipt-changed.json
check receipt-changed-fails sh -c '! perfbox verify /tmp/receipt-changed.json --key /var/lib/perfbox/service/receipt.pub'
receipt_key=$(cat /var/lib/perfbox/service/receipt.pub)

section "restart: small memory limit, finished jobs kept"
sed -i '/^\[limits\]/,$ s/^memory_bytes = .*/memory_bytes = 67108864   # 64 MiB (vm test)/' /etc/perfbox/config.toml
grep '^memory_bytes' /etc/perfbox/config.toml
t=$(date +%s)
systemctl restart perfbox.service
for _ in $(seq 300); do curl -fsS -o /dev/null $api/healthz 2>/dev/null && break; sleep 0.2; done
timing restart $(($(date +%s) - t))
check healthy-after-restart curl -fsS -o /dev/null $api/healthz
after=$(curl -sS $api/job/performance/"$id1")
echo "after restart: $after"
check restart-keeps-finished-job test "$(echo "$after" | jq -r '.status + " " + (.perf|tostring)')" = "succeeded 0.9876"

section "a job over its memory limit"
t=$(date +%s)
id2=$(submit 'FROM alpine
CMD awk '"'"'BEGIN { s = "xxxxxxxx"; while (1) s = s s }'"'"'')
r2=$(wait_job "$id2" 600)
echo "$r2"
timing oom-job $(($(date +%s) - t))
check oom-run-failed test "$(echo "$r2" | jq -r .status)" = run_failed
check oom-reason sh -c "echo '$r2' | jq -r .error | grep -qi 'out of memory'"
rec2=$(curl -sS $api/job/"$id2")
echo "$rec2" | jq -c '{status, exit_code, oom_killed, cgroup, memory: .limits.memory}'
check oom-recorded test "$(echo "$rec2" | jq -r .oom_killed)" = true
check oom-limit-by-cgroup test "$(echo "$rec2" | jq -r .limits.memory.value)" = 67108864
check guest-fine-after-oom sh -c "systemctl is-active --quiet perfbox.service && curl -fsS -o /dev/null $api/healthz"
dmesg | grep -iE 'oom-kill|out of memory' | tail -3

section "the shipped unit with each runtime"
for rt in crun youki runc; do
  sed -i "s/^runtime = .*/runtime = \"$rt\"/" /etc/perfbox/config.toml
  systemctl restart perfbox.service
  for _ in $(seq 300); do curl -m 10 -fsS -o /dev/null $api/healthz 2>/dev/null && break; sleep 0.2; done
  t=$(date +%s)
  idr=$(submit 'FROM alpine
CMD echo '"'"'{"perf":0.25}'"'"' > /data/perf.json')
  rr=$(wait_job "$idr" 600)
  recr=$(curl -m 10 -sS $api/job/"$idr")
  echo "$rt: $rr; $(echo "$recr" | jq -c '{runtime, cgroup, memory: .limits.memory.by, pids: .limits.pids.by, cpu: .limits.cpu.by}')"
  check "unit-job-$rt" test "$(echo "$rr" | jq -r .perf)" = 0.25
  check "unit-job-$rt-limits-by-cgroup" test "$(echo "$recr" | jq -r '[.limits.memory.by, .limits.pids.by, .limits.cpu.by] | join(",")')" = cgroup,cgroup,cgroup
  timing "unit-job-$rt" $(($(date +%s) - t))
done

section "scripts/install again (idempotent)"
t=$(date +%s)
pid_before=$(main_pid perfbox.service)
bash $R/scripts/install >/tmp/install2.log 2>&1
check install-twice test $? = 0
tail -5 /tmp/install2.log
timing install-again $(($(date +%s) - t))
check install-twice-no-restart test "$(main_pid perfbox.service)" = "$pid_before"
check install-twice-keeps-jobs test "$(curl -sS $api/job/performance/"$id1" | jq -r .perf)" = 0.9876
check install-twice-keeps-receipt-key test "$(cat /var/lib/perfbox/service/receipt.pub)" = "$receipt_key"
perfbox audit --all | tail -n 1
check audit-all-pass-after-restarts perfbox audit --all

section "tests/sandbox.rs with each runtime (cgroup v2)"
# The test binary expects what scripts/setup provides: the perfbox user, /var/lib/perfbox and a
# delegated /sys/fs/cgroup/perfbox (setup step 5, which --systemd leaves to the units). On cgroup
# v2 the test process itself must also sit inside that subtree (in a leaf, tests/): the runtime,
# as perfbox, moves the container into /perfbox/<id>, and the kernel requires write access to
# cgroup.procs of the common ancestor of the source and target cgroups.
mkdir -p /sys/fs/cgroup/perfbox
chown perfbox: /sys/fs/cgroup/perfbox /sys/fs/cgroup/perfbox/cgroup.procs \
  /sys/fs/cgroup/perfbox/cgroup.subtree_control /sys/fs/cgroup/perfbox/cgroup.threads
mkdir -p /sys/fs/cgroup/perfbox/tests
# Known youki 0.7.0 differences, measured in this VM and reported (not counted as passed), each
# skipped by its exact trial name so that every other youki trial still has to pass. (Two more —
# its bare exit code 9 on SIGKILL hiding OOM kills, and its empty /proc/net/route — are handled by
# perfbox now and their trials run.)
declare -A known=(
  [runc:sample_job_writes_perf::youki]="youki's sample job (in every pass) hung with no output until its 300 s timeout in 1 of 3 crun passes, started next to another container; it runs in the youki pass, where youki trials go one at a time"
  [crun:sample_job_writes_perf::youki]="as in the runc pass: youki's sample job runs in the youki pass only"
)
for rt in runc crun youki; do
  t=$(date +%s)
  echo "-- PERFBOX_TEST_RUNTIME=$rt"
  skips=()
  for k in "${!known[@]}"; do
    if [ "${k%%:*}" = $rt ]; then
      skips+=(--skip "${k#*:}")
      echo "SKIP sandbox-tests-$rt:${k#*:}: ${known[$k]}"
    fi
  done
  threads=2
  if [ $rt = youki ]; then
    # Measured twice: with two youki trials at once, sample_job_writes_perf::youki hangs until
    # its 300 s timeout with no output (it passes next to runc/crun trials, and one at a time).
    threads=1
    echo "SKIP sandbox-tests-youki:concurrency: youki trials run one at a time here; two youki containers started at once by the test binary hung one of them (300 s timeout, no output) in 2 of 2 runs: reported, not fixed"
  fi
  (echo $BASHPID >/sys/fs/cgroup/perfbox/tests/cgroup.procs && cd /tmp \
    && PERFBOX_TEST_RUNTIME=$rt exec timeout 900 $P/bin/sandbox-tests --test-threads=$threads "${skips[@]}") >/tmp/sandbox-$rt.log 2>&1
  rc=$?
  grep -E '^test |test result|^failures|panicked' /tmp/sandbox-$rt.log | grep -vE ' \.\.\. ok$' | head -40
  grep -E 'memory limit enforcement' /tmp/sandbox-$rt.log | head -1
  [ $rc = 0 ] || tail -60 /tmp/sandbox-$rt.log
  check "sandbox-tests-$rt" test $rc = 0
  check "sandbox-tests-$rt-nothing-ignored" grep -q '; 0 ignored;' /tmp/sandbox-$rt.log
  check "sandbox-tests-$rt-only-known-skips" grep -q "; $((${#skips[@]} / 2)) filtered out" /tmp/sandbox-$rt.log
  timing "sandbox-tests-$rt" $(($(date +%s) - t))
done
rmdir /sys/fs/cgroup/perfbox/tests /sys/fs/cgroup/perfbox 2>/dev/null || true

section "scripts/install --uninstall"
t=$(date +%s)
bash $R/scripts/install --uninstall
check uninstall test $? = 0
timing uninstall $(($(date +%s) - t))
check no-units-left sh -c '! ls /etc/systemd/system/perfbox* 2>/dev/null | grep -q . && ! systemctl list-units --all --no-legend "perfbox*" | grep -q .'
check no-user-left sh -c '! id perfbox 2>/dev/null && ! grep -q "^perfbox:" /etc/subuid /etc/subgid /etc/group'
check no-binaries-left sh -c '! ls /usr/local/bin/perfbox /usr/local/bin/buildkitd 2>/dev/null'
check no-config-left test ! -e /etc/perfbox
check no-perfbox-processes sh -c '! ps -eo args | grep -E "^(/usr/local/bin/perfbox|buildkitd|/usr/bin/docker-registry)" | grep -q .'
check job-data-kept test -s /var/lib/perfbox/service/jobs.db
bash $R/scripts/install --uninstall --purge
check purge-removes-data test ! -e /var/lib/perfbox

section "summary"
systemctl --failed --no-legend
echo "guest done, fail=$fail"
exit $fail
