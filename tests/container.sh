#!/bin/bash
# The container acceptance test, run by `scripts/container test` against the perfbox container
# that `scripts/container run` started (the COS unit's own docker-run script). Everything goes
# through the HTTP API at $PERFBOX_URL, as a user's curl would, and through `docker inspect`:
#
#  - the container: not privileged, every capability dropped but SETUID and SETGID, perfbox's
#    seccomp profile, read-only root, and no process inside running as root;
#  - the README's curl flow, 20 concurrent jobs, each failure status with its reason;
#  - attacks from jobs, each beside an ordinary job that must still get its own perf: no network
#    (RUN step and run), a perf.json symlinked to a file outside /data, a fork bomb, a job that
#    stops itself (SIGSTOP) to dodge its timeout, a disk bomb;
#  - every job's spec and the audit's verdict on it, and the limits its record says applied;
#  - a restart of the container ($RESTART) with every job and its result kept.
#
# Each check prints "ok" or "FAIL"; the summary line is "container: N passed, M failed". Exit 1 on
# any failure.
set -uo pipefail
url=${PERFBOX_URL:?PERFBOX_URL}
docker=${DOCKER:-docker}
container=${CONTAINER:?CONTAINER}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
t_start=$(date +%s)

ok() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
# check NAME CONDITION-COMMAND... : ok when the command succeeds, else FAIL with $detail.
check() {
  local name=$1
  shift
  if "$@"; then ok "$name"; else fail "$name" "${detail:-}"; fi
  detail=
}

# submit NAME DOCKERFILE-TEXT: prints the new job's id.
submit() {
  printf '%s\n' "$2" >"$work/$1.Dockerfile"
  curl -sS -X POST -F "file=@$work/$1.Dockerfile" "$url/job/build" | jq -r '.id // empty'
}
# final ID: the job's /job/performance answer once it is final (or after 300 s).
final() {
  local a
  for _ in 1 2 3 4 5 6; do
    a=$(curl -sS "$url/job/performance/$1?wait=50")
    case $(jq -r .status <<<"$a") in queued | building | running) ;; *) break ;; esac
  done
  echo "$a"
}
status_of() { jq -r .status <<<"$1"; }
perf_of() { jq -r '.perf // empty' <<<"$1"; }

ordinary() { # an ordinary job writing perf 0.$1
  printf 'FROM alpine\nRUN echo building\nCMD echo {\\"perf\\":0.%s} > /data/perf.json' "$1"
}

# --- the container itself ------------------------------------------------------------------------
inspect=$("$docker" inspect "$container" | jq '.[0]')
detail="Privileged is $(jq .HostConfig.Privileged <<<"$inspect")"
check "the container is not privileged" test "$(jq .HostConfig.Privileged <<<"$inspect")" = false
caps=$(jq -c '[.HostConfig.CapAdd // [] | .[] | ascii_upcase | sub("^CAP_"; "")] | sort' <<<"$inspect")
drop=$(jq -c '.HostConfig.CapDrop // []' <<<"$inspect")
detail="CapAdd $caps, CapDrop $drop"
check "every capability dropped but SETUID and SETGID (newuidmap, newgidmap)" \
  test "$caps $(jq -c 'map(ascii_upcase)' <<<"$drop")" = '["SETGID","SETUID"] ["ALL"]'
secopt=$(jq -c '.HostConfig.SecurityOpt' <<<"$inspect")
detail="SecurityOpt $secopt"
check "a seccomp profile (not unconfined), systempaths unconfined, nothing else" \
  jq -e '(map(select(startswith("seccomp=") and . != "seccomp=unconfined")) | length == 1)
    and all(startswith("seccomp=") or . == "systempaths=unconfined" or . == "apparmor=unconfined")' \
  <<<"$secopt" >/dev/null
