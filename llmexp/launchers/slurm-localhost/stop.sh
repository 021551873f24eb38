#!/usr/bin/env bash
# stop.sh - undo what start.sh did for the cluster in $BASE (same BASE), leaving the machine
# as it was before: cancel its jobs, stop its daemons, kill leftover job processes, revert
# what $BASE/undo records (its /etc/hosts line, its slurm.conf symlink and the directory made
# for it), remove a policy-rc.d a killed start.sh left behind, and remove $BASE itself.
#
# Only PIDs recorded in $BASE/run/*.pid (checked against the expected program name) and
# leftover job processes carrying SLURM_CONF=$BASE/etc/slurm.conf in their environment are
# signalled. Running it again is a no-op.
#
# Usage: bash stop.sh [--quiet] [--keep]     (--keep: leave $BASE, its logs and state, for a look)
set -u
BASE=${BASE:-${TMPDIR:-/tmp}/llmexp-slurm}
QUIET=0; KEEP=0
for a in "$@"; do case $a in --quiet) QUIET=1;; --keep) KEEP=1;; esac; done
say() { [ "$QUIET" = 1 ] || echo "[slurm-localhost stop] $*"; }
CONF=$BASE/etc/slurm.conf
[ -d "$BASE/run" ] || { say "nothing to stop ($BASE/run missing)"; exit 0; }
export SLURM_CONF=$CONF

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
stop_pidfiles() {  # stop_pidfiles "<pidfile>:<expected comm>" ...  (TERM all at once, then wait, then KILL)
  local spec f comm pid pids=() names=()
  for spec in "$@"; do
    f=${spec%%:*}; comm=${spec##*:}
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null)
    if alive "$pid" && [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$comm" ]; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid") && names+=("$comm($pid)")
    fi
    rm -f "$f"
  done
  [ ${#pids[@]} -eq 0 ] && { say "no daemons running"; return 0; }
  for _ in $(seq 150); do
    local left=0; for pid in "${pids[@]}"; do alive "$pid" && left=1; done
    [ $left = 0 ] && break; sleep 0.1
  done
  for pid in "${pids[@]}"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null && say "killed -9 pid $pid"; done
  say "stopped ${names[*]}"
}

# 1. cancel jobs while the controller is still up
if [ -f "$BASE/run/slurmctld.pid" ] && alive "$(cat "$BASE/run/slurmctld.pid")"; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    say "cancelled jobs: $jobs"
  fi
fi
# 2. all daemons together (the next start wipes state and DB anyway)
specs=(); for f in "$BASE"/run/slurmd-*.pid; do [ -e "$f" ] && specs+=("$f:slurmd"); done
stop_pidfiles "${specs[@]}" "$BASE/run/slurmctld.pid:slurmctld" "$BASE/run/slurmdbd.pid:slurmdbd" \
              "$BASE/run/mariadbd.pid:mariadbd" "$BASE/run/munged.pid:munged"
# 3. leftover slurmstepd / job processes of THIS cluster (identified by SLURM_CONF in their environment)
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  [ "$pid" = "$$" ] && continue
  grep -qzx "SLURM_CONF=$CONF" "$p/environ" 2>/dev/null || continue
  c=$(cat "$p/comm" 2>/dev/null)
  case $c in
    slurmstepd) ;;
    *) grep -qz '^SLURM_JOB_ID=' "$p/environ" 2>/dev/null || continue ;;  # spare the caller's own shells
  esac
  kill -KILL "$pid" 2>/dev/null && say "killed leftover $c ($pid)"
done
# 4. what start.sh changed outside $BASE, newest first
if [ -f "$BASE/undo" ]; then
  tac "$BASE/undo" | while read -r kind what; do
    case $kind in
      hosts)  # rewritten in place: /etc/hosts is often a bind mount that cannot be replaced by a rename
        if grep -qxF "$what" /etc/hosts; then
          kept=$(grep -vxF "$what" /etc/hosts); printf '%s\n' "$kept" > /etc/hosts && say "removed from /etc/hosts: $what"
        fi ;;
      link) [ "$(readlink "$what" 2>/dev/null)" = "$CONF" ] && rm -f "$what" && say "removed the symlink $what" ;;
      dir) rmdir "$what" 2>/dev/null && say "removed the directory $what" ;;
    esac
  done
  rm -f "$BASE/undo"
fi
if grep -qs '^# slurm-localhost start.sh' /usr/sbin/policy-rc.d; then rm -f /usr/sbin/policy-rc.d && say "removed /usr/sbin/policy-rc.d"; fi
if [ "$KEEP" = 1 ]; then
  say "kept $BASE (logs, state)"
elif [ -e "$BASE/.slurm-localhost" ] || [ -e "$BASE/run/settings" ]; then  # made by start.sh (now or before its marker)
  rm -rf "$BASE" && say "removed $BASE"
fi
exit 0
