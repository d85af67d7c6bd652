#!/usr/bin/env bash
# Submit a sinkscope sweep to Slurm: one array task per checkpoint (jobs/sweep_array.sbatch), then
# an assemble job (jobs/assemble.sbatch) that starts when every task has ended.
#
#   jobs/submit_sweep.sh [options] CHECKPOINTS PROBES OUTDIR [-- SINKSCOPE_OPTIONS...]
#
#   CHECKPOINTS  a folder of checkpoint folders (each with config.json), one checkpoint folder, or a
#                quoted glob such as 'run/step*'
#   PROBES       probe tokens: .npy [N, T] or .h5 with /tokens; or a generated source
#                random:N:T:SEED / repeat:N:T:TOKEN
#   OUTDIR       the sweep folder: checkpoints/*.h5, sweep.h5, report/, failed_checkpoints.txt,
#                logs/ (one log per task), slurm/submit-*/ (what was submitted)
#   -- ARGS...   passed to every `sinkscope sweep` (e.g. --eps 0.3 --batch 8 --device cuda)
#
# Options (defaults come from the site file cluster/<site>.env, SITE_* variables):
#   --site NAME          site settings cluster/NAME.env (default: $SINKSCOPE_SITE, else local)
#   --site-env FILE      site settings from another file
#   --ranks N            MPI ranks per checkpoint (SITE_RANKS; else the plan's; else lcm(tp, ep))
#   --tp N / --ep N      attention heads over N ranks / experts over N ranks (one given: the other
#                        is 1; neither: the plan's; else 1)
#   --nodes N            nodes per checkpoint (SITE_NODES; else the plan's; else 1)
#   --time T             time limit of each array task (SITE_TIME; else the plan's)
#   --mem M              memory per node of each array task (SITE_MEM; else the plan's)
#   --no-plan            do not run `sinkscope plan` (docs/planner.md) for what is not given
#   --partition P        partition (SITE_PARTITION); --account A (SITE_ACCOUNT); --qos Q (SITE_QOS)
#   --assemble-time T    time limit of the assemble job (SITE_ASSEMBLE_TIME; else 00:30:00)
#   --max-parallel N     run at most N array tasks at once
#   --missing-only       array tasks only for checkpoints that have no analysis file yet (to finish
#                        a sweep that failed part way; the assemble job still covers all of them)
#   --sinkscope PATH     the sinkscope binary (SITE_SINKSCOPE; else sinkscope on PATH; else
#                        build/src/sinkscope of this repository)
#   --launcher CMD       MPI launcher of each task (SITE_MPI_LAUNCHER; else "srun --mpi=pmix")
#   --sbatch-arg ARG     one more sbatch option for the array job (repeatable)
#   --dry-run            print the checkpoint list and the sbatch commands; submit and write nothing
#
# Prints, on stdout, `array_job=ID` and `assemble_job=ID` (ID "none" when nothing was submitted).
set -euo pipefail

jobs_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(dirname "$jobs_dir")"
readonly jobs_dir repo_root

die() {
  echo "submit_sweep: error: $*" >&2
  exit 1
}
log() { echo "submit_sweep: $*" >&2; }
# The header comment is the usage text: on stdout for --help, on stderr after a usage error.
usage() {
  if [[ ${1:-1} == 0 ]]; then
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
    exit 0
  fi
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
  exit 1
}
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
gcd() {
  local a=$1 b=$2 t
  while ((b)); do
    t=$((a % b))
    a=$b
    b=$t
  done
  echo "$a"
}

