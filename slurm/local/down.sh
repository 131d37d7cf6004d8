#!/usr/bin/env bash
# slurm/local/down.sh - stop the test/CI SLURM cluster started by slurm/local/up.sh (or by the
# team's slurm-local-up.sh, which uses the same markers). Idempotent. For tests/CI only, not for
# production clusters. Needs root (the daemons run as root); needs no apt and uninstalls nothing.
# Cancels all jobs, then stops every slurmd, slurmctld, slurmdbd and (only if up.sh started them)
# mariadbd and munged, each by the PID in its pidfile, checked against /proc/PID/comm (never by
# name). Also removes the /etc/hosts lines and the optional /usr/local/bin/sacct shim that up.sh
# added.
#   --purge   also delete the state directory (logs included)
set -uo pipefail

STATE=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
export SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
HOSTS_MARK="# slurm-local-up.sh"
log() { echo "[slurm/local/down] $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }

pid_of() {  # pid_of PIDFILE COMM -> prints the pid if alive and matching
  local f=$1 comm=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$comm" ] && echo "$pid"
}
stop() {  # stop "PIDFILE COMM" ... : SIGTERM all of them at once, wait (max 10 s), then SIGKILL
  local spec f comm pid pids=() names=()
  for spec in "$@"; do
    f=${spec% *}; comm=${spec##* }
    if pid=$(pid_of "$f" "$comm"); then kill -TERM "$pid" 2>/dev/null; pids+=("$pid"); names+=("$comm($pid)"); fi
    rm -f "$f"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  for _ in $(seq 1 100); do
    local alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then log "pid $pid ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null; fi
  done
  log "stopped ${names[*]}"
}

# 1. cancel every job while the controller is still up; wait until the job steps are gone
if pid_of "$STATE/run/slurmctld.pid" slurmctld >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

# 2. daemons: slurmd(s) and slurmctld together, then slurmdbd/mariadbd/munged if they are ours
specs=()
for f in "$STATE"/run/slurmd-*.pid "$STATE"/run/slurmd.pid; do [ -e "$f" ] && specs+=("$f slurmd"); done
specs+=("$STATE/run/slurmctld.pid slurmctld")
stop "${specs[@]}"
# accounting (SLURM_LOCAL_ACCOUNTING=1): slurmdbd, then mariadbd if we started it
stop "$STATE/run/slurmdbd.pid slurmdbd"
if [ -f "$STATE/run/mariadbd.pid" ]; then stop "$STATE/run/mariadbd.pid mariadbd"; fi
if [ -f "$STATE/run/munged.pid" ]; then
  stop "$STATE/run/munged.pid munged"
  rm -f /run/munge/munged.pid
fi
rm -f "$STATE/shape"

# 3. things slurm-local-up.sh may have added outside $STATE
if [ -f /usr/local/bin/sacct ] && grep -q "slurm-local-up.sh" /usr/local/bin/sacct 2>/dev/null; then
  rm -f /usr/local/bin/sacct
fi
if grep -q "$HOSTS_MARK\$" /etc/hosts 2>/dev/null; then
  # /etc/hosts may be a bind mount (docker): rewrite in place instead of replacing the file
  grep -v "$HOSTS_MARK\$" /etc/hosts > /tmp/.hosts.slurm-local && cat /tmp/.hosts.slurm-local > /etc/hosts
  rm -f /tmp/.hosts.slurm-local
fi

if [ "${1:-}" = "--purge" ]; then
  rm -rf "$STATE"
  log "removed $STATE"
fi
exit 0
