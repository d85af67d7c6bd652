#!/usr/bin/env bash
# End-to-end test of the Slurm path: jobs/submit_sweep.sh -> array tasks (srun --mpi=pmix, 2 ranks)
# -> assemble job, on a one-node Slurm cluster started for the test (cluster/local-slurm).
#
#   tests/slurm/test_slurm_sweep.sh SINKSCOPE_BINARY REPO_ROOT
#
# 1. A trace of 4 tiny checkpoints, probes from an .npy file, tp 2: the Slurm sweep must equal a
#    direct one-process `sinkscope sweep` (every dataset of every file, tests/slurm/compare_sweeps.py).
# 2. The trace of part 1 with one checkpoint damaged: that task fails, the assemble job lists it in
#    failed_checkpoints.txt; repaired and resubmitted with --missing-only, the sweep is complete.
# 3. 2 larger checkpoints, probes from an .h5 file, ep 2; while the tasks run, one is requeued from
#    outside (`scontrol requeue`, as an admin or preemption would) and the other gets the
#    pre-timeout SIGUSR1 (`scancel --signal=USR1 --batch`, what --signal=B:USR1@120 sends), on
#    which it stops its step and requeues itself. The sweep must still finish, complete and equal
#    to a direct run, with no partial file left behind.
#
# Exit status: 0 pass; 1 fail; 77 skipped because Slurm cannot be started here (not root, no
# packages, daemons do not come up); the reason is printed. SINKSCOPE_TEST_KEEP=1 keeps the work
# folder (cluster logs, job logs, outputs) for a look after a failure.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 SINKSCOPE_BINARY REPO_ROOT" >&2
  exit 1
fi
sinkscope="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
repo="$(cd "$2" && pwd)"
# Debian's python3 has numpy and h5py (python3-numpy python3-h5py); a pyenv/venv first on PATH
# may not.
python=${SINKSCOPE_TEST_PYTHON:-/usr/bin/python3}
readonly sinkscope repo python

# Bounds: every wait in this test ends (a stuck job fails the test instead of hanging CI).
readonly job_timeout_s=${SINKSCOPE_TEST_JOB_TIMEOUT:-300}

started=$SECONDS
say() { echo "test_slurm_sweep: [$((SECONDS - started))s] $*"; }
fail() {
  echo "test_slurm_sweep: FAIL: $*" >&2
  exit 1
}

[[ -x $sinkscope ]] || fail "sinkscope binary $sinkscope is not executable"
"$python" -c 'import numpy, h5py' 2>/dev/null ||
  fail "$python lacks numpy or h5py (Debian: apt-get install python3-numpy python3-h5py)"

work=$(mktemp -d "${TMPDIR:-/tmp}/sinkscope-slurm-test.XXXXXX")
run_dir="$work/cluster"
cleanup() {
  local status=$?
  if [[ -d $run_dir ]]; then
    "$repo/cluster/local-slurm/stop.sh" "$run_dir" >"$work/stop.log" 2>&1 || cat "$work/stop.log" >&2
  fi
  if [[ ${SINKSCOPE_TEST_KEEP:-0} == 1 || $status -ne 0 && $status -ne 77 ]]; then
    echo "test_slurm_sweep: work folder kept: $work" >&2
  else
    rm -rf -- "$work"
  fi
}
trap cleanup EXIT