# ---- arguments -------------------------------------------------------------------------------
site="${SINKSCOPE_SITE:-local}"
site_env=""
ranks="" tp="" ep="" nodes="" time_limit="" partition="" account="" qos="" mem="" use_plan=1
assemble_time="" max_parallel="" missing_only=0 sinkscope="" launcher="" dry_run=0
array_extra=() sinkscope_args=() positional=()
while (($#)); do
  case $1 in
    -h | --help) usage 0 ;;
    --site | --site-env | --ranks | --tp | --ep | --nodes | --time | --mem | --partition | --account | --qos | \
      --assemble-time | --max-parallel | --sinkscope | --launcher | --sbatch-arg)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --site) site=$2 ;;
        --site-env) site_env=$2 ;;
        --ranks) ranks=$2 ;;
        --tp) tp=$2 ;;
        --ep) ep=$2 ;;
        --nodes) nodes=$2 ;;
        --time) time_limit=$2 ;;
        --mem) mem=$2 ;;
        --partition) partition=$2 ;;
        --account) account=$2 ;;
        --qos) qos=$2 ;;
        --assemble-time) assemble_time=$2 ;;
        --max-parallel) max_parallel=$2 ;;
        --sinkscope) sinkscope=$2 ;;
        --launcher) launcher=$2 ;;
        --sbatch-arg) array_extra+=("$2") ;;
      esac
      shift 2
      ;;
    --missing-only) missing_only=1 && shift ;;
    --no-plan) use_plan=0 && shift ;;
    --dry-run) dry_run=1 && shift ;;
    --)
      shift
      sinkscope_args=("$@")
      break
      ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) positional+=("$1") && shift ;;
  esac
