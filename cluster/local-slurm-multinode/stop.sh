#!/usr/bin/env bash
# Stop the multi-node test cluster that cluster/local-slurm-multinode/start.sh started in RUN_DIR.
#
#   cluster/local-slurm-multinode/stop.sh RUN_DIR [--purge]
#
# Cancels the cluster's jobs, ends exactly the processes whose ids start.sh recorded (slurmds,
# slurmctld, munged; a pid is signalled only while it still runs that program), kills what is
# left inside the cluster's namespaces (job steps whose slurmd is gone), and deletes the
# namespaces and the bridge named in RUN_DIR/names. --purge also removes RUN_DIR. Safe to run
# twice, and on a start that failed half way.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "multinode-slurm: $*" >&2; }

if [[ $# -lt 1 || $# -gt 2 || $1 == -h || $1 == --help || ($# -eq 2 && $2 != --purge) ]]; then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
  exit 1
fi
if [[ ! -d $1 ]]; then
  log "nothing to stop: $1 does not exist"
  exit 0
fi
run_dir="$(cd "$1" && pwd)"
readonly run_dir

live_pid() {
  local name=$1 pid_file="$run_dir/pids/$1.pid" pid comm want
  [[ -s $pid_file ]] || return 0
  pid=$(<"$pid_file")
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  want=${name%%.*}
  [[ -n $comm && $comm == "${want:0:15}" ]] && echo "$pid"
  return 0
}

conf="$run_dir/etc/slurm.conf"
if [[ -n $(live_pid slurmctld) && -f $conf ]]; then
  export SLURM_CONF="$conf"
  mapfile -t jobs < <(timeout 10 squeue -h -o %i 2>/dev/null || true)
  if ((${#jobs[@]})); then
    log "cancelling the cluster's jobs"
    timeout 10 scancel --quiet "${jobs[@]}" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
      [[ -z $(timeout 5 squeue -h -t running,completing -o %i 2>/dev/null | head -n 1) ]] && break
      sleep 0.5
    done
  fi
fi

stop_pid_file() {
  local name=$1 pid
  pid=$(live_pid "$name")
  if [[ -n $pid ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      [[ -z $(live_pid "$name") ]] && break
      sleep 0.2
    done
    if [[ -n $(live_pid "$name") ]]; then
      log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$run_dir/pids/$name.pid"
}
for f in "$run_dir"/pids/slurmd.*.pid; do
  [[ -e $f ]] || continue
  name=$(basename "$f" .pid)
  stop_pid_file "$name"
done
stop_pid_file slurmctld
stop_pid_file munged

if [[ -s $run_dir/names ]]; then
  # shellcheck source=/dev/null
  source <(grep -E '^(bridge|subnet|namespaces)=' "$run_dir/names" | sed 's/=\(.*\)$/="\1"/')
  for ns in ${namespaces:-}; do
    [[ -e /run/netns/$ns ]] || continue
    # Processes still inside (steps of a job whose slurmd was stopped): only these namespaces'.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      kill -KILL "$pid" 2>/dev/null || true
    done
    ip netns del "$ns" 2>/dev/null || log "could not delete namespace $ns"
  done
  if [[ -n ${bridge:-} ]] && ip link show "$bridge" >/dev/null 2>&1; then
    ip link del "$bridge" || log "could not delete bridge $bridge"
  fi
  rm -f "$run_dir/names"
  log "removed the namespaces and bridge ${bridge:-}"
fi

if [[ ${2:-} == --purge ]]; then
  rm -rf "$run_dir"
fi
