#!/usr/bin/env bash
# Start a Slurm cluster of several "nodes" on one machine, for sinkscope's multi-node tests: each
# node is a Linux network namespace with its own hostname (UTS namespace), address and slurmd;
# one more namespace, "head", runs slurmctld. The namespaces hang on one bridge, so every daemon,
# srun and MPI rank talks to the others over TCP, as on a real cluster.
#
#   cluster/local-slurm-multinode/start.sh RUN_DIR [NODES]     NODES: 2 (default) or 3
#   source RUN_DIR/env.sh                      SLURM_CONF, Open MPI over TCP on the bridge
#   cluster/local-slurm-multinode/stop.sh RUN_DIR
#
#   head   (slurmctld)  SUBNET.10          node1 (slurmd)  SUBNET.11   node2  SUBNET.12  ...
#   the bridge (in the machine's own namespace, where sbatch/squeue run) SUBNET.1
#
# Each node's processes also get a node-local Slurm TmpFS (RUN_DIR/tmp is bind-mounted from
# RUN_DIR/nodes/NAME/tmp in the node's mount namespace), as two real nodes would; the rest of the
# file system is shared, as a cluster's parallel file system is.
#
# Everything it writes lives under RUN_DIR; stop.sh ends exactly the processes recorded there and
# deletes the namespaces and the bridge whose names it recorded. Needs root, `ip`, `unshare`,
# slurm-wlm and munge (Debian: installs them when missing, like cluster/local-slurm/start.sh).
#
# Environment (optional):
#   MULTINODE_SLURM_CPUS=2      CPUs each node declares
#   MULTINODE_SLURM_PORT=7817   slurmctld port inside the head namespace (slurmd: the next one)
#   MULTINODE_SLURM_WAIT=60     seconds to wait for the nodes to become idle
#
# Exit status: 0 up; 1 usage; 2 could not start (reason printed; logs in RUN_DIR/log); 3 the
# kernel refuses network namespaces or bridges (reason printed): callers may treat 3 as "skip".
# A failed start stops what it started.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly here

die() {
  echo "multinode-slurm: error: $*" >&2
  exit 2
}
refused() {
  echo "multinode-slurm: the kernel refuses: $*" >&2
  exit 3
}
log() { echo "multinode-slurm: $*" >&2; }