detail="ReadonlyRootfs $(jq .HostConfig.ReadonlyRootfs <<<"$inspect"), Devices $(jq -c .HostConfig.Devices <<<"$inspect")"
check "read-only root, no device added" \
  test "$(jq -c '[.HostConfig.ReadonlyRootfs, (.HostConfig.Devices // [] | length)]' <<<"$inspect")" = '[true,0]'
uids=$("$docker" exec "$container" sh -c 'for s in /proc/[0-9]*/status; do awk "/^Uid:/ {print \$2, \$3}" "$s"; done' | sort -u | tr '\n' ' ')
detail="real and effective uids of the container's processes: $uids"
check "no process in the container runs as root" eval '! grep -qw 0 <<<"$uids"'
caps_eff=$("$docker" exec "$container" awk '/^CapEff/ {print $2}' /proc/1/status)
detail="CapEff of the container's first process: $caps_eff"
check "the container's processes have no effective capability" test "$caps_eff" = 0000000000000000

# --- the README's curl flow ----------------------------------------------------------------------
readme=$(submit readme "$(printf 'FROM alpine\nRUN echo hi\nCMD echo '"'"'{"perf":0.9876}'"'"' > /data/perf.json')")
a=$(final "$readme")
detail="$a"
check "README: curl -F file=@job.Dockerfile, then /job/performance gives 0.9876" \
  test "$(status_of "$a") $(perf_of "$a")" = "succeeded 0.9876"

# The kernel's first choice when memory runs out (no memory cgroup here): a job's process.
oom=$(submit oom "$(printf 'FROM alpine\nCMD echo {\\"perf\\":$(cat /proc/self/oom_score_adj)} > /data/perf.json')")
a=$(final "$oom")
detail="$a"
check "a job's processes have oom_score_adj 1000" test "$(status_of "$a") $(perf_of "$a")" = "succeeded 1000"

# --- 20 concurrent jobs --------------------------------------------------------------------------
for i in $(seq 10 29); do
  (submit "c$i" "$(ordinary "5${i}1")" >"$work/c$i.id") &
done
wait
bad=()
for i in $(seq 10 29); do
  id=$(cat "$work/c$i.id")
  a=$(final "$id")
  [ "$(status_of "$a") $(perf_of "$a")" = "succeeded 0.5${i}1" ] || bad+=("job ${id:-?} (0.5${i}1): $a")
