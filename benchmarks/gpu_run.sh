#!/usr/bin/env bash
# One device call for issue 21: the three GPU benchmarks, logs to $OUT (or ./out). Run from the repo root.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton, transformers, numba; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'numba', numba.__version__)"
  grep -m1 "model name" /proc/cpuinfo; nproc
} 2>&1 | tee "$OUT/env.txt"
timeout ${T_CHECKSUM:-240} python3 benchmarks/bench_checksum.py --gpu --warmup 50 --rep ${REP:-400} 2>&1 | tee "$OUT/checksum.txt"
timeout ${T_AUDIT:-200} python3 benchmarks/bench_audit.py --device cuda --layers 32 --seq 4096 --repeats 3 2>&1 | tee "$OUT/audit.txt"
timeout ${T_LOAD:-200} python3 benchmarks/bench_loading.py --gb 4 --device cuda --dir /tmp/bench_loading 2>&1 | tee "$OUT/loading.txt"
