#!/usr/bin/env bash
# The command line end to end: success paths, and for bad input exit status 1, one line naming the
# file/tensor/option, and no output file left behind. Also sweep --resume and report.
# usage: test_cli.sh SINKSCOPE REPO_ROOT
set -uo pipefail
bin=$1 root=$2
py=/usr/bin/python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 1
fail=0
pass=0
ok() { echo "ok: $1"; pass=$((pass + 1)); }
bad() { echo "FAIL: $1"; fail=$((fail + 1)); }

# expect_input_error NAME FRAGMENT OUTPUT -- command...: exit 1, one stderr line containing FRAGMENT,
# and OUTPUT does not exist afterwards.
expect_input_error() {
  local name=$1 fragment=$2 output=$3
  shift 4
  "$@" >"$work/stdout" 2>"$work/stderr"
  local rc=$? lines
  lines=$(grep -c . "$work/stderr")
  if [ "$rc" = 1 ] && [ "$lines" = 1 ] && grep -qF -- "$fragment" "$work/stderr" && [ ! -e "$output" ]; then
    ok "$name"
  else
    bad "$name (exit $rc, $lines lines, output $( [ -e "$output" ] && echo left || echo absent )): $(cat "$work/stderr")"
  fi
}

"$bin" --version | grep -q "sinkscope" && ok "--version" || bad "--version"
"$bin" --help >/dev/null && ok "--help" || bad "--help"
"$bin" synth --config "$root/tests/data/tiny_moe.json" --out model --seed 1 2>/dev/null && ok "synth" || bad "synth"
"$bin" inspect --model model | grep -q "validation: ok" && ok "inspect validates" || bad "inspect"

"$py" -c "import numpy as np; np.save('tok.npy', np.random.default_rng(0).integers(0, 64, (3, 12)).astype(np.int64))"
"$bin" analyze --quiet --model model --tokens tok.npy --out a.h5 --per-query && [ -f a.h5 ] && ok "analyze .npy int64" || bad "analyze"
"$py" - <<'PY' && ok "analysis file has the schema's attributes and dims" || bad "analysis schema"
import h5py
f = h5py.File("a.h5", "r")
for k in ["sinkscope_version", "model_type", "checkpoint", "step", "num_layers", "num_heads", "num_kv_heads",
          "head_dim", "num_experts", "top_k", "hidden_size", "num_probes", "seq_len", "eps", "sink_rate", "tp",
          "ep", "dp", "world_size", "device", "tokens_sha256", "created_utc"]:
    assert k in f.attrs, k
for d in ["tokens", "attention/sink_score", "attention/sink_rate", "attention/p0_per_query", "residual/norm_p0",
          "residual/norm_rest_median", "residual/h_ratio", "residual/p0_cosine", "residual/massive_p0",
          "writes/attn_head_p0", "writes/attn_head_rest", "writes/moe_p0", "writes/moe_rest", "writes/expert_p0",
          "routing/p0_topk_freq", "routing/rest_topk_freq", "circuit/attr_embed", "circuit/attr_head",
          "circuit/attr_expert", "circuit/attr_mlp", "profile/layer_share", "profile/first2_share",
          "profile/norm_gain_share", "profile/peak_layer", "profile/entropy"]:
    assert d in f, d
    assert "dims" in f[d].attrs, d
assert f["attention/p0_per_query"].shape == (3, 4, 4, 12)
assert f.attrs["num_probes"] == 3 and f.attrs["seq_len"] == 12
PY
"$py" -c "import h5py, numpy as np; h5py.File('tok.h5','w')['tokens'] = np.load('tok.npy').astype(np.int32)"
"$bin" analyze --quiet --model model --tokens tok.h5 --out b.h5 && ok "analyze .h5 tokens" || bad "analyze .h5"
"$bin" analyze --quiet --model model --probes repeat:2:8:3 --prepend-bos 5 --out c.h5 &&
  "$py" -c "import h5py; t=h5py.File('c.h5')['tokens'][()]; assert t.shape==(2,9) and (t[:,0]==5).all() and (t[:,1:]==3).all()" &&
  ok "--probes repeat + --prepend-bos" || bad "--probes repeat + --prepend-bos"
