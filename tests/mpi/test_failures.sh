#!/usr/bin/env bash
# Failures across ranks: bad input exits 1 on every rank with one line; a fault on one rank part
# way through, a rank killed with SIGKILL, or a rank stopped with SIGSTOP (--rank-timeout) takes
# the whole job down within 30 s; no output file is left behind in any case.
# usage: test_failures.sh SINKSCOPE REPO_ROOT [MPIEXEC]
set -uo pipefail
bin=$1 root=$2 mpiexec=${3:-mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
py=/usr/bin/python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1"; fail=1; fi; }

"$bin" synth --config "$root/tests/data/moe_8e_4kv.json" --out "$work/m" --seed 2 2>/dev/null

# 1. Bad input seen by every rank: exit 1, exactly one error line, no file.
"$mpiexec" --oversubscribe -np 4 "$bin" analyze --quiet --model "$work/m" --probes repeat:2:8:500 --tp 2 --ep 2 \
  --out "$work/bad.h5" 2>"$work/err1"
rc=$?
check "bad token id exits 1 on all ranks" '[ $rc = 1 ]'
check "one error line" '[ "$(grep -c "error" "$work/err1")" = 1 ]'
check "the line names the bad token" 'grep -q "token 500 >= vocab_size 96" "$work/err1"'
check "no output file" '[ ! -e "$work/bad.h5" ]'

# 2. Bad layout: refused with the reason, exit 1.
"$mpiexec" --oversubscribe -np 2 "$bin" analyze --quiet --model "$work/m" --probes random:2:8:1 --tp 3 \
  --out "$work/bad.h5" 2>"$work/err2"
rc=$?
check "tp not dividing the ranks exits 1" '[ $rc = 1 ] && grep -q "tp=3 does not divide" "$work/err2"'

# 3. A NaN in a weight only rank 3 loads (expert 7 with ep=4): every rank exits 1, one line.
cp -r "$work/m" "$work/nan"
"$py" "$root/tests/tools/patch_safetensors.py" "$work/nan/model.safetensors" model.layers.1.mlp.experts.7.up_proj.weight nan 3
"$mpiexec" --oversubscribe -np 4 "$bin" analyze --quiet --model "$work/nan" --probes random:2:8:1 --ep 4 \
  --out "$work/nan.h5" 2>"$work/err3"
rc=$?
check "NaN weight on one rank's shard exits 1" '[ $rc = 1 ]'
check "the line names the tensor" 'grep -q "experts.7.up_proj.weight.*non-finite" "$work/err3"'
check "no output file after NaN weight" '[ ! -e "$work/nan.h5" ]'

# 4. A numerical fault part way: finite but huge weights of expert 5 overflow its outputs to inf on
#    the rank that owns it; the ranks whose tokens it served fail in layer 1, the job ends.
cp -r "$work/m" "$work/huge"
"$py" "$root/tests/tools/patch_safetensors.py" "$work/huge/model.safetensors" model.layers.1.mlp.experts.5.down_proj.weight 3e38
start=$(date +%s)
timeout 60 "$mpiexec" --oversubscribe -np 4 "$bin" analyze --quiet --model "$work/huge" --probes random:4:8:1 --ep 4 \
  --out "$work/huge.h5" 2>"$work/err4"
rc=$?
took=$(( $(date +%s) - start ))
check "runtime fault ends the job (status $rc, ${took}s)" '[ $rc != 0 ] && [ $rc != 124 ] && [ $took -le 30 ]'
check "the message names layer, component and probe" 'grep -q "non-finite activation in layer 1 (moe) of probe" "$work/err4"'
check "no output file after the fault" '[ ! -e "$work/huge.h5" ]'

# 5. One rank fails part way (fault injection hook, docs/reliability.md): rank 2 throws in layer 2
#    while the others wait in a collective; all exit with status 2 within 30 s.
start=$(date +%s)
SINKSCOPE_INJECT_FAULT=2:2 timeout 60 "$mpiexec" --oversubscribe -x SINKSCOPE_INJECT_FAULT -np 4 "$bin" analyze --quiet \
  --model "$work/m" --probes random:4:8:1 --tp 2 --ep 2 --out "$work/inj.h5" 2>"$work/err6"
rc=$?
took=$(( $(date +%s) - start ))
check "one failing rank ends the job (status $rc, ${took}s)" '[ $rc = 2 ] && [ $took -le 30 ]'
check "the message names the rank and host" 'grep -q "failure on rank 2 (.*): injected fault" "$work/err6"'
check "no output file after the injected fault" '[ ! -e "$work/inj.h5" ]'

# 6. kill -9 of one rank of a 4-rank run: the others exit within 30 s, no output file.
"$bin" synth --config "$root/tests/data/moe_8e_4kv.json" --out "$work/slow" --seed 3 2>/dev/null
"$mpiexec" --oversubscribe -np 4 "$bin" analyze --quiet --model "$work/slow" --probes random:20000:64:1 --batch 1 \
  --tp 2 --ep 2 --out "$work/killed.h5" 2>"$work/err5" &
launcher=$!
victim=""
for _ in $(seq 100); do
  victim=$(pgrep -P "$launcher" -f "killed.h5" | sed -n 2p)
  [ -n "$victim" ] && break
  sleep 0.1
done
sleep 1
if [ -n "$victim" ] && kill -0 "$victim" 2>/dev/null; then
  kill -9 "$victim"
  start=$(date +%s)
  wait "$launcher"
  rc=$?
  took=$(( $(date +%s) - start ))
  check "kill -9 of rank pid $victim ends the job within 30 s (status $rc, ${took}s)" '[ $rc != 0 ] && [ $took -le 30 ]'
  check "no output file after kill -9" '[ ! -e "$work/killed.h5" ]'
  check "no sinkscope process left" '! pgrep -f "$work/killed.h5" >/dev/null'
else
  wait "$launcher"
  echo "FAIL: could not find a rank to kill"
  fail=1
fi

# 7. A stalled rank (SIGSTOP: a frozen node, a hung filesystem) used to hang the job forever. With
#    --rank-timeout 5 the ranks waiting for it give up in a collective after 5 s (plus at most 3 s
#    of per-rank stagger), one line names the wait, MPI_Abort ends the job; no output file.
"$mpiexec" --oversubscribe -np 4 "$bin" analyze --quiet --model "$work/slow" --probes random:20000:64:1 --batch 1 \
  --tp 2 --ep 2 --rank-timeout 5 --out "$work/stopped.h5" 2>"$work/err7" &
launcher=$!
victim=""
for _ in $(seq 100); do
  victim=$(pgrep -P "$launcher" -f "stopped.h5" | sed -n 3p)
  [ -n "$victim" ] && break
  sleep 0.1
done
sleep 1
if [ -n "$victim" ] && kill -STOP "$victim" 2>/dev/null; then
  start=$(date +%s)
  # Bounded wait for the launcher: a hang shows up as a failure here, not as a stuck test.
  for _ in $(seq 600); do kill -0 "$launcher" 2>/dev/null || break; sleep 0.1; done
  took=$(( $(date +%s) - start ))
  if kill -0 "$launcher" 2>/dev/null; then
    check "a stopped rank ends the job (still running after ${took}s)" 'false'
    kill -KILL "$victim" "$launcher" 2>/dev/null
  fi
  wait "$launcher"
  rc=$?
  kill -KILL "$victim" 2>/dev/null
  check "SIGSTOP of rank pid $victim ends the job within 30 s (status $rc, ${took}s)" '[ $rc != 0 ] && [ $took -le 30 ]'
  check "one line names the wait and the limit" \
    '[ "$(grep -c "did not complete within 5 s (--rank-timeout)" "$work/err7")" = 1 ]'
  check "no output file after the stall" '[ ! -e "$work/stopped.h5" ]'
else
  wait "$launcher"
  echo "FAIL: could not find a rank to stop"
  fail=1
fi
exit "$fail"
