#!/usr/bin/env bash
# The GPU checks of issues #9 and #26 in one command, for a machine with one CUDA GPU (H100 or H200) and a
# python3 that has torch (CUDA), transformers and pytest; no network, nothing installed. In this order, each
# step under `timeout` and all of them within a budget of 25 minutes (GPU_SH_BUDGET seconds; 14 for `long`):
#   1. tests/test_cuda.py: flash attention trains and prefills, bf16 vs fp32, a one-process train.py step,
#      a 131072-token cache, compiled decoding == eager
#   2. bench/bench.py on Llama 2 7B's layer shapes (8 layers): train-65536, prefill-131072, decode-131072,
#      ours (selective checkpointing) and transformers (full checkpointing) side by side
#   3. train.py at 65536 tokens (4 layers of 7B's shape, from scratch, YaRN s=16), eager then --compile
#   4. sample.py on what step 3 wrote, a 16k context: eager decoding, then --compile (a CUDA graph per token)
#   5. past 64k (#26): 4 layers of Llama-3.1-8B's shape at 131072 tokens, plain and with each memory switch
#      (--tile-mlp, --offload-checkpoints, --cpu-offload), then all three at 262144, the longest its plan fits
#      in 80 GiB; each run's plan (total) beside its measured peak_mem_gb, tokens/s and MFU
# A step that fails or times out is logged and the next one runs. Everything goes to $OUT if it is set,
# else to bench/results/gpu-DATE/: one log per step and summary.txt, the lines worth reading.
# `bash bench/gpu.sh long` runs only step 5 (and the data it needs): about 10 minutes.
#
#     bash bench/gpu.sh
#     OUT=/tmp/gpu-run PYTHON=python3 GPU_SH_BUDGET=840 bash bench/gpu.sh long
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
only=${1:-all}  # all, or long: step 5 alone
budget=${GPU_SH_BUDGET:-$([ "$only" = long ] && echo 840 || echo 1500)}
deadline=$((SECONDS + budget))
failures=0

say() { echo "$*" | tee -a "$summary"; }

# step NAME SECONDS COMMAND...: run it under timeout (never past the deadline), output in NAME.log
step() {
  local name=$1 limit=$2 left=$((deadline - SECONDS))
  shift 2
  [ "$limit" -gt "$left" ] && limit=$left
  say "== $name: $*"
  if [ "$limit" -lt 10 ]; then
    say "   SKIPPED: the ${budget}s budget is spent"
    failures=$((failures + 1))
    return 1
  fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    say "   ok in $((SECONDS - t0))s"
  else
    failures=$((failures + 1))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "   TIMED OUT after ${limit}s"; else say "   FAILED (exit $rc) after $((SECONDS - t0))s"; fi
    tail -n 5 "$out/$name.log" | sed 's/^/   | /' | tee -a "$summary"
  fi
  return $rc
}

# the lines of a log that say how fast (grep finds none: nothing to add)
keep() { grep -E "$2" "$out/$1.log" 2>/dev/null | sed 's/^/   /' | tee -a "$summary"; }

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false
say "gpu.sh $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), out $out"
step env 30 sh -c "nvidia-smi; $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"transformers\", transformers.__version__); print(torch.cuda.get_device_name())'"
keep env "^torch|H100|H200|NVIDIA"

if [ "$only" = all ]; then
# 1) the CUDA tests
step tests 150 "$PY" -m pytest -q -rs tests/test_cuda.py
keep tests "passed|failed|skipped|error"

# 2) the benchmark: ours and transformers on the same random 7B-shaped checkpoint (built once, bf16, 3.7 GB)
step bench 220 "$PY" bench/bench.py --device cuda --sizes 7b-8l --workloads train-65536,prefill-131072,decode-131072 \
  --reps 1 --min-time 0 --checkpointing selective --decode-tokens 64 --out "$out/bench-gpu.json"
[ -f "$out/bench-gpu.md" ] && sed 's/^/   /' "$out/bench-gpu.md" | tee -a "$summary"
keep bench "machine peak|max \|logit diff\|"
fi

