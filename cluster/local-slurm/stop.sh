#!/usr/bin/env bash
# Stop the one-node Slurm cluster that cluster/local-slurm/start.sh started in RUN_DIR.
#
#   cluster/local-slurm/stop.sh RUN_DIR [--purge]
#
# Cancels the cluster's jobs first (their slurmstepd processes are children of no pid we hold),
# then ends exactly the processes whose ids start.sh recorded in RUN_DIR/pids: slurmd, slurmctld
# and munged. A pid is only signalled while it still runs the program it was recorded for, so a
# recycled pid is never hit. --purge also removes RUN_DIR afterwards. Safe to run twice.
set -euo pipefail

log() { echo "local-slurm: $*" >&2; }

if [[ $# -lt 1 || $# -gt 2 || $1 == -h || $1 == --help || ($# -eq 2 && $2 != --purge) ]]; then
  # The header comment is the usage text.
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
  exit 1
fi
if [[ ! -d $1 ]]; then
  log "nothing to stop: $1 does not exist"
  exit 0
fi
run_dir="$(cd "$1" && pwd)"
readonly run_dir
readonly purge="${2:-}"

# The pid recorded for NAME if that process is still alive and still NAME, else nothing.
live_pid() {
  local name=$1 pid_file="$run_dir/pids/$1.pid" pid comm
  [[ -s $pid_file ]] || return 0
  pid=$(<"$pid_file")
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  # /proc/PID/comm is cut to 15 characters.
  [[ -n $comm && $comm == "${name:0:15}" ]] && echo "$pid"
  return 0
}

# Jobs still running would leave slurmstepd and their tasks behind once slurmd is gone.
conf="$run_dir/etc/slurm.conf"
if [[ -n $(live_pid slurmctld) && -f $conf ]]; then
  export SLURM_CONF="$conf"
  if [[ -n $(squeue -h -o %i 2>/dev/null | head -n 1) ]]; then
    log "cancelling the cluster's jobs"
    mapfile -t jobs < <(squeue -h -o %i 2>/dev/null)
    scancel --quiet "${jobs[@]}" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
      [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null | head -n 1) ]] && break
      sleep 0.5
    done
  fi
fi

# Slurm daemons first (they use munged to shut down cleanly), munged last.
for name in slurmd slurmctld munged; do
  pid=$(live_pid "$name")
  if [[ -z $pid ]]; then
    rm -f "$run_dir/pids/$name.pid"
    continue
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    [[ -z $(live_pid "$name") ]] && break
    sleep 0.2
  done
  if [[ -n $(live_pid "$name") ]]; then
    log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$run_dir/pids/$name.pid"
  log "stopped $name (pid $pid)"
done

if [[ $purge == --purge ]]; then
  rm -rf "$run_dir"
fi
