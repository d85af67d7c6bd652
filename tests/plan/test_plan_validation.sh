#!/usr/bin/env bash
# The planner against measured runs (docs/planner.md "Validation"): calibrate here, plan a small
# synthetic model, run `sinkscope analyze --verbose` for the same layout and compare the forward
# seconds (recording included) and the peak resident memory per rank. Fails when the memory or the
# time is more than TOLERANCE off (default 0.25). A time needs the cores: a calibration or run
# during which other processes used more than 10% of the CPUs is repeated (3 tries); when all
# were contended, its row says so and only the memory is checked. A time that misses on an idle
# machine is measured once more, calibration included (slow spells of a VM's host do not show in
# /proc/stat), and the second try decides. Prints a table row per layout (docs/benchmarks.md).
# usage: test_plan_validation.sh SINKSCOPE [LAYOUTS...]   LAYOUTS: "RANKS:TP:EP" (default 1:1:1 2:2:2)
set -euo pipefail
bin=$1
shift
layouts=("$@")
((${#layouts[@]})) || layouts=(1:1:1 2:2:2)
command -v mpirun >/dev/null || layouts=(1:1:1)  # no MPI here: the one-rank layout only
tolerance=${TOLERANCE:-0.25}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cpus=$(getconf _NPROCESSORS_ONLN)
tick=$(getconf CLK_TCK)

# Runs "$@" with its output in $work/out; sets `other` to the share of the CPUs (%) that processes
# other than this script's children used meanwhile: busy time of /proc/stat minus the children's
# CPU time (bash `times`; mpirun waits for its ranks).
measured() {
  local b0 b1 w0 w1
  times >"$work/times0"
  b0=$(awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat)
  w0=$(date +%s.%N)
  "$@" >"$work/out" 2>&1 || { cat "$work/out" >&2; return 1; }
  times >"$work/times1"
  b1=$(awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat)
  w1=$(date +%s.%N)
  other=$(awk -v b0="$b0" -v b1="$b1" -v w0="$w0" -v w1="$w1" -v tick="$tick" -v cpus="$cpus" '
    function secs(s) { split(s, p, "m"); sub("s", "", p[2]); return p[1] * 60 + p[2] }
    FNR == 2 { c[FILENAME == ARGV[1]] = secs($1) + secs($2) }
    END { o = (b1 - b0) / tick - (c[0] - c[1]); o = o < 0 ? 0 : o;
          printf "%.0f", 100 * o / (cpus * (w1 - w0)) }' "$work/times0" "$work/times1")
}
# measured, repeated up to 3 times while other processes used more than 10% of the CPUs.
quiet_run() {
  local try
  for try in 1 2 3; do
    measured "$@"
    ((other <= 10)) && return 0
    echo "other processes used ${other}% of the CPUs during try $try" >&2
  done
}

# Weights dominate: 208 M parameters (bench/moe_208m.json, also bench/bench_memory.sh's).
"$bin" synth --config "$(cd "$(dirname "$0")/../.." && pwd)/bench/moe_208m.json" --out "$work/model" --seed 1 2>/dev/null
probes=random:8:256:1
batch=2
# Calibrated with as many ranks as the largest layout: the rates of one rank alone, and the
# collectives and the cores the ranks get when they all run (docs/planner.md "Calibration").
most=1
for layout in "${layouts[@]}"; do ((${layout%%:*} > most)) && most=${layout%%:*}; done
calibrate=("$bin" plan --calibrate --cluster "$work/site.env" --threads 1 --calibrate-dir "$work")
((most == 1)) || calibrate=(mpirun --oversubscribe -np "$most" "${calibrate[@]}")
# Calibrates into $work/site.env; sets calibration_other.
calibrate_site() {
  : >"$work/site.env"
  quiet_run "${calibrate[@]}"
  calibration_other=$other
  grep SINKSCOPE_PLAN_ "$work/site.env" >&2
}
# Plans and runs one layout ("RANKS:TP:EP"); sets `row` to its table row and `verdict` to ok, memory
# (the memory is off) or time (only the time is off).
check_layout() {
  local ranks tp ep plan pred_s pred_mib meas_s meas_mib contended args
  IFS=: read -r ranks tp ep <<<"$1"
  plan=$("$bin" plan --model "$work/model" --probes "$probes" --batch "$batch" --no-causal-profile \
    --cluster "$work/site.env" --gpus-per-node "$ranks" --nodes 1 --tp "$tp" --ep "$ep" --shell)
  pred_s=$(sed -n 's/^PLAN_PASS_S=//p' <<<"$plan")
  pred_mib=$(sed -n 's/^PLAN_RANK_MIB=//p' <<<"$plan")
  [[ -n $pred_s && -n $pred_mib ]] || { echo "no plan for $1: $plan" >&2; exit 1; }
  args=(analyze --model "$work/model" --probes "$probes" --batch "$batch" --threads 1 --verbose --quiet
    --tp "$tp" --ep "$ep" --out "$work/a.h5")
  if ((ranks > 1)); then
    quiet_run mpirun --oversubscribe -np "$ranks" "$bin" "${args[@]}"
  else
    quiet_run "$bin" "${args[@]}"
  fi
  meas_s=$(sed -n 's/.*; forward \([0-9.]*\) s.*/\1/p' "$work/out" | sort -g | tail -n 1)
  meas_mib=$(sed -n 's/.*peak resident memory \([0-9]*\) MiB.*/\1/p' "$work/out" | sort -g | tail -n 1)
  [[ -n $meas_s && -n $meas_mib ]] || { echo "analyze printed no timing for $1: $(cat "$work/out")" >&2; exit 1; }
  contended=$(( other > 10 ? other : (calibration_other > 10 ? calibration_other : 0) ))
  row=$(awk -v ps="$pred_s" -v ms="$meas_s" -v pm="$pred_mib" -v mm="$meas_mib" -v tol="$tolerance" \
    -v busy="$contended" -v l="$ranks rank(s), tp $tp ep $ep" 'BEGIN {
    rs = ps / ms; rm = pm / mm;
    note = busy > 0 ? sprintf(" (not checked: other processes used %d%% of the CPUs)", busy) : "";
    printf "| %s | %.3f | %.3f | %.2f%s | %d | %d | %.2f |", l, ps, ms, rs, note, pm, mm, rm }')
  verdict=$(awk -v ps="$pred_s" -v ms="$meas_s" -v pm="$pred_mib" -v mm="$meas_mib" -v tol="$tolerance" \
    -v busy="$contended" 'BEGIN { rs = ps / ms; rm = pm / mm;
    v = busy == 0 && (rs < 1 - tol || rs > 1 + tol) ? "time" : "ok";
    print (rm < 1 - tol || rm > 1 + tol) ? "memory" : v }')
}

calibrate_site
fail=0
echo "| layout | predicted forward s | measured forward s | ratio | predicted peak MiB/rank | measured peak MiB (max rank) | ratio |"
echo "|---|---|---|---|---|---|---|"
for layout in "${layouts[@]}"; do
  check_layout "$layout"
  if [[ $verdict == time ]]; then
    # A slow spell of the VM's host or a clock change does not show in /proc/stat: a time that
    # misses is measured once more, calibration included, and judged by that second try.
    echo "time off on the first try, calibrating and measuring again: $row" >&2
    calibrate_site
    check_layout "$layout"
  fi
  [[ $verdict == ok ]] || fail=1
  echo "$row"
done
exit $fail