# ---- the cluster ------------------------------------------------------------------------------
say "starting a one-node Slurm cluster in $run_dir"
if ! "$repo/cluster/local-slurm/start.sh" "$run_dir" >"$work/start.log" 2>&1; then
  {
    echo "=================================================================================="
    echo "test_slurm_sweep: SKIPPED: Slurm cannot be started on this machine:"
    sed 's/^/    /' "$work/start.log"
    for log in "$run_dir"/log/*; do
      [[ -s $log ]] || continue
      echo "  --- $log (last lines):"
      tail -n 5 "$log" | sed 's/^/    /'
    done
    echo "=================================================================================="
  } >&2
  exit 77
fi
sed 's/^/    /' "$work/start.log"
# shellcheck source=/dev/null
source "$run_dir/env.sh"

# ---- helpers ----------------------------------------------------------------------------------
# Waits (bounded) until every record of the given jobs is in a final state. A failing scontrol
# (the controller busy) means "ask again", never "done".
wait_jobs() {
  local deadline=$((SECONDS + job_timeout_s)) job states pending
  while :; do
    pending=0
    for job in "$@"; do
      if ! states=$(job_states "$job") || [[ -z $states ]] ||
        grep -qvE '^(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) ' <<<"$states"; then
        pending=1
      fi
    done
    ((pending)) || return 0
    if ((SECONDS > deadline)); then
      squeue >&2 || true
      dump_logs
      fail "jobs $* not finished after ${job_timeout_s}s"
    fi
    sleep 1
  done
}

# Prints "STATE RESTARTS" for every job record of job (or array) ID. There is no accounting
# database on the test cluster, so sacct has nothing: scontrol keeps finished jobs (MinJobAge).
job_states() {
  local shown
  shown=$(scontrol show job "$1" 2>/dev/null) || return 1
  awk '
    /JobState=/ { for (i = 1; i <= NF; i++) if ($i ~ /^JobState=/) { sub(/JobState=/, "", $i); state = $i } }
    /Restarts=/ { for (i = 1; i <= NF; i++) if ($i ~ /^Restarts=/) { sub(/Restarts=/, "", $i); print state, $i } }' <<<"$shown"
}

dump_logs() {
  local log
  for log in "${out1:-}"/logs/*.log "${out2:-}"/logs/*.log "${out3:-}"/logs/*.log; do
    [[ -f $log ]] || continue
    echo "---- $log" >&2
    tail -n 30 "$log" >&2
  done
}

expect_completed() {
  local job=$1 what=$2 states
  states=$(job_states "$job")
  [[ -n $states ]] || fail "$what (job $job): scontrol knows no such job"
  if grep -qv '^COMPLETED ' <<<"$states"; then
    dump_logs
    fail "$what (job $job) did not complete: $(tr '\n' ';' <<<"$states")"
  fi
}

# Runs submit_sweep.sh and sets array_job / assemble_job from its output.
submit() {
  local output
  output=$("$repo/jobs/submit_sweep.sh" --site local --sinkscope "$sinkscope" "$@") ||
    fail "jobs/submit_sweep.sh $* failed"
  printf '    %s\n' "$(head -n 1 <<<"$output")" "$(tail -n 1 <<<"$output")"
  array_job=$(sed -n 's/^array_job=//p' <<<"$output")
  assemble_job=$(sed -n 's/^assemble_job=//p' <<<"$output")
  [[ $array_job =~ ^[0-9]+$ && $assemble_job =~ ^[0-9]+$ ]] || fail "no job ids in the output of submit_sweep.sh"
}

# ---- part 1: a tiny trace, tp 2, compared with a direct run ------------------------------------
models1="$work/models1"
for seed in 1 2 3 4; do
  step=$(((seed - 1) * 100))
  "$sinkscope" synth --config "$repo/tests/data/tiny_moe.json" --out "$models1/step$step" --seed "$seed" 2>/dev/null
done
# 6 probes of 16 tokens below the tiny model's vocabulary of 64.
probes1="$work/probes.npy"
"$python" - "$probes1" <<'EOF'
import sys
import numpy as np
rng = np.random.default_rng(20240601)
np.save(sys.argv[1], rng.integers(0, 64, size=(6, 16), dtype=np.int32))
EOF

out1="$work/out_tp2"
say "part 1: submitting 4 checkpoints, 2 ranks, tp 2"
submit --ranks 2 --tp 2 "$models1" "$probes1" "$out1"
# The reference runs while the jobs queue: one process, no MPI.
"$sinkscope" sweep --models-glob "$models1/step*" --tokens "$probes1" --out "$work/direct1" --quiet ||
  fail "direct sweep of part 1 failed"
wait_jobs "$array_job" "$assemble_job"
say "part 1: jobs finished"
expect_completed "$array_job" "part 1 array"
expect_completed "$assemble_job" "part 1 assemble"
[[ -f $out1/failed_checkpoints.txt && ! -s $out1/failed_checkpoints.txt ]] ||
  fail "part 1: failed_checkpoints.txt missing or not empty: $(cat "$out1/failed_checkpoints.txt" 2>/dev/null)"
"$python" "$repo/tests/slurm/compare_sweeps.py" "$work/direct1" "$out1" --layout tp=2,ep=1,world_size=2 ||
  fail "part 1: the Slurm sweep differs from the direct one"
if [[ -f $out1/report/index.html ]]; then
  say "part 1: report written"
else
  grep -q 'WARNING: sinkscope report failed' "$out1"/logs/assemble_*.log ||
    fail "part 1: no report and no warning about it in the assemble log"
  say "part 1: no report (plotting stack missing; the assemble log says so)"
fi

# ---- part 2: a checkpoint that fails, then a resume with --missing-only -----------------------
# The same trace with step300 damaged: its task fails, the others complete, the assemble job
# builds sweep.h5 from the rest, lists step300 in failed_checkpoints.txt and exits 1. Repaired,
# a --missing-only submission runs one task and the sweep equals part 1's direct run.
out2="$work/out_resume"
broken="$models1/step300"
mv "$broken/model.safetensors" "$work/step300.safetensors"
head -c 1000 "$work/step300.safetensors" >"$broken/model.safetensors"
say "part 2: submitting the trace with $broken damaged"
submit --ranks 2 --tp 2 "$models1" "$probes1" "$out2"
wait_jobs "$array_job" "$assemble_job"
say "part 2: jobs finished"
states=$(job_states "$array_job" | cut -d ' ' -f 1 | sort | uniq -c | tr -s ' ' | tr '\n' ';')
[[ $states == " 3 COMPLETED; 1 FAILED;" ]] || fail "part 2: array task states are '$states', expected 3 COMPLETED, 1 FAILED"
[[ $(job_states "$assemble_job") == "FAILED "* ]] || fail "part 2: the assemble job should fail when a checkpoint failed"
[[ $(cat "$out2/failed_checkpoints.txt") == "$broken" ]] ||
  fail "part 2: failed_checkpoints.txt is '$(cat "$out2/failed_checkpoints.txt")', expected $broken"
[[ -f $out2/sweep.h5 ]] || fail "part 2: no sweep.h5 from the 3 good checkpoints"
mv "$work/step300.safetensors" "$broken/model.safetensors"
say "part 2: repaired; resubmitting with --missing-only"
submit --missing-only --ranks 2 --tp 2 "$models1" "$probes1" "$out2"
wait_jobs "$array_job" "$assemble_job"
say "part 2: jobs finished"
[[ $(job_states "$array_job" | wc -l) -eq 1 ]] || fail "part 2: --missing-only should submit one array task"
expect_completed "$array_job" "part 2 array"
expect_completed "$assemble_job" "part 2 assemble"
[[ -f $out2/failed_checkpoints.txt && ! -s $out2/failed_checkpoints.txt ]] ||
  fail "part 2: failed_checkpoints.txt not empty after the resume: $(cat "$out2/failed_checkpoints.txt")"
"$python" "$repo/tests/slurm/compare_sweeps.py" "$work/direct1" "$out2" --layout tp=2,ep=1,world_size=2 ||
  fail "part 2: the resumed sweep differs from the direct one"

# ---- part 3: requeue part way, ep 2 ------------------------------------------------------------
# Large enough that a task runs for several seconds on two shared cores: the signals must reach
# it mid-analysis, which is checked below from its log.
models2="$work/models2"
cat >"$work/medium_moe.json" <<'EOF'
{
  "model_type": "qwen3_moe",
  "vocab_size": 512,
  "hidden_size": 256,
  "num_hidden_layers": 8,
  "num_attention_heads": 8,
  "num_key_value_heads": 4,
  "head_dim": 32,
  "intermediate_size": 512,
  "moe_intermediate_size": 128,
  "num_experts": 16,
  "num_experts_per_tok": 2,
  "norm_topk_prob": true,
  "decoder_sparse_step": 1,
  "mlp_only_layers": [7],
  "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false
}
EOF
for seed in 5 6; do
  "$sinkscope" synth --config "$work/medium_moe.json" --out "$models2/step$(((seed - 5) * 500))" --seed "$seed" 2>/dev/null
done
# The other probe format: .h5 with /tokens (int64 this time).
probes2="$work/probes.h5"
"$python" - "$probes2" <<'EOF'
import sys
import h5py
import numpy as np
rng = np.random.default_rng(7)
with h5py.File(sys.argv[1], "w") as f:
    f["tokens"] = rng.integers(0, 512, size=(64, 64), dtype=np.int64)
EOF

out3="$work/out_ep2"
say "part 3: submitting 2 larger checkpoints, 2 ranks, ep 2"
submit --ranks 2 --ep 2 "$models2" "$probes2" "$out3"
# Wait (bounded) until both tasks are analysing: their logs show sinkscope's first progress line.
deadline=$((SECONDS + 120))
for task in 0 1; do
  log="$out3/logs/sweep_${array_job}_${task}.log"
  until grep -q 'probes/s' "$log" 2>/dev/null; do
    ((SECONDS < deadline)) || {
      dump_logs
      fail "part 3: task $task did not start analysing within 120s"
    }
    sleep 0.2
  done
done
for task in 0 1; do
  name=$(sed -n "$((task + 1))p" "$out3"/slurm/submit-*/array_checkpoints.txt | xargs -d '\n' basename)
  [[ ! -f $out3/checkpoints/$name.h5 ]] ||
    fail "part 3: $name finished before it could be interrupted; make medium_moe.json larger"