# Contract 1.2 probe hygiene: a BOS that the probes already carry is not doubled, and random probes
# avoid the special ids of config.json / generation_config.json and the prepended id.
expect_input_error "--prepend-bos refuses to double a BOS" "already starts with token 3" x.h5 -- "$bin" analyze --model model --probes repeat:2:8:3 --prepend-bos 3 --out x.h5
cp -r model special
"$py" -c "
import json
c = json.load(open('special/config.json')); c.update(bos_token_id=1, eos_token_id=[2, 5]); json.dump(c, open('special/config.json', 'w'))
json.dump({'pad_token_id': 7, 'eos_token_id': None}, open('special/generation_config.json', 'w'))"
"$bin" analyze --quiet --model special --probes random:40:16:1 --prepend-bos 9 --out s.h5 &&
  "$bin" analyze --quiet --model special --probes random:40:16:1 --prepend-bos 9 --allow-special-tokens --out s2.h5 &&
  "$py" -c "
import h5py, numpy as np
t = h5py.File('s.h5')['tokens'][()]; u = h5py.File('s2.h5')['tokens'][()]
assert (t[:, 0] == 9).all() and not np.isin(t[:, 1:], [1, 2, 5, 7, 9]).any(), t
assert np.isin(u[:, 1:], [1, 2, 5, 7, 9]).any()
" && ok "random probes avoid special ids unless --allow-special-tokens" || bad "random probes and special ids"

# Bad input: exit 1, one line naming the culprit, no output.
expect_input_error "missing model folder" "nope: model folder does not exist" x.h5 -- "$bin" analyze --model nope --tokens tok.npy --out x.h5
cp -r model trunc
"$py" -c "import os; p='trunc/model.safetensors'; os.truncate(p, os.path.getsize(p) - 100)"
expect_input_error "truncated safetensors" "trunc/model.safetensors" x.h5 -- "$bin" analyze --model trunc --tokens tok.npy --out x.h5
cp -r model shape
"$py" -c "import json; c=json.load(open('shape/config.json')); c['moe_intermediate_size']=16; json.dump(c, open('shape/config.json','w'))"
expect_input_error "tensor with the wrong shape" "tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' has shape [32, 64], config.json implies [16, 64]" x.h5 -- "$bin" analyze --model shape --tokens tok.npy --out x.h5
"$py" -c "import numpy as np; t=np.zeros((2,5),np.int32); t[1,3]=64; np.save('oov.npy', t)"
expect_input_error "token id >= vocab_size" "oov.npy: token id 64 at (row 1, column 3)" x.h5 -- "$bin" analyze --model model --tokens oov.npy --out x.h5
"$py" -c "import numpy as np; np.save('empty.npy', np.zeros((0,5),np.int32))"
expect_input_error "empty probe file" "empty.npy: token array is empty" x.h5 -- "$bin" analyze --model model --tokens empty.npy --out x.h5
"$py" -c "import numpy as np; np.save('flt.npy', np.zeros((2,5),np.float32))"
expect_input_error "float probe file" "flt.npy: token dtype '<f4'" x.h5 -- "$bin" analyze --model model --tokens flt.npy --out x.h5
"$py" -c "import numpy as np; np.save('ragged.npy', np.array([np.arange(3), np.arange(4)], dtype=object), allow_pickle=True)"
expect_input_error "ragged probe file" "ragged.npy: token dtype '|O'" x.h5 -- "$bin" analyze --model model --tokens ragged.npy --out x.h5
expect_input_error "missing token file" "missing.npy: cannot open" x.h5 -- "$bin" analyze --model model --tokens missing.npy --out x.h5
expect_input_error "output in a missing folder" "no/such/dir/x.h5: folder" no/such/dir/x.h5 -- "$bin" analyze --model model --tokens tok.npy --out no/such/dir/x.h5
mkdir -p locked && chmod 555 locked && chmod 755 "$work"
if [ "$(id -u)" = 0 ]; then
  # root writes anywhere: run the attempt as an unprivileged user.
  expect_input_error "output folder without write permission" "locked/x.h5: folder" locked/x.h5 -- \
    setpriv --reuid=65534 --regid=65534 --clear-groups "$bin" analyze --model "$work/model" --tokens "$work/tok.npy" --out "$work/locked/x.h5"