done
detail="${bad[*]:-}"
check "20 concurrent jobs, each with its own perf" test ${#bad[@]} = 0

# --- failure statuses ----------------------------------------------------------------------------
expect_failure() { # NAME STATUS DOCKERFILE
  local id a
  id=$(submit "$1" "$3")
  a=$(final "$id")
  detail="$a"
  check "$1 → $2, with a reason" test "$(status_of "$a")" = "$2" -a -n "$(jq -r '.error // empty' <<<"$a")"
}
expect_failure "a RUN step exiting 3" build_failed "$(printf 'FROM alpine\nRUN exit 3')"
expect_failure "a run exiting 1" run_failed "$(printf 'FROM alpine\nCMD exit 1')"
expect_failure "a run writing no perf.json" no_perf "$(printf 'FROM alpine\nCMD true')"
expect_failure "a perf that is not a number" invalid_perf "$(printf 'FROM alpine\nCMD echo {\\"perf\\":\\"fast\\"} > /data/perf.json')"
expect_failure "a FROM image the registry does not have" build_failed "$(printf 'FROM perfbox-no-such-image\nCMD true')"

# --- attacks, each beside an ordinary job --------------------------------------------------------
# attack NAME DOCKERFILE EXPECT-COMMAND: runs the attack and an ordinary job at once; the
# expectation gets the attack's final answer in $a and its record in $rec.
attack() {
  local name=$1 df=$2 expect=$3 id oid oa t0
  t0=$(date +%s)
  id=$(submit "attack" "$df")
  oid=$(submit "beside" "$(ordinary 4242)")
  a=$(final "$id")
  oa=$(final "$oid")
  rec=$(curl -sS "$url/job/$id")
  detail="attack: $a; ordinary job: $oa"
  check "$name ($(($(date +%s) - t0)) s)" eval "$expect"
  detail="$oa"
  check "  ... the ordinary job beside it got its perf" test "$(status_of "$oa") $(perf_of "$oa")" = "succeeded 0.4242"
}
# No network: the RUN step and the run each try the API on the container's loopback (127.0.0.1 is
# the host's here: --network host) and count their interfaces and routes. perf = RUN reached,
# run reached, interfaces, routes: 0010 is "only lo, no route, nothing reached".
a= rec=
attack "no network in a RUN step or in the run" "$(cat <<D
FROM alpine
RUN if nc -w 2 127.0.0.1 ${url##*:} </dev/null; then echo 1; else echo 0; fi > /reached
CMD r=\$(cat /reached); if nc -w 2 127.0.0.1 ${url##*:} </dev/null; then c=1; else c=0; fi; \
  n=\$(ip -o link | wc -l); k=\$(ip route | wc -l); echo "{\"perf\": 1\$r\$c\$n\$k}" > /data/perf.json
D
)" '[ "$(status_of "$a") $(perf_of "$a")" = "succeeded 10010" ]'
attack "perf.json symlinked to a file outside /data is refused" \
  "$(printf 'FROM alpine\nCMD ln -s /etc/hostname /data/perf.json')" \
  '[ "$(status_of "$a")" = invalid_perf ] && jq -r .error <<<"$a" | grep -qi symlink'
attack "a fork bomb is stopped" \
  "$(printf 'FROM alpine\nCMD f() { f | f & }; f; sleep 5; echo {\\"perf\\":1} > /data/perf.json')" \
  '[ "$(status_of "$a")" != succeeded ] || [ "$(perf_of "$a")" = 1 ]'
attack "a job that stops itself (SIGSTOP) times out" \
  "$(printf 'FROM alpine\nCMD sh -c '"'"'kill -STOP $$; echo {\\"perf\\":1} > /data/perf.json'"'"'; kill -STOP $$')" \
  '[ "$(status_of "$a")" = timed_out ]'
attack "a 3 GB allocation is refused (RLIMIT_AS: 4 x the 512 MiB memory limit)" \
  "$(printf 'FROM alpine\nCMD dd if=/dev/zero of=/dev/null bs=3000M count=1 && echo {\\"perf\\":1} > /data/perf.json')" \
  '[ "$(status_of "$a")" = run_failed ] && curl -sS "$url/job/$(jq -r .job <<<"$a")/logs" | grep -qi "memory"'
attack "a disk bomb in /data is stopped at its limit" \
  "$(printf 'FROM alpine\nCMD dd if=/dev/zero of=/data/fill bs=1M count=200000; echo {\\"perf\\":1} > /data/perf.json')" \
  '[ "$(status_of "$a")" != succeeded ] && jq -r .error <<<"$a" | grep -qiE "data|disk|bytes|space|limit"'

# Nothing an attack started outlives its job: the container holds its own processes only
# (docker-init, the entry point, the registry, rootlesskit, buildkitd, perfbox and their helpers).
procs=$("$docker" exec "$container" sh -c 'ls -d /proc/[0-9]* | wc -l')
detail="$procs processes: $("$docker" exec "$container" sh -c 'cat /proc/[0-9]*/comm' | sort | uniq -c | tr -s ' \n' ' ' | cut -c1-600)"
check "no process of the attacks is left in the container ($procs processes)" test "$procs" -lt 30

# --- specs, audits and limits --------------------------------------------------------------------
spec=$(curl -sS "$url/job/$readme/spec")
detail=$(jq -c '{ns: [.linux.namespaces[].type], caps: .process.capabilities, ro: .root.readonly, seccomp: (.linux.seccomp.defaultAction), mounts: [.mounts[] | select(.destination == "/data") | .source]}' <<<"$spec")
check "the README job's spec: user and network namespaces, no capability, read-only root, seccomp" \
  jq -e '([.linux.namespaces[].type] | index("user") and index("network"))
    and ([.process.capabilities // {} | .[] | length] | add // 0) == 0
    and .root.readonly == true and .linux.seccomp.defaultAction != null' <<<"$spec" >/dev/null
# Every rule holds but one, which fails as it should here: no cgroup in the container is writable,
# so a job's RUN steps share the build daemon's cgroup (docs/container.md).
audit_bad=()
n=0
for id in $(curl -sS "$url/jobs?limit=100&status=succeeded" | jq -r '.jobs[].id'); do
  au=$(curl -sS "$url/job/$id/audit")
  n=$((n + 1))
  jq -e '[.findings[] | select(.ok == false) | .rule] == ["build_cgroup"]
    and (.findings[] | select(.rule == "build_cgroup") | .detail | test("shared the build daemon"))
    and (.findings | length) > 10' <<<"$au" >/dev/null \
    || audit_bad+=("job $id: $(jq -c '[.findings[] | select(.ok == false) | {rule, detail}]' <<<"$au")")
done
detail="${audit_bad[*]:-}"
check "the audit of all $n succeeded jobs: every sandbox rule holds; build_cgroup fails, saying RUN steps shared the daemon's cgroup" \
  test ${#audit_bad[@]} = 0 -a $n -gt 20
rec=$(curl -sS "$url/job/$readme")
detail=$(jq -c '{runtime, cgroup, limits: (.limits | map_values(.by))}' <<<"$rec")
check "the README job's record says which limits applied: rlimits and perfbox's watchers, no cgroup" \
  jq -e '.runtime == "runc" and .cgroup == "none"
    and ([.limits.memory.by, .limits.pids.by, .limits.cpu.by, .limits.data.by, .limits.timeout.by]
         == ["rlimit", "rlimit", "not_applied", "sandbox", "sandbox"])
    and (.limits.cpu.reason | length > 0)' <<<"$rec" >/dev/null

# --- restart with state kept ---------------------------------------------------------------------
if [ -n "${RESTART:-}" ]; then
  # A job still running when the container stops: afterwards it says it was interrupted, and why.
  long=$(submit long "$(printf 'FROM alpine\nCMD sleep 60; echo {\\"perf\\":0.33} > /data/perf.json')")
  for _ in $(seq 300); do
    [ "$(curl -sS "$url/job/performance/$long" | jq -r .status)" = running ] && break
    sleep 0.2
  done
  before=$(curl -sS "$url/jobs?limit=100" | jq -c --argjson l "$long" '[.jobs[] | select(.id != $l) | {id, status, perf}] | sort_by(.id)')
  t0=$(date +%s)
  if bash -c "$RESTART" >"$work/restart.log" 2>&1; then
    ok "the container restarted ($(($(date +%s) - t0)) s)"
    after=$(curl -sS "$url/jobs?limit=100" | jq -c --argjson l "$long" '[.jobs[] | select(.id != $l) | {id, status, perf}] | sort_by(.id)')
    detail="before: $before; after: $after"
    check "every job and its result kept across the restart ($(jq length <<<"$after") jobs)" test "$before" = "$after"
    a=$(final "$long")
    detail="$a"
    check "the job running at the restart ends interrupted, saying why" \
      test "$(status_of "$a") $(jq -r .error <<<"$a")" = "interrupted perfbox stopped while the job was running; it did not finish"
    id=$(submit after-restart "$(ordinary 7777)")
    a=$(final "$id")
    detail="$a"
    check "a job after the restart succeeds (job $id)" test "$(status_of "$a") $(perf_of "$a")" = "succeeded 0.7777"
  else
    fail "the container restarted" "$(tail -20 "$work/restart.log")"
  fi
fi

echo "container: $passed passed, $failed failed ($(($(date +%s) - t_start)) s)"
[ "$failed" = 0 ]
