#!/usr/bin/env bash
# Start a one-node Slurm cluster (munged + slurmctld + slurmd, all as root) for sinkscope's tests.
#
#   cluster/local-slurm/start.sh RUN_DIR        e.g. /tmp/sinkscope-slurm
#   source RUN_DIR/env.sh                       points sbatch/srun/squeue/... at it (SLURM_CONF)
#   cluster/local-slurm/stop.sh RUN_DIR
#
# Everything it writes (config, keys, state, spool, logs, pid files) lives under RUN_DIR, and
# stop.sh ends exactly the processes whose ids start.sh recorded there. It is meant for a test
# machine or a container without systemd: it installs Debian's slurm-wlm and munge when missing.
#
# Environment (all optional):
#   LOCAL_SLURM_CPUS=8            CPUs the node declares (more than present, so 4-rank jobs fit)
#   LOCAL_SLURM_PORT=6817         slurmctld port (slurmd uses the next one); default: the first
#                                 free pair from 6817 on, so two clusters can coexist
#   LOCAL_SLURM_PARTITION=debug   partition name
#   LOCAL_SLURM_WAIT=60           seconds to wait for the node to become idle
#   LOCAL_SLURM_NO_INSTALL=1      never run apt-get (fail instead when packages are missing)
#
# Exit status: 0 up and idle; 1 usage; 2 could not start (the reason is printed, logs are in
# RUN_DIR/log); on failure the processes already started are stopped again.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly here

die() {
  echo "local-slurm: error: $*" >&2
  exit 2
}
log() { echo "local-slurm: $*" >&2; }

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
  # The header comment is the usage text.
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
  exit 1
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (slurmd and munged are started as root)"

mkdir -p "$1"
run_dir="$(cd "$1" && pwd)"
readonly run_dir
readonly cpus="${LOCAL_SLURM_CPUS:-8}"
readonly partition="${LOCAL_SLURM_PARTITION:-debug}"
readonly wait_s="${LOCAL_SLURM_WAIT:-60}"
# The name slurmd registers under must be what `hostname -s` says, or it refuses to start.
host="$(hostname -s)"
readonly host