done
((${#positional[@]} == 3)) || usage 1
checkpoint_spec=${positional[0]}
probes=${positional[1]}
out_arg=${positional[2]}

# ---- site settings ----------------------------------------------------------------------------
if [[ -z $site_env ]]; then
  [[ $site =~ ^[A-Za-z0-9._-]+$ ]] || die "--site '$site': use the name of a file cluster/NAME.env"
  site_env="$repo_root/cluster/$site.env"
fi
[[ -f $site_env ]] || die "no site settings $site_env (see cluster/example-gpu.env)"
site_env="$(cd "$(dirname "$site_env")" && pwd)/$(basename "$site_env")"
# shellcheck source=/dev/null
source "$site_env"

ranks=${ranks:-${SITE_RANKS:-}}
nodes=${nodes:-${SITE_NODES:-}}
time_limit=${time_limit:-${SITE_TIME:-}}
mem=${mem:-${SITE_MEM:-}}
partition=${partition:-${SITE_PARTITION:-}}
account=${account:-${SITE_ACCOUNT:-}}
qos=${qos:-${SITE_QOS:-}}
assemble_time=${assemble_time:-${SITE_ASSEMBLE_TIME:-00:30:00}}
launcher=${launcher:-}
[[ -z $max_parallel ]] || is_count "$max_parallel" || die "--max-parallel must be a positive whole number"

# ---- the binary -------------------------------------------------------------------------------
if [[ -z $sinkscope ]]; then
  sinkscope=${SITE_SINKSCOPE:-$(command -v sinkscope || true)}
  [[ -n $sinkscope ]] || sinkscope="$repo_root/build/src/sinkscope"
fi
if [[ -x $sinkscope && ! -d $sinkscope ]]; then
  sinkscope="$(cd "$(dirname "$sinkscope")" && pwd)/$(basename "$sinkscope")"
elif ((dry_run)); then
  # A dry run only prints what would be submitted: it may be prepared where the site's binary
  # (a path on the cluster) does not exist.
  log "note: sinkscope binary $sinkscope does not exist here (fine for --dry-run; a submission needs it)"
else
  die "sinkscope binary $sinkscope is not an executable (--sinkscope PATH)"
fi

# ---- probes -----------------------------------------------------------------------------------
if [[ $probes =~ ^(random|repeat): ]]; then
  probe_args=(--probes "$probes")
else
  [[ -f $probes && -r $probes ]] || die "probe file $probes does not exist or is not readable"
  probe_args=(--tokens "$(cd "$(dirname "$probes")" && pwd)/$(basename "$probes")")
fi

# ---- checkpoints ------------------------------------------------------------------------------
candidates=()
if [[ $checkpoint_spec == *[*?[]* ]]; then
  mapfile -t candidates < <(compgen -G "$checkpoint_spec" || true)
  ((${#candidates[@]})) || die "'$checkpoint_spec' matches nothing"
elif [[ -f $checkpoint_spec/config.json ]]; then
  candidates=("$checkpoint_spec")
elif [[ -d $checkpoint_spec ]]; then
  for d in "$checkpoint_spec"/*/; do
    candidates+=("${d%/}")
  done
else
  die "$checkpoint_spec is neither a folder nor a pattern that matches folders"
fi
checkpoints=()
for d in "${candidates[@]}"; do
  [[ -d $d && -f $d/config.json ]] || continue
  [[ $d != *$'\n'* ]] || die "checkpoint folder names with a newline are not supported: $d"
  # Logical absolute path (symlinked folder names kept): the name is the analysis file's name.
  checkpoints+=("$(cd "$d" && pwd)")
done
((${#checkpoints[@]})) || die "no checkpoint folder (a folder with config.json) in $checkpoint_spec"
# Version order puts step900 before step1000; sinkscope orders by step itself, this is for people.
mapfile -t checkpoints < <(printf '%s\n' "${checkpoints[@]}" | sort -V -u)
duplicate=$(printf '%s\n' "${checkpoints[@]}" | xargs -d '\n' -n 1 basename | sort | uniq -d | head -n 1)
[[ -z $duplicate ]] || die "two checkpoint folders are named '$duplicate': analysis files are named after the folder"

# Absolute, because the jobs run elsewhere; created only when submitting for real.
case $out_arg in
  /*) out=$out_arg ;;
  *) out=$PWD/$out_arg ;;
esac
while [[ $out == */ && $out != / ]]; do out=${out%/}; done

array_checkpoints=("${checkpoints[@]}")
if ((missing_only)); then
  array_checkpoints=()
  for c in "${checkpoints[@]}"; do
    [[ -f $out/checkpoints/$(basename "$c").h5 ]] || array_checkpoints+=("$c")
  done
  log "--missing-only: ${#array_checkpoints[@]} of ${#checkpoints[@]} checkpoints have no analysis file"
fi
num_tasks=${#array_checkpoints[@]}

# ---- the plan: layout, time and memory of what was not given (docs/planner.md) -----------------
site_args=()
# shellcheck disable=SC2206  # SITE_SINKSCOPE_ARGS is a list of options, split on spaces
[[ -n ${SITE_SINKSCOPE_ARGS:-} ]] && site_args=(${SITE_SINKSCOPE_ARGS})
# A layout given in part (--tp or --ep) is completed with 1, not by the plan: the user chose it.
if [[ -n $tp || -n $ep ]]; then
  tp=${tp:-1}
  ep=${ep:-1}
fi
if ((use_plan)) && [[ -z $ranks || -z $tp || -z $ep || -z $time_limit || -z $mem ]] && ((num_tasks)); then
  # The options of the sweep that the plan needs (the last one given wins, as in sinkscope).
  plan_args=()
  all_args=("${site_args[@]}" "${sinkscope_args[@]}")
  for ((i = 0; i + 1 < ${#all_args[@]}; ++i)); do
    case ${all_args[i]} in
      --device | --batch | --threads) plan_args+=("${all_args[i]}" "${all_args[i + 1]}") ;;
    esac
  done
  [[ -n $tp ]] && plan_args+=(--tp "$tp")
  [[ -n $ep ]] && plan_args+=(--ep "$ep")
  [[ -n $nodes ]] && plan_args+=(--nodes "$nodes")
  if [[ -z ${SITE_GPUS_PER_NODE:-} || ${SITE_GPUS_PER_NODE} == 0 ]]; then
    # CPU site: ranks per node from --ranks / SITE_RANKS, else from the splits given, else 1.
    plan_ranks=$ranks
    [[ -z $plan_ranks ]] && plan_ranks=$((${tp:-1} * ${ep:-1} / $(gcd "${tp:-1}" "${ep:-1}")))
    plan_args+=(--gpus-per-node "$((plan_ranks / ${nodes:-1} > 0 ? plan_ranks / ${nodes:-1} : 1))")
  fi
  [[ -n $max_parallel ]] && plan_args+=(--max-parallel "$max_parallel")
  if [[ -x $sinkscope && ! -d $sinkscope ]]; then
    plan_status=0
    plan_out=$("$sinkscope" plan --model "${array_checkpoints[0]}" "${probe_args[@]}" \
      --checkpoints "$num_tasks" --cluster "$site_env" "${plan_args[@]}" --shell) || plan_status=$?
    ((plan_status == 0 || plan_status == 3)) || die "sinkscope plan failed (status $plan_status)"
    plan_value() { sed -n "s/^$1=//p" <<<"$plan_out"; }
    if [[ $(plan_value PLAN_FITS) != 1 ]]; then
      "$sinkscope" plan --model "${array_checkpoints[0]}" "${probe_args[@]}" --checkpoints "$num_tasks" \
        --cluster "$site_env" "${plan_args[@]}" >&2 || true
      die "no layout fits in memory (the plan above); give more --nodes, or --no-plan to submit anyway"
    fi
    ranks=${ranks:-$(plan_value PLAN_RANKS)}
    nodes=${nodes:-$(plan_value PLAN_NODES)}
    tp=${tp:-$(plan_value PLAN_TP)}
    ep=${ep:-$(plan_value PLAN_EP)}
    time_limit=${time_limit:-$(plan_value PLAN_TIME)}
    # A CPU site shares nodes: ask for the plan's memory. A GPU site with SITE_MEM=0 keeps its node.
    mem=${mem:-$(plan_value PLAN_MEM)}
    log "plan: $ranks ranks on $nodes node(s), tp $tp ep $ep, --time $time_limit --mem $mem ($(plan_value PLAN_CHECKPOINT_S) s predicted per checkpoint)"
  else
    log "note: no plan (sinkscope binary $sinkscope is not here); layout from the options and site file"
  fi
fi
tp=${tp:-1}
ep=${ep:-1}
nodes=${nodes:-1}
for pair in "tp:$tp" "ep:$ep" "nodes:$nodes"; do
  is_count "${pair#*:}" || die "--${pair%%:*} must be a positive whole number (got '${pair#*:}')"
done
if [[ -z $ranks ]]; then
  # The smallest world that holds both splits; the rest of the parallelism would split probes.
  ranks=$((tp * ep / $(gcd "$tp" "$ep")))
fi
is_count "$ranks" || die "--ranks must be a positive whole number (got '$ranks')"
((ranks % tp == 0 && ranks % ep == 0)) || die "--ranks $ranks is not a multiple of --tp $tp and --ep $ep"
((nodes <= ranks)) || die "--nodes $nodes is more than --ranks $ranks"

# ---- submission folder ------------------------------------------------------------------------
# One folder per submission: a later submission into the same OUTDIR never rewrites the list that
# running (or requeued) tasks of an earlier one still read.
submission="$out/slurm/submit-$(date -u +%Y%m%dT%H%M%SZ)-$$"
quote_words() {
  (($#)) || return 0
  printf '%q ' "$@"
}
job_env=$(
  cat <<EOF
# Written by jobs/submit_sweep.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ); read by the job scripts.
SINKSCOPE_BIN=$(printf '%q' "$sinkscope")
SINKSCOPE_SITE_ENV=$(printf '%q' "$submission/site.env")
SINKSCOPE_OUT=$(printf '%q' "$out")
SINKSCOPE_ARRAY_LIST=$(printf '%q' "$submission/array_checkpoints.txt")
SINKSCOPE_ALL_LIST=$(printf '%q' "$submission/all_checkpoints.txt")
SINKSCOPE_TP=$tp
SINKSCOPE_EP=$ep
SINKSCOPE_LAUNCHER=$(printf '%q' "$launcher")
SINKSCOPE_PROBE_ARGS=($(quote_words "${probe_args[@]}"))
SINKSCOPE_EXTRA_ARGS=($(quote_words "${site_args[@]}" "${sinkscope_args[@]}"))
EOF
)

# ---- sbatch commands --------------------------------------------------------------------------
common=()
[[ -n $account ]] && common+=(--account="$account")
[[ -n $qos ]] && common+=(--qos="$qos")

array_cmd=(sbatch --parsable --array="0-$((num_tasks - 1))${max_parallel:+%$max_parallel}"
  --nodes="$nodes" --ntasks="$ranks" --output="$out/logs/sweep_%A_%a.log" "${common[@]}")
[[ -n $partition ]] && array_cmd+=(--partition="$partition")
[[ -n $time_limit ]] && array_cmd+=(--time="$time_limit")
if [[ -n ${SITE_GPUS_PER_NODE:-} && ${SITE_GPUS_PER_NODE} != 0 ]]; then
  # One rank per GPU: the ranks must spread evenly over the nodes.
  ((ranks % nodes == 0)) || die "--ranks $ranks does not spread evenly over --nodes $nodes"
  ((ranks / nodes <= SITE_GPUS_PER_NODE)) ||
    die "$((ranks / nodes)) ranks per node but SITE_GPUS_PER_NODE=$SITE_GPUS_PER_NODE (one rank per GPU)"
  array_cmd+=(--ntasks-per-node="$((ranks / nodes))" --gpus-per-node="$SITE_GPUS_PER_NODE")
fi
[[ -n ${SITE_CPUS_PER_TASK:-} ]] && array_cmd+=(--cpus-per-task="$SITE_CPUS_PER_TASK")
[[ -n $mem ]] && array_cmd+=(--mem="$mem")
# shellcheck disable=SC2206  # a list of sbatch options, split on spaces
[[ -n ${SITE_SBATCH_ARGS:-} ]] && array_cmd+=(${SITE_SBATCH_ARGS})
array_cmd+=("${array_extra[@]}" "$jobs_dir/sweep_array.sbatch" "$submission/job.env")

assemble_cmd=(sbatch --parsable --ntasks=1 --output="$out/logs/assemble_%j.log" "${common[@]}"
  --time="$assemble_time")
assemble_partition=${SITE_ASSEMBLE_PARTITION:-$partition}
[[ -n $assemble_partition ]] && assemble_cmd+=(--partition="$assemble_partition")
# shellcheck disable=SC2206  # a list of sbatch options, split on spaces
[[ -n ${SITE_ASSEMBLE_SBATCH_ARGS:-} ]] && assemble_cmd+=(${SITE_ASSEMBLE_SBATCH_ARGS})
# The dependency is added once the array job id is known.
assemble_script=("$jobs_dir/assemble.sbatch" "$submission/job.env")

log "site $site_env; ${#checkpoints[@]} checkpoints, $num_tasks array tasks; $ranks ranks on $nodes node(s), tp $tp ep $ep"
if ((dry_run)); then
  echo "# checkpoints (array task id = line number - 1):"
  printf '%s\n' "${array_checkpoints[@]}"
  echo "# $submission/job.env:"
  echo "$job_env"
  if ((num_tasks)); then
    echo "# array job:"
    quote_words "${array_cmd[@]}"
    echo
    echo "# assemble job:"
    quote_words "${assemble_cmd[@]}" --dependency=afterany:ARRAY_JOB_ID --kill-on-invalid-dep=no "${assemble_script[@]}"
  else
    echo "# assemble job (no array tasks needed):"
    quote_words "${assemble_cmd[@]}" "${assemble_script[@]}"
  fi
  echo
  echo "array_job=none"
  echo "assemble_job=none"
  exit 0
fi

command -v sbatch >/dev/null 2>&1 || die "sbatch not found (is Slurm set up here? source the site's environment)"
mkdir -p "$submission" "$out/logs" "$out/checkpoints"
printf '%s\n' "${array_checkpoints[@]}" >"$submission/array_checkpoints.txt"
printf '%s\n' "${checkpoints[@]}" >"$submission/all_checkpoints.txt"
printf '%s\n' "$job_env" >"$submission/job.env"
# The tasks read a copy, so that editing the site file mid-sweep cannot change requeued tasks.
cp -- "$site_env" "$submission/site.env"

# sbatch --parsable prints "jobid" or "jobid;cluster".
array_job=none
if ((num_tasks)); then
  array_job=$("${array_cmd[@]}") || die "sbatch of the array job failed"
  array_job=${array_job%%;*}
  log "array job $array_job: $num_tasks tasks, logs $out/logs/sweep_${array_job}_*.log"
  assemble_cmd+=(--dependency="afterany:$array_job" --kill-on-invalid-dep=no)
fi
if ! assemble_job=$("${assemble_cmd[@]}" "${assemble_script[@]}"); then
  echo "array_job=$array_job"
  die "sbatch of the assemble job failed; submit it by hand: $(quote_words "${assemble_cmd[@]}" "${assemble_script[@]}")"
fi
assemble_job=${assemble_job%%;*}
log "assemble job $assemble_job, log $out/logs/assemble_${assemble_job}.log"
log "submission recorded in $submission"
echo "array_job=$array_job"
echo "assemble_job=$assemble_job"