else
  expect_input_error "output folder without write permission" "locked/x.h5: folder" locked/x.h5 -- \
    "$bin" analyze --model model --tokens tok.npy --out locked/x.h5
fi
expect_input_error "bad --ablate" "--ablate 'layers=9-12'" x.h5 -- "$bin" analyze --model model --tokens tok.npy --out x.h5 --ablate layers=9-12
expect_input_error "bad --probes" "--probes 'random:2'" x.h5 -- "$bin" analyze --model model --probes random:2 --out x.h5
expect_input_error "no probes" "give the probes" x.h5 -- "$bin" analyze --model model --out x.h5
expect_input_error "unknown option" "--bogus" x.h5 -- "$bin" analyze --model model --tokens tok.npy --out x.h5 --bogus
expect_input_error "synthetic weights need cuda" "--synthetic-weights needs --device cuda" x.h5 -- "$bin" analyze --model-config "$root/tests/data/tiny_moe.json" --synthetic-weights 1 --probes random:2:8:1 --out x.h5
expect_input_error "no model" "give --model DIR" x.h5 -- "$bin" analyze --probes random:2:8:1 --out x.h5
expect_input_error "cuda without a CUDA build" "--device cuda" x.h5 -- "$bin" analyze --model model --tokens tok.npy --out x.h5 --device cuda
echo '{"model_type":"qwen3_moe","vocab_size":10,"hidden_size":30,"num_hidden_layers":1,"num_attention_heads":4,"moe_intermediate_size":8,"num_experts":2,"num_experts_per_tok":1}' > badcfg.json
expect_input_error "contradictory config" "does not divide hidden_size" xdir -- "$bin" synth --config badcfg.json --out xdir
cp -r model nanw
"$py" "$root/tests/tools/patch_safetensors.py" nanw/model.safetensors model.layers.2.self_attn.o_proj.weight inf 7
expect_input_error "Inf in a weight" "tensor 'model.layers.2.self_attn.o_proj.weight' holds a non-finite value" x.h5 -- "$bin" analyze --model nanw --tokens tok.npy --out x.h5

# ---- Reliability II (docs/reliability.md): every case exits 1 (bad input) or 2 (runtime failure)
# with one line, never a signal, a hang (each command runs under `timeout`) or unbounded memory.
T="timeout 30"
# 1. Long text fields: std::regex overflowed the stack (segfault).
expect_input_error "--probes with 30000 digits" "--probes 'random:99999" x.h5 -- \
  $T "$bin" analyze --model model --probes "random:$(printf '9%.0s' $(seq 30000)):8:0" --out x.h5
"$py" - <<'PY'
import struct
def npy(header, data=b"", major=1):
    fixed = 10 if major == 1 else 12
    header += " " * ((64 - (fixed + len(header) + 1) % 64) % 64) + "\n"
    size = struct.pack("<H", len(header)) if major == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([major, 0]) + size + header.encode() + data