done
say "part 3: both tasks running; requeueing task 0, sending the pre-timeout SIGUSR1 to task 1"
scontrol requeue "${array_job}_0" || fail "scontrol requeue ${array_job}_0 failed"
scancel --signal=USR1 --batch "${array_job}_1" || fail "scancel --signal=USR1 --batch ${array_job}_1 failed"
# The reference, while the tasks wait out the requeue delay and run again.
"$sinkscope" sweep --models-glob "$models2/step*" --tokens "$probes2" --out "$work/direct2" --quiet ||
  fail "direct sweep of part 3 failed"
wait_jobs "$array_job" "$assemble_job"
say "part 3: jobs finished"
expect_completed "$array_job" "part 3 array"
expect_completed "$assemble_job" "part 3 assemble"
# Every task ran twice: once interrupted, once to the end.
while read -r state restarts; do
  [[ $restarts -ge 1 ]] || {
    dump_logs
    fail "part 3: a task was not requeued ($state, Restarts=$restarts)"
  }
done < <(job_states "$array_job")
log0="$out3/logs/sweep_${array_job}_0.log"
log1="$out3/logs/sweep_${array_job}_1.log"
grep -q 'SIGTERM: stopping the step' "$log0" || {
  dump_logs
  fail "part 3: task 0 does not log stopping its step on the requeue"
}
if ! grep -q 'SIGUSR1: the time limit is near' "$log1" || ! grep -q "requeueing ${array_job}_1" "$log1"; then
  dump_logs
  fail "part 3: task 1 did not requeue itself on SIGUSR1"
fi
[[ -f $out3/failed_checkpoints.txt && ! -s $out3/failed_checkpoints.txt ]] ||
  fail "part 3: failed_checkpoints.txt missing or not empty: $(cat "$out3/failed_checkpoints.txt" 2>/dev/null)"
"$python" "$repo/tests/slurm/compare_sweeps.py" "$work/direct2" "$out3" --layout tp=1,ep=2,world_size=2 ||
  fail "part 3: the requeued Slurm sweep differs from the direct one"

say "PASS"