# 3) train.py: a synthetic corpus (random words, a 512-token sentencepiece), then a few steps at 64k
step data 45 "$PY" - "$out/corpus" <<'EOF'
import os, random, sys
words = ("the king queen crown sword night day love death speak hear what thou thee my lord good ill "
         "river stone house bread water fire wind under over after before never always").split()
rng = random.Random(0)
os.makedirs(sys.argv[1], exist_ok=True)
for i in range(8):
    with open(os.path.join(sys.argv[1], f"doc{i}.txt"), "w") as f:
        f.write("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(6000)))
with open(os.path.join(os.path.dirname(sys.argv[1]), "prompt.txt"), "w") as f:
    f.write(" ".join(rng.choice(words) for _ in range(6000)))
from data.prepare import main
main(["--input", sys.argv[1], "--out", os.path.join(os.path.dirname(sys.argv[1]), "data"),
      "--train-tokenizer", "512", "--val-fraction", "0.125"])
EOF
TRAIN=(train.py --device cuda --init scratch --data "$out/data" --seq-len 65536 --rope yarn --rope-factor 16
       --n-layer 4 --n-embd 4096 --n-head 32 --intermediate-size 11008 --batch-size 1 --steps 4 --warmup 1
       --save-every 0 --eval-blocks 1 --activation-checkpointing selective)
if [ "$only" = all ]; then
step train 75 "$PY" "${TRAIN[@]}" --out "$out/train"
keep train "^plan:|  total |parameters|tokens/s over"   # the plan's estimate, to set beside peak_mem_gb below
tail -n 2 "$out/train/metrics.jsonl" 2>/dev/null | sed 's/^/   /' | tee -a "$summary"
step train-compile 110 "$PY" "${TRAIN[@]}" --compile --out "$out/train-compiled"
keep train-compile "tokens/s over"

# 4) sample.py on the 4-layer model just trained (bf16): a 6k-word prompt in a 16k cache
SAMPLE=(sample.py --device cuda --model "$out/train" --ctx 16384 --prompt-file "$out/prompt.txt"
        --max-new-tokens 256 --temperature 0)
step sample 45 "$PY" "${SAMPLE[@]}"
keep sample "KV cache|tok/s|peak memory"
step sample-compile 90 "$PY" "${SAMPLE[@]}" --compile
keep sample-compile "compiled|tok/s"
fi

# 5) past 64k: the memory switches of issue #26 on 4 layers of Llama-3.1-8B's shape (from scratch, YaRN s=16
#    over L=8192), 2 steps each (the second is the one timed); the plan's total beside the measured peak
LONG=(train.py --device cuda --init scratch --data "$out/data" --rope yarn --rope-factor 16 --original-ctx 8192
      --n-layer 4 --n-embd 4096 --n-head 32 --n-kv-head 8 --intermediate-size 14336 --batch-size 1 --steps 2
      --warmup 1 --save-every 0 --eval-blocks 1 --log-every 1)
long() {  # NAME SECONDS FLAGS...: one run, then its plan's total, its measured peak, speed and MFU
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$PY" "${LONG[@]}" "$@" --out "$out/$name"
  keep "$name" "^plan:|  total |tokens/s over|extra time"
  tail -n 1 "$out/$name/metrics.jsonl" 2>/dev/null | sed 's/^/   /' | tee -a "$summary"
}
long long-plain 100 --seq-len 131072 --activation-checkpointing full
long long-tile 100 --seq-len 131072 --activation-checkpointing full --tile-mlp
long long-offload 100 --seq-len 131072 --offload-checkpoints
long long-cpu-offload 130 --seq-len 131072 --activation-checkpointing full --cpu-offload
long long-all-256k 220 --seq-len 262144 --tile-mlp --offload-checkpoints --cpu-offload
# without the switches 262144 does not fit: the refusal, and the switches it names
step long-refused 30 sh -c '"$0" "$@"; [ $? -eq 2 ]' "$PY" "${LONG[@]}" --seq-len 262144 --dry-run --gpus 1 --gpu-memory 80
keep long-refused "^error"

say "== done in ${SECONDS}s, $failures step(s) failed or skipped; logs in $out"
exit $((failures > 0))