open("longdescr.npy", "wb").write(npy("{'descr': '" + "x" * 40000 + "', 'fortran_order': False, 'shape': (1, 2), }", b"\0" * 8, 2))
open("digits.npy", "wb").write(npy("{'descr': '<i4', 'fortran_order': False, 'shape': (12345678901234567890123, 2), }"))
open("overflow.npy", "wb").write(npy("{'descr': '<i8', 'fortran_order': False, 'shape': (2147483648, 2147483648), }"))
PY
expect_input_error ".npy with a 40 KB descr" "longdescr.npy: token dtype 'xxxx" x.h5 -- $T "$bin" analyze --model model --tokens longdescr.npy --out x.h5
# 2./3. FIFOs and device nodes in place of the small files: refused, never opened for blocking reads.
mkfifo tokfifo.npy tokfifo.h5
expect_input_error "FIFO as the .npy token file" "tokfifo.npy: token file is a FIFO" x.h5 -- $T "$bin" analyze --model model --tokens tokfifo.npy --out x.h5
expect_input_error "FIFO as the .h5 token file" "tokfifo.h5: token file is a FIFO" x.h5 -- $T "$bin" analyze --model model --tokens tokfifo.h5 --out x.h5
ln -s /dev/zero zero.npy
expect_input_error "/dev/zero as the token file" "zero.npy: token file is a character device" x.h5 -- $T "$bin" analyze --model model --tokens zero.npy --out x.h5
mkdir fifo_st fifo_idx fifo_cfg zero_idx zero_cfg
cp model/config.json fifo_st/ && mkfifo fifo_st/model.safetensors
expect_input_error "FIFO as model.safetensors" "fifo_st/model.safetensors: safetensors file is a FIFO" x.h5 -- $T "$bin" analyze --model fifo_st --tokens tok.npy --out x.h5
cp model/* fifo_idx/ && mkfifo fifo_idx/model.safetensors.index.json
expect_input_error "FIFO as the index" "model.safetensors.index.json: safetensors index is a FIFO" x.h5 -- $T "$bin" inspect --model fifo_idx
cp model/* zero_idx/ && ln -s /dev/zero zero_idx/model.safetensors.index.json
expect_input_error "/dev/zero as the index" "safetensors index is a character device" x.h5 -- $T "$bin" inspect --model zero_idx
cp model/model.safetensors fifo_cfg/ && mkfifo fifo_cfg/config.json
expect_input_error "FIFO as config.json" "fifo_cfg/config.json: config file is a FIFO" x.h5 -- $T "$bin" analyze --model fifo_cfg --probes random:2:8:1 --out x.h5
cp model/model.safetensors zero_cfg/ && ln -s /dev/zero zero_cfg/config.json
expect_input_error "/dev/zero as config.json" "zero_cfg/config.json: config file is a character device" x.h5 -- $T "$bin" inspect --model zero_cfg
# 4. A 30 MB safetensors header of '[' (7.2 GB for 100 MB before): refused at once, in bounded memory.
mkdir deep && cp model/config.json deep/
"$py" -c "import struct; h=b'['*(30<<20); open('deep/model.safetensors','wb').write(struct.pack('<Q',len(h))+h)"
expect_input_error "deeply nested safetensors header" "deep/model.safetensors: safetensors header: JSON nested more than 64 levels deep" x.h5 -- \
  $T bash -c "ulimit -v 2000000; exec \"\$0\" inspect --model deep" "$bin"
rm -rf deep
# 6. A full disk at the output: exit 2 and one line, no segfault in HDF5's exit handler, no file.
# A small tmpfs when this runs as root and may mount one, otherwise a file size limit (EFBIG).
expect_runtime_error() {  # NAME FRAGMENT OUTPUT -- command...
  local name=$1 fragment=$2 output=$3
  shift 4
  "$@" >"$work/stdout" 2>"$work/stderr"
  local rc=$? lines leftovers
  lines=$(grep -c . "$work/stderr")
  leftovers=$(find "$(dirname "$output")" -maxdepth 1 -name '.*.tmp' | wc -l)
  if [ "$rc" = 2 ] && [ "$lines" = 1 ] && grep -qF -- "$fragment" "$work/stderr" && [ ! -e "$output" ] && [ "$leftovers" = 0 ]; then
    ok "$name"
  else
    bad "$name (exit $rc, $lines lines, $leftovers temporaries): $(head -c 600 "$work/stderr")"
  fi
}
expect_runtime_error "file size limit reached while writing" "File too large" big.h5 -- \
  bash -c "ulimit -f 200; exec \"\$0\" analyze --quiet --model model --probes random:400:64:1 --per-query --out big.h5" "$bin"
mkdir -p small
if [ "$(id -u)" = 0 ] && mount -t tmpfs -o size=256k sinkscope-test small 2>/dev/null; then
  expect_runtime_error "full disk (tmpfs)" "No space left on device" small/big.h5 -- \
    "$bin" analyze --quiet --model model --probes random:400:64:1 --per-query --out small/big.h5
  umount small
else
  echo "note: no tmpfs (not root or no mount permission); the file size limit case stands for a full disk"
fi
# 7. Outputs that are not regular files, or cannot be written: refused before any work.
mkfifo outfifo.h5
expect_input_error "FIFO at --out" "--out outfifo.h5: it exists and is a FIFO" x.h5 -- $T "$bin" analyze --model model --tokens tok.npy --out outfifo.h5
[ -p outfifo.h5 ] && ok "the FIFO at --out is still a FIFO" || bad "the FIFO at --out was replaced"
expect_input_error "device node at --out" "--out /dev/null: it exists and is a character device" x.h5 -- $T "$bin" analyze --model model --tokens tok.npy --out /dev/null
mkdir outdir.h5
expect_input_error "folder at --out" "--out outdir.h5: it is a folder" x.h5 -- $T "$bin" analyze --model model --tokens tok.npy --out outdir.h5
mkfifo failed_fifo
expect_input_error "FIFO at --failed-list" "--failed-list failed_fifo: it exists and is a FIFO" x.h5 -- \
  $T "$bin" sweep --models model --steps 0 --tokens tok.npy --out swout --failed-list failed_fifo
# 9. Token counts: checked (overflow-safe) before anything is allocated.
"$py" -c "
import h5py
with h5py.File('huge_tokens.h5', 'w') as f:
    f.create_dataset('tokens', shape=(2**15, 2**14), dtype='i4', chunks=(1024, 1024), compression='gzip')"
expect_input_error "tiny .h5 declaring 2^29 tokens" "huge_tokens.h5: /tokens: 32768 probes x 16384 positions exceed the limit of 268435456 tokens" x.h5 -- \
  $T bash -c "ulimit -v 3000000; exec \"\$0\" analyze --model model --tokens huge_tokens.h5 --out x.h5" "$bin"
expect_input_error ".npy shape (2^31, 2^31)" "overflow.npy: shape entry 2147483648 exceeds the limit of 268435456 tokens" x.h5 -- $T "$bin" analyze --model model --tokens overflow.npy --out x.h5
expect_input_error "random:65536:65536:0" "65536 probes x 65536 positions exceed the limit of 268435456 tokens" x.h5 -- $T "$bin" analyze --model model --probes random:65536:65536:0 --out x.h5
# 11.-13. Numbers in options and files: checked, bounded, named.
expect_input_error "--threads 40000" "--threads: Value 40000 not in range 1 to 1024" x.h5 -- $T "$bin" analyze --model model --tokens tok.npy --threads 40000 --out x.h5
expect_input_error "--threads 65536" "--threads: Value 65536 not in range" x.h5 -- $T "$bin" analyze --model model --tokens tok.npy --threads 65536 --out x.h5
expect_input_error "--prepend-bos 4294967296" "--prepend-bos 4294967296: not a token id of the model" x.h5 -- $T "$bin" analyze --model model --tokens tok.npy --prepend-bos 4294967296 --out x.h5
expect_input_error "--prepend-bos 64 (= vocab_size)" "--prepend-bos 64: not a token id" x.h5 -- $T "$bin" analyze --model model --tokens tok.npy --prepend-bos 64 --out x.h5
expect_input_error "--probes N past uint64" "--probes 'random:99999999999999999999:8:0': N must be a whole number" x.h5 -- $T "$bin" analyze --model model --probes random:99999999999999999999:8:0 --out x.h5
expect_input_error "--ablate layers past int64" "--ablate 'layers=99999999999999999999'" x.h5 -- $T "$bin" analyze --model model --tokens tok.npy --ablate layers=99999999999999999999 --out x.h5
expect_input_error "--ablate syntax in a sweep, before any checkpoint" "--ablate 'layerz=1'" x.h5 -- $T "$bin" sweep --models model --steps 0 --tokens tok.npy --ablate layerz=1 --out swout2
[ ! -e swout2/checkpoints/model.h5 ] && ok "no checkpoint analysed with a bad --ablate" || bad "a checkpoint was analysed with a bad --ablate"
expect_input_error "23-digit .npy shape entry" "digits.npy: shape entry 12345678901234567890123 exceeds the limit" x.h5 -- $T "$bin" analyze --model model --tokens digits.npy --out x.h5
expect_input_error "--batch 9223372036854775807" "--batch: Value 9223372036854775807 not in range 1 to 1048576" x.h5 -- $T "$bin" analyze --model model --tokens tok.npy --batch 9223372036854775807 --out x.h5
# 14. An index whose metadata has a key equal to a tensor name is valid.
mkdir idxmeta && cp model/* idxmeta/
"$py" - <<'PY'
import json, struct
raw = open("idxmeta/model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
names = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
json.dump({"metadata": {names[0]: 1, "total_size": len(raw)},
           "weight_map": {k: "model.safetensors" for k in names}}, open("idxmeta/model.safetensors.index.json", "w"))
PY
"$bin" inspect --model idxmeta | grep -q "validation: ok" && ok "index metadata may repeat a tensor name" || bad "index metadata repeating a tensor name refused"
# 15. The longest legal output name (251 + '.h5' = 254 characters) works; one past NAME_MAX is refused first.
long=$(printf 'n%.0s' $(seq 251)).h5
$T "$bin" analyze --quiet --model model --tokens tok.npy --out "$long" && [ -f "$long" ] && ok "a 254-character output name" || bad "a 254-character output name"
rm -f "$long"
expect_input_error "a 256-character output name" "file name has 256 bytes, more than the filesystem's limit of 255" x.h5 -- \
  $T "$bin" analyze --model model --tokens tok.npy --out "$(printf 'n%.0s' $(seq 253)).h5"
# 16. A zero-sized tensor with a dimension above INT64_MAX (inspect printed [0, -1]).
mkdir bigdim && cp model/config.json bigdim/
"$py" - <<'PY'
import json, struct
raw = open("model/model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]
header["extra"] = {"dtype": "F32", "shape": [0, 18446744073709551615], "data_offsets": [len(data), len(data)]}
text = json.dumps(header).encode()
text += b" " * ((8 - len(text) % 8) % 8)
open("bigdim/model.safetensors", "wb").write(struct.pack("<Q", len(text)) + text + data)
PY
expect_input_error "dimension above INT64_MAX" "tensor 'extra': shape entry 18446744073709551615 does not fit int64" x.h5 -- $T "$bin" inspect --model bigdim
find . -maxdepth 3 -name '.*.tmp' | grep -q . && bad "temporary files left behind" || ok "no temporary files left"

# A sweep, interrupted (one file deleted, one truncated) and resumed, equals the uninterrupted one.
for s in 0 100 200 400; do "$bin" synth --config "$root/tests/data/tiny_moe.json" --out "trace/step$s" --seed $((s + 3)) 2>/dev/null; done
"$bin" sweep --quiet --models-glob 'trace/step*' --tokens tok.npy --out full && ok "sweep" || bad "sweep"
cp -r full resumed
rm resumed/checkpoints/step100.h5
"$py" -c "import os; p='resumed/checkpoints/step200.h5'; os.truncate(p, os.path.getsize(p) // 2)"
"$bin" sweep --models-glob 'trace/step*' --tokens tok.npy --out resumed --resume 2>resume.log
grep -q "step0: done already, skipped" resume.log && grep -q "redoing step200: damaged" resume.log &&
  ! grep -q "step100: done already" resume.log && ok "--resume skips valid files and redoes damaged ones" || bad "--resume: $(cat resume.log)"
same=1
for f in full/checkpoints/*.h5 full/sweep.h5; do
  "$py" "$root/tests/tools/compare_h5.py" "$f" "resumed/${f#full/}" --rtol 0 >/dev/null || same=0
done
[ "$same" = 1 ] && ok "resumed sweep is identical to the uninterrupted one" || bad "resumed sweep differs"
# 8. One flipped byte in a dataset of a finished file passed --resume unnoticed: the content
#    checksum (content_sha256) catches it and the checkpoint is redone.
cp -r full flipped
"$py" - <<'PY'
import h5py
path = "flipped/checkpoints/step0.h5"
with h5py.File(path, "r") as f:
    offset = f["attention/sink_score"].id.get_offset()
data = bytearray(open(path, "rb").read())
data[offset + 1] ^= 0x01
open(path, "wb").write(data)
PY
"$bin" sweep --models-glob 'trace/step*' --tokens tok.npy --out flipped --resume 2>flip.log
grep -q "redoing step0: damaged (.*content does not match its checksum" flip.log && grep -q "step100: done already" flip.log &&
  "$py" "$root/tests/tools/compare_h5.py" full/checkpoints/step0.h5 flipped/checkpoints/step0.h5 --rtol 0 >/dev/null &&
  ok "--resume redoes a file with a flipped byte in a dataset" || bad "--resume and a flipped byte: $(cat flip.log)"
"$py" -c "
import h5py; f=h5py.File('full/sweep.h5')
assert list(f['steps'][()]) == [0, 100, 200, 400], f['steps'][()]
assert f['sink_score'].shape == (4, 4, 4) and f['convergence/tv'].shape == (3,)
assert f['bootstrap/layer_share/ci95'].shape == (4, 5, 2) and f['causal_layer_share'].shape == (4, 5)
assert f.attrs['convergence_outcome'] in ('no sink', 'not converged'), f.attrs['convergence_outcome']
" && ok "sweep.h5 steps and shapes" || bad "sweep.h5 contents"
# A sweep killed part way (SIGKILL while a checkpoint is being analysed) and rerun with --resume
# produces the same files as the uninterrupted sweep, and no partial file is left at any time.
"$py" -c "import numpy as np; np.save('many.npy', np.random.default_rng(1).integers(0, 64, (3000, 12)).astype(np.int32))"
"$bin" sweep --quiet --models-glob 'trace/step*' --tokens many.npy --batch 1 --no-causal-profile --out killed_ref
"$bin" sweep --quiet --models-glob 'trace/step*' --tokens many.npy --batch 1 --no-causal-profile --out killed &
pid=$!
for _ in $(seq 200); do [ -e killed/checkpoints/step0.h5 ] && break; sleep 0.05; done
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
partial=$(find killed -name '*.h5' | wc -l)
"$bin" sweep --quiet --models-glob 'trace/step*' --tokens many.npy --batch 1 --no-causal-profile --out killed --resume
same=1
for f in killed_ref/checkpoints/*.h5 killed_ref/sweep.h5; do
  "$py" "$root/tests/tools/compare_h5.py" "$f" "killed/${f#killed_ref/}" --rtol 0 >/dev/null || same=0
done
[ "$same" = 1 ] && [ "$partial" -lt 5 ] && ok "killed sweep ($partial files at the kill) resumed equals the uninterrupted one" ||
  bad "killed sweep resumed differs ($partial files at the kill)"

# Mixed probe lengths refused when assembling.
"$py" -c "import numpy as np; np.save('tok9.npy', np.ones((3, 9), np.int32))"
"$bin" analyze --quiet --model trace/step100 --tokens tok9.npy --out resumed/checkpoints/step100.h5
expect_input_error "mixed probe lengths" "different lengths" resumed/nothing -- "$bin" sweep --quiet --models-glob 'trace/step*' --out resumed --assemble-only

if "$bin" report full --out report >report.log 2>&1 && [ -f report/index.html ] && ls report/*.png >/dev/null 2>&1; then
  ok "report writes index.html and PNGs"
else
  bad "report: $(tail -3 report.log)"
fi
if "$bin" report a.h5 --out report1 >report1.log 2>&1 && [ -f report1/index.html ] && ls report1/*.png >/dev/null 2>&1; then
  ok "report of a single analysis file"
else
  bad "report of a single analysis file: $(tail -3 report1.log)"
fi
expect_input_error "report on a missing input" "nothing-here" rep2/index.html -- "$bin" report nothing-here --out rep2

# ---- command-line checks of issue 18 ----
"$bin" analyze --help >help.txt && "$bin" sweep --help >>help.txt
grep -q -- "--eps FLOAT:(0,1)=0.3" help.txt && grep -q -- "--tau FLOAT=0.05" help.txt &&
  grep -q -- "--batch INT:INT in \[1 - 1048576\]=4" help.txt &&
  grep -q -- "--threads INT:INT in \[1 - 1024\]=1" help.txt &&
  grep -q -- "--tp INT:POSITIVE=1" help.txt && grep -q "one of --tokens/--probes is required" help.txt &&
  ok "--help shows defaults and the probe requirement" || bad "--help defaults"
expect_input_error "misspelt subcommand suggests the right one" "did you mean 'analyze'" x.h5 -- "$bin" anlyze --out x.h5
expect_input_error "--eps outside (0,1)" "--eps: must lie strictly between 0 and 1" e.h5 -- \
  "$bin" analyze --quiet --model model --probes random:2:6:1 --eps 1.5 --out e.h5
expect_input_error "--prepend-bos beyond the vocabulary blames --prepend-bos" "--prepend-bos 151643" e.h5 -- \
  "$bin" analyze --quiet --model model --probes random:2:6:1 --prepend-bos 151643 --out e.h5
"$bin" sweep --models trace/step0 trace/step100 --probes random:2:6:1 --tp 3 --out tp3 >/dev/null 2>tp3.log
[ "$?" = 1 ] && [ "$(grep -c . tp3.log)" = 1 ] && grep -q "tp=3" tp3.log && [ ! -e tp3/checkpoints/step0.h5 ] &&
  ok "sweep --tp 3 on one rank: refused once, up front" || bad "sweep --tp 3: $(cat tp3.log)"
mkdir -p named && cp -r trace/step0 named/final && cp -r trace/step100 named/best
expect_input_error "folders without a step are refused" "named/final has no step in its name" named-out/sweep.h5 -- \
  "$bin" sweep --quiet --models named/final named/best --probes random:2:6:1 --out named-out
"$bin" sweep --quiet --models named/final named/best --steps 9 3 --probes random:2:6:1 --out named-ok &&
  "$py" -c "import h5py; f=h5py.File('named-ok/sweep.h5'); assert list(f['steps'][()])==[3,9]; assert [n.decode() if isinstance(n,bytes) else n for n in f['names'].asstr()[()]]==['best','final']" &&
  ok "--steps orders folders without a step" || bad "--steps with named folders"
"$bin" synth --config "$root/tests/data/moe_16e.json" --out shapes/step5 --seed 1 2>/dev/null
expect_input_error "mixed model shapes name both checkpoints" "trace/step0 (" shapes-out/sweep.h5 -- \
  "$bin" sweep --quiet --models trace/step0 shapes/step5 --probes random:2:6:1 --out shapes-out
grep -q "shapes/step5 (" "$work/stderr" && ok "mixed shapes: second checkpoint named" || bad "mixed shapes: $(cat "$work/stderr")"
"$bin" inspect --model model >inspect.txt && ! grep -q "model.layers.0.self_attn.q_proj.weight" inspect.txt &&
  grep -q -- "--tensors lists them" inspect.txt &&
  "$bin" inspect --model model --tensors >inspect-all.txt &&
  grep -q "model.layers.0.self_attn.q_proj.weight" inspect-all.txt &&
  ok "inspect: summary, the list with --tensors" || bad "inspect summary"
"$bin" analyze --model model --probes random:2:6:1 --ablate layers=0 --out abl.h5 2>abl.log &&
  grep -q "ablation 1/" abl.log && grep -q "layer 0 head 0" abl.log && ok "ablation progress per component" ||
  bad "ablation progress: $(cat abl.log)"

if "$root/jobs/submit_sweep.sh" --dry-run --site local --sinkscope /cluster/apps/sinkscope/bin/sinkscope \
  trace tok.npy dry-out >dry.log 2>&1 && grep -q "array job" dry.log; then
  ok "submit_sweep.sh --dry-run without the site's binary"
else
  bad "submit_sweep.sh --dry-run: $(tail -3 dry.log)"
fi

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