# ---- packages ------------------------------------------------------------------------------
# The daemons live in /usr/sbin, which a CI runner's or sudo's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
need_install=()
for cmd in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || need_install+=("${cmd#*:}")
done
if ((${#need_install[@]})); then
  [[ ${LOCAL_SLURM_NO_INSTALL:-0} == 1 ]] && die "missing ${need_install[*]} (LOCAL_SLURM_NO_INSTALL=1)"
  command -v apt-get >/dev/null 2>&1 || die "missing ${need_install[*]} and no apt-get to install slurm-wlm munge"
  log "installing slurm-wlm munge (missing: ${need_install[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists yet; an old list may name versions that are gone.
  install_log="$run_dir/apt-get.log"
  if ! apt-get install -y --no-install-recommends slurm-wlm munge >"$install_log" 2>&1; then
    apt-get update >>"$install_log" 2>&1 || die "apt-get update failed (see $install_log)"
    apt-get install -y --no-install-recommends slurm-wlm munge >>"$install_log" 2>&1 ||
      die "apt-get install slurm-wlm munge failed (see $install_log)"
  fi
fi
for cmd in slurmctld slurmd sinfo srun munged munge unmunge; do
  command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found after installing slurm-wlm munge"
done

# ---- refuse to start twice into the same folder ----------------------------------------------
for name in slurmctld slurmd munged; do
  pid_file="$run_dir/pids/$name.pid"
  if [[ -s $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    die "$name is already running from $run_dir (pid $(cat "$pid_file")); run stop.sh $run_dir first"
  fi
done

# State from an earlier cluster in the same folder would bring back its jobs; start clean.
rm -rf "$run_dir/state" "$run_dir/spool" "$run_dir/run" "$run_dir/pids" "$run_dir/log" "$run_dir/tmp"
mkdir -p "$run_dir"/{etc,state,spool/slurmd,run,pids,log,munge,tmp}
# munged refuses a key in a folder others can write to, and wants its socket's folder searchable.
chmod 0755 "$run_dir/munge"

# Processes started so far; on any failure below they are stopped again so that a failed start
# leaves nothing running.
started_ok=0
cleanup_on_failure() {
  if [[ $started_ok -ne 1 ]]; then
    log "start failed; stopping what was started (logs: $run_dir/log)"
    "$here/stop.sh" "$run_dir" >&2 || true
  fi
}
trap cleanup_on_failure EXIT

# Runs "$@" in the background in its own session (so the caller's job control and signals never
# reach it) and records its pid as RUN_DIR/pids/NAME.pid for stop.sh.
start_daemon() {
  local name=$1
  shift
  setsid "$@" </dev/null >"$run_dir/log/$name.out" 2>&1 &
  echo $! >"$run_dir/pids/$name.pid"
}

# ---- munge -----------------------------------------------------------------------------------
# A munged of our own, with a key and a socket in RUN_DIR: it works the same whether or not the
# machine runs one, and a test never depends on (or disturbs) the host's key.
munge_socket="$run_dir/munge/munge.socket"
munge_key="$run_dir/munge/munge.key"
if command -v mungekey >/dev/null 2>&1; then
  mungekey --create --keyfile="$munge_key" --force >/dev/null
else
  dd if=/dev/urandom of="$munge_key" bs=1024 count=1 status=none
fi
chmod 0400 "$munge_key"
# --foreground keeps the pid we record the pid of munged itself (it then logs to stderr, which
# start_daemon sends to log/munged.out); --force accepts running as root.
start_daemon munged munged --foreground --force \
  --key-file="$munge_key" --socket="$munge_socket" \
  --pid-file="$run_dir/run/munged.pid" --seed-file="$run_dir/munge/munged.seed"
for ((i = 0; i < 50; i++)); do
  if munge -n -S "$munge_socket" 2>/dev/null | unmunge -S "$munge_socket" >/dev/null 2>&1; then
    break
  fi
  kill -0 "$(cat "$run_dir/pids/munged.pid")" 2>/dev/null ||
    die "munged exited: $(tail -n 3 "$run_dir/log/munged.out" 2>/dev/null)"
  sleep 0.2
done
munge -n -S "$munge_socket" | unmunge -S "$munge_socket" >/dev/null 2>&1 ||
  die "munged does not answer on $munge_socket"

# ---- ports -----------------------------------------------------------------------------------
port_in_use() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [[ -n ${LOCAL_SLURM_PORT:-} ]]; then
  ctld_port=$LOCAL_SLURM_PORT
else
  ctld_port=6817
  while port_in_use "$ctld_port" || port_in_use "$((ctld_port + 1))"; do
    ctld_port=$((ctld_port + 2))
    ((ctld_port < 6917)) || die "no free port pair between 6817 and 6917"
  done
fi
slurmd_port=$((ctld_port + 1))

# ---- slurm.conf ------------------------------------------------------------------------------
# RealMemory a little under what the machine has: slurmd drains a node that declares more.
mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
conf="$run_dir/etc/slurm.conf"
sed -e "s|@HOSTNAME@|$host|g" \
  -e "s|@RUN_DIR@|$run_dir|g" \
  -e "s|@SLURM_USER@|root|g" \
  -e "s|@SLURMCTLD_PORT@|$ctld_port|g" \
  -e "s|@SLURMD_PORT@|$slurmd_port|g" \
  -e "s|@MUNGE_SOCKET@|$munge_socket|g" \
  -e "s|@CPUS@|$cpus|g" \
  -e "s|@REAL_MEMORY_MB@|$mem_mb|g" \
  -e "s|@PARTITION@|$partition|g" \
  "$here/slurm.conf.in" >"$conf"
leftover=$(grep -v '^#' "$conf" | grep -o '@[A-Z_]*@' | head -n 1 || true)
[[ -z $leftover ]] || die "slurm.conf.in has a placeholder start.sh does not fill: $leftover"
# cgroup.conf is read by some plugins even when cgroups are off; an empty one avoids a warning.
: >"$run_dir/etc/cgroup.conf"
export SLURM_CONF="$conf"

cat >"$run_dir/env.sh" <<EOF
# Source this to talk to the local test cluster started by cluster/local-slurm/start.sh.
export SLURM_CONF=$(printf '%q' "$conf")
# Open MPI refuses to run as root unless told twice.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
EOF

# ---- daemons ---------------------------------------------------------------------------------
# -D: stay in the foreground so the recorded pid is the daemon's; -c: ignore saved state (a test
# cluster never carries jobs over); -i: ignore state it cannot read.
start_daemon slurmctld slurmctld -D -c -i -f "$conf"
# slurmd must find the controller listening, otherwise its first registration is delayed.
for ((i = 0; i < 50; i++)); do
  port_in_use "$ctld_port" && break
  kill -0 "$(cat "$run_dir/pids/slurmctld.pid")" 2>/dev/null ||
    die "slurmctld exited: $(tail -n 5 "$run_dir/log/slurmctld.out" "$run_dir/log/slurmctld.log" 2>/dev/null)"
  sleep 0.2
done
start_daemon slurmd slurmd -D -f "$conf" -N "$host"

# ---- wait for the node (bounded) --------------------------------------------------------------
deadline=$((SECONDS + wait_s))
state=""
while ((SECONDS < deadline)); do
  for name in slurmctld slurmd; do
    kill -0 "$(cat "$run_dir/pids/$name.pid")" 2>/dev/null ||
      die "$name exited: $(tail -n 5 "$run_dir/log/$name.out" "$run_dir/log/$name.log" 2>/dev/null)"
  done
  state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null | head -n 1 || true)
  [[ $state == idle ]] && break
  sleep 0.5
done
[[ $state == idle ]] || die "node $host not idle after ${wait_s}s (state '${state:-none}'); see $run_dir/log"

# The jobs launch MPI ranks through srun --mpi=pmix; a Slurm without the plugin is no use here.
if ! srun --mpi=list 2>&1 | grep -qw pmix; then
  die "srun --mpi=list does not offer pmix: $(srun --mpi=list 2>&1 | tr '\n' ' ')"
fi

started_ok=1
log "up: node $host idle with $cpus CPUs, partition $partition, slurmctld port $ctld_port"
log "use: source $run_dir/env.sh   stop: $here/stop.sh $run_dir"