if [[ $# -lt 1 || $# -gt 2 || $1 == -h || $1 == --help ]]; then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
  exit 1
fi
readonly num_nodes=${2:-2}
[[ $num_nodes =~ ^[23]$ ]] || {
  echo "multinode-slurm: error: NODES must be 2 or 3 (got '$num_nodes')" >&2
  exit 1
}
export PATH="$PATH:/usr/sbin:/sbin"
for cmd in ip unshare nsenter mount; do
  command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found (iproute2 / util-linux)"
done
# First of all: does the kernel let us make a network namespace (not as a user without
# CAP_SYS_ADMIN, not in many containers)? Exit 3 says so, and nothing else is touched.
probe_ns="sinkscope-mnprobe-$$"
if ! err=$(ip netns add "$probe_ns" 2>&1); then
  refused "ip netns add (network namespaces; running as uid $(id -u)): $err"
fi
ip netns del "$probe_ns" 2>/dev/null || true
if ! err=$(unshare --uts true 2>&1); then
  refused "unshare --uts (UTS namespaces, for the nodes' own host names): $err"
fi
[[ $(id -u) -eq 0 ]] || die "must run as root (slurmd and munged are started as root)"

mkdir -p "$1"
run_dir="$(cd "$1" && pwd)"
readonly run_dir
readonly cpus=${MULTINODE_SLURM_CPUS:-2}
readonly ctld_port=${MULTINODE_SLURM_PORT:-7817}
readonly slurmd_port=$((ctld_port + 1))
readonly wait_s=${MULTINODE_SLURM_WAIT:-60}

# ---- packages ----------------------------------------------------------------------------------
need_install=()
for cmd in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || need_install+=("${cmd#*:}")
done
if ((${#need_install[@]})); then
  command -v apt-get >/dev/null 2>&1 || die "missing ${need_install[*]} and no apt-get"
  log "installing slurm-wlm munge (missing: ${need_install[*]})"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge \
    >"$run_dir/apt-get.log" 2>&1 || die "apt-get install slurm-wlm munge failed (see $run_dir/apt-get.log)"
fi

# ---- refuse to start twice into the same folder --------------------------------------------------
if [[ -s $run_dir/names ]]; then
  die "$run_dir holds a cluster already (names recorded in $run_dir/names); run stop.sh $run_dir first"
fi
rm -rf "$run_dir"/{etc,state,spool,run,pids,log,munge,tmp,nodes}
mkdir -p "$run_dir"/{etc,state,spool,run,pids,log,munge,tmp,nodes}
chmod 0755 "$run_dir/munge"

started_ok=0
cleanup_on_failure() {
  if [[ $started_ok -ne 1 ]]; then
    log "start failed; stopping what was started (logs: $run_dir/log)"
    "$here/stop.sh" "$run_dir" >&2 || true
  fi
}
trap cleanup_on_failure EXIT

# ---- names and a free subnet ---------------------------------------------------------------------
# Interface names have at most 15 characters; the id keeps two clusters (two test runs) apart.
id=$(printf '%05d' $(($$ % 100000)))
bridge="ssmb$id"
ns_prefix="sinkscope-mn$id"
subnet=""
for third in $(seq $((200 + $$ % 40)) 254) $(seq 200 254); do
  candidate="10.217.$third"
  if ! ip -o -4 addr show | grep -q " $candidate\." && ! ip -4 route show | grep -q "^$candidate\."; then
    subnet=$candidate
    break
  fi
done
[[ -n $subnet ]] || die "no free 10.217.X.0/24 subnet"
nodes=()
for ((i = 1; i <= num_nodes; i++)); do nodes+=("node$i"); done
# Recorded before anything is created, so stop.sh removes whatever part of it exists.
{
  echo "bridge=$bridge"
  echo "subnet=$subnet"
  echo "namespaces=${ns_prefix}-head $(printf "${ns_prefix}-%s " "${nodes[@]}")"
} >"$run_dir/names"

# ---- network: a bridge, one namespace per host ---------------------------------------------------
# The first namespace tells whether the kernel allows them at all (containers often do not).
if ! err=$(ip netns add "${ns_prefix}-head" 2>&1); then
  refused "ip netns add: $err"
fi
if ! err=$(ip link add "$bridge" type bridge 2>&1); then
  refused "ip link add type bridge: $err"
fi
ip addr add "$subnet.1/24" dev "$bridge"
ip link set "$bridge" up

# add_host NAME INDEX: namespace NAME with address SUBNET.(10 + INDEX) on the bridge.
add_host() {
  local name=$1 index=$2 ns="${ns_prefix}-$1" veth="ssv${id}h$2"
  [[ $name == head ]] || ip netns add "$ns" || refused "ip netns add $ns"
  ip link add "$veth" type veth peer name "ssp${id}h$index" || refused "ip link add type veth"
  ip link set "ssp${id}h$index" netns "$ns"
  ip link set "$veth" master "$bridge"
  ip link set "$veth" up
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "ssp${id}h$index" name eth0
  ip -n "$ns" addr add "$subnet.$((10 + index))/24" dev eth0
  ip -n "$ns" link set eth0 up
}
add_host head 0
for ((i = 1; i <= num_nodes; i++)); do add_host "node$i" "$i"; done
# The bridge forwards between its ports without the host's firewall (a host with br_netfilter
# loaded would otherwise pass every frame through iptables).
if [[ -w /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then
  ip link set "$bridge" type bridge nf_call_iptables 0 2>/dev/null || true
fi
for ((i = 1; i <= num_nodes; i++)); do
  # No ping needed: a TCP connection to a closed port is refused only when the host answers.
  probe=$(ip netns exec "${ns_prefix}-head" timeout 5 bash -c ": </dev/tcp/$subnet.$((10 + i))/9" 2>&1 || true)
  [[ $probe == *refused* ]] ||
    die "head cannot reach node$i ($subnet.$((10 + i))) over the bridge $bridge: ${probe:-timed out}"
done

# ---- munge: one daemon, its socket reached by path from every namespace ---------------------------
munge_socket="$run_dir/munge/munge.socket"
munge_key="$run_dir/munge/munge.key"
if command -v mungekey >/dev/null 2>&1; then
  mungekey --create --keyfile="$munge_key" --force >/dev/null
else
  dd if=/dev/urandom of="$munge_key" bs=1024 count=1 status=none
fi
chmod 0400 "$munge_key"

# start_daemon NAME NAMESPACE HOSTNAME CMD...: runs CMD in its own session inside NAMESPACE
# (network), a new UTS namespace with HOSTNAME and a new mount namespace where RUN_DIR/tmp is
# the node's own folder. Every step execs, so the recorded pid is CMD's.
start_daemon() {
  local name=$1 ns=$2 host=$3
  shift 3
  local node_tmp="$run_dir/nodes/$host/tmp"
  mkdir -p "$node_tmp"
  if [[ -z $ns ]]; then
    setsid "$@" </dev/null >"$run_dir/log/$name.out" 2>&1 &
  else
    # nsenter rather than `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup
    # (slurmd needs it even with proctrack/linuxproc).
    setsid nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation slave -- /bin/sh -c \
      'hostname "$1" && mount --bind "$2" "$3" && shift 3 && exec "$@"' \
      sh "$host" "$node_tmp" "$run_dir/tmp" "$@" </dev/null >"$run_dir/log/$name.out" 2>&1 &
  fi
  echo $! >"$run_dir/pids/$name.pid"
}
start_daemon munged "" "" munged --foreground --force --key-file="$munge_key" \
  --socket="$munge_socket" --pid-file="$run_dir/run/munged.pid" --seed-file="$run_dir/munge/munged.seed"
for ((i = 0; i < 50; i++)); do
  munge -n -S "$munge_socket" 2>/dev/null | unmunge -S "$munge_socket" >/dev/null 2>&1 && break
  sleep 0.2
done
munge -n -S "$munge_socket" | unmunge -S "$munge_socket" >/dev/null 2>&1 ||
  die "munged does not answer on $munge_socket: $(tail -n 3 "$run_dir/log/munged.out" 2>/dev/null)"

# ---- slurm.conf ----------------------------------------------------------------------------------
mem_mb=$(awk -v n="$num_nodes" '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 / n }' /proc/meminfo)
conf="$run_dir/etc/slurm.conf"
{
  cat <<EOF
# Generated by cluster/local-slurm-multinode/start.sh: $num_nodes nodes in network namespaces.
ClusterName=sinkscope-multinode
SlurmctldHost=head($subnet.10)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$munge_socket,cred_expire=10
StateSaveLocation=$run_dir/state
# %n: per node, as on real nodes (the pmix plugin keeps its per-step sockets there).
SlurmdSpoolDir=$run_dir/spool/%n
SlurmctldPidFile=$run_dir/run/slurmctld.pid
SlurmdPidFile=$run_dir/run/slurmd.%n.pid
SlurmctldLogFile=$run_dir/log/slurmctld.log
SlurmdLogFile=$run_dir/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Bind-mounted per node by start.sh (see the header).
TmpFS=$run_dir/tmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmix
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
Waittime=0
# A node whose slurmd stops answering is marked DOWN after this long (real clusters: 300 s).
SlurmdTimeout=30
SchedulerParameters=sched_interval=2,bf_interval=2
MaxArraySize=10001
EOF
  for ((i = 1; i <= num_nodes; i++)); do
    echo "NodeName=node$i NodeAddr=$subnet.$((10 + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=node[1-$num_nodes] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
} >"$conf"
: >"$run_dir/etc/cgroup.conf"
for n in "${nodes[@]}"; do mkdir -p "$run_dir/spool/$n"; done

cat >"$run_dir/env.sh" <<EOF
# Source this to talk to the multi-node test cluster of cluster/local-slurm-multinode/start.sh.
export SLURM_CONF=$(printf '%q' "$conf")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The nodes' subnet and namespaces (tests use them to reach one node's processes).
export MULTINODE_SUBNET=$subnet.0/24
export MULTINODE_NS_PREFIX=$ns_prefix
export MULTINODE_NODES="${nodes[*]}"
EOF
export SLURM_CONF="$conf"

# ---- daemons -------------------------------------------------------------------------------------
start_daemon slurmctld "${ns_prefix}-head" head slurmctld -D -c -i -f "$conf"
for ((i = 0; i < 50; i++)); do
  (: <"/dev/tcp/$subnet.10/$ctld_port") 2>/dev/null && break
  kill -0 "$(cat "$run_dir/pids/slurmctld.pid")" 2>/dev/null ||
    die "slurmctld exited: $(tail -n 5 "$run_dir/log/slurmctld.out" "$run_dir/log/slurmctld.log" 2>/dev/null)"
  sleep 0.2
done
for n in "${nodes[@]}"; do
  start_daemon "slurmd.$n" "${ns_prefix}-$n" "$n" slurmd -D -f "$conf" -N "$n"
done

deadline=$((SECONDS + wait_s))
idle=0
while ((SECONDS < deadline)); do
  for name in slurmctld "${nodes[@]/#/slurmd.}"; do
    kill -0 "$(cat "$run_dir/pids/$name.pid")" 2>/dev/null ||
      die "$name exited: $(tail -n 5 "$run_dir/log/$name.out" 2>/dev/null)"
  done
  idle=$(sinfo -h -t idle -o '%D' 2>/dev/null | head -n 1 || true)
  [[ $idle == "$num_nodes" ]] && break
  sleep 0.5
done
[[ $idle == "$num_nodes" ]] || die "not all $num_nodes nodes idle after ${wait_s}s: $(sinfo -h -N -o '%N %t' 2>&1 | tr '\n' ' ')"
srun --mpi=list 2>&1 | grep -qw pmix || die "srun --mpi=list does not offer pmix"

started_ok=1
log "up: ${nodes[*]} on $subnet.0/24 (bridge $bridge), slurmctld in ${ns_prefix}-head port $ctld_port"
log "use: source $run_dir/env.sh   stop: $here/stop.sh $run_dir"
