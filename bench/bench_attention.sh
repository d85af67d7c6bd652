#!/usr/bin/env bash
# The attention kernels of the CUDA backend beside PyTorch's sdpa backends, same GPU, same job
# (docs/benchmarks.md, "Attention"): one table.
#
#   bench/bench_attention.sh BUILD_DIR [SHAPES] [extra bench_attention options]
#   bench/bench_attention.sh /tmp/b 8x4096,1x32768,1x131072
set -euo pipefail
build=${1:?usage: bench_attention.sh BUILD_DIR [SHAPES] [options]}
shapes=${2:-8x4096,1x32768}
shift $(( $# >= 2 ? 2 : 1 ))
here=$(cd "$(dirname "$0")" && pwd)
"$build/bench/sinkscope_bench_attention" --shapes "$shapes" "$@"
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  python3 "$here/attention_torch.py" --shapes "$shapes" "$@" | sed 1d
  python3 -c "import torch; print(); print('PyTorch', torch.__version__, 'cuDNN', torch.backends.cudnn.version())"
else
  echo "(PyTorch with CUDA not importable here: its rows are skipped)"
fi
