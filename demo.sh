#!/usr/bin/env bash
# The YaRN paper in miniature, on a CPU: data, a small base model, context extension with YaRN and with
# Position Interpolation under equal training, the paper's perplexity comparison, and sampling with a whole
# play as the prompt.
#
#   bash demo.sh                 # the full demo (about 10 minutes on 2 CPU cores), into demo-out/
#   bash demo.sh --quick         # the same pipeline with tiny sizes (a minute or two; the tests run it)
#   bash demo.sh --redo          # redo every step (by default a step whose output exists is skipped)
#   bash demo.sh --out DIR       # somewhere else
#   PYTHON=python3 bash demo.sh  # use this interpreter as it is, no virtual environment
set -euo pipefail
cd "$(dirname "$0")"

quick=0 redo=0 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --redo) redo=1 ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# 1) the environment: a virtual environment with the requirements, and matplotlib for the plots
if [ -z "${PYTHON:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q matplotlib || echo "note: no matplotlib: tables and JSON only, no plots"
  PYTHON=.venv/bin/python
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

# sizes: L is the base model's context, S the extension factor, so the extended context is S*L
if [ "$quick" = 1 ]; then
  out=${out:-demo-out-quick}
  L=64 S=4 TUNE_LEN=128 PROMPT_CHARS=6000
  MODEL="--n-layer 2 --n-embd 64 --n-head 4 --n-kv-head 2"
  PRETRAIN="--steps 4 --batch-size 4 --micro-batch 4 --warmup 1"
  TUNE="--steps 2 --batch-size 4 --micro-batch 1 --warmup 1 --lr 1e-3"
  LENGTHS=64,128,256 EVAL_DOCS=1
else
  out=${out:-demo-out}
  L=256 S=16 TUNE_LEN=1024 PROMPT_CHARS=0
  MODEL="--n-layer 4 --n-embd 192 --n-head 6 --n-kv-head 2"
  PRETRAIN="--steps 400 --batch-size 16 --micro-batch 16 --warmup 30 --lr 2e-3 --eval-every 100"
  TUNE="--steps 40 --batch-size 8 --micro-batch 1 --warmup 4 --lr 3e-4"
  LENGTHS=256,512,1024,2048,4096 EVAL_DOCS=3
fi
mkdir -p "$out/results"
timings="$out/results/timings.md"
[ -f "$timings" ] || printf '| step | wall time (s) |\n|---|---|\n' > "$timings"

# step NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists (or --redo), and time it
step() {
  local name=$1 done_file=$2; shift 2
  if [ "$redo" = 0 ] && [ -e "$done_file" ]; then
    echo "== $name: $done_file exists, skipped (--redo to run it again)"
    return
  fi
  echo "== $name"
  local t0=$SECONDS
  "$@"
  echo "| $name | $((SECONDS - t0)) |" >> "$timings"
}
torchrun() { "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 "$@"; }

# 2) the corpus: Gutenberg Shakespeare, a 2048-token sentencepiece model, the longest plays held out
step "prepare the Shakespeare corpus" "$out/data/meta.json" \
  "$PYTHON" data/shakespeare/prepare.py --out "$out/data"

# 3) a small Llama pretrained from scratch at context L
step "pretrain the base model at L=$L" "$out/base/config.json" \
  "$PYTHON" train.py --init scratch --data "$out/data" --seq-len $L $MODEL $PRETRAIN --out "$out/base" --resume

# 4) extend it S times, with YaRN and with PI (linear), under the same steps and data. Both train at
#    TUNE_LEN < S*L, the paper's trick: the rest of the context is reached by extrapolation
step "extend with YaRN, s=$S" "$out/yarn/config.json" \
  torchrun train.py --init "$out/base" --data "$out/data" --yarn-scale $S --seq-len $TUNE_LEN $TUNE --out "$out/yarn" --resume
step "extend with PI (linear), s=$S" "$out/pi/config.json" \
  torchrun train.py --init "$out/base" --data "$out/data" --rope linear --rope-factor $S --seq-len $TUNE_LEN $TUNE --out "$out/pi" --resume

# 5) perplexity on the held-out plays: the same plays at every length, each truncated to it (the paper's protocol)
heldout="$out/data/val.bin"
step "perplexity: the base model under each method, no fine-tuning" "$out/results/ppl-base.json" \
  "$PYTHON" eval.py ppl --model "$out/base" --label base --data "$heldout" --lengths $LENGTHS --max-docs $EVAL_DOCS \
    --rope none --rope linear:$S --rope ntk:$S --rope dynamic-ntk:1 --rope yarn:$S --rope dynamic-yarn \
    --json "$out/results/ppl-base.json"
step "perplexity: the PI-tuned model" "$out/results/ppl-pi.json" \
  "$PYTHON" eval.py ppl --model "$out/pi" --label PI-tuned --data "$heldout" --lengths $LENGTHS --max-docs $EVAL_DOCS \
    --json "$out/results/ppl-pi.json"
step "perplexity: the YaRN-tuned model" "$out/results/ppl-yarn.json" \
  "$PYTHON" eval.py ppl --model "$out/yarn" --label YaRN-tuned --data "$heldout" --lengths $LENGTHS --max-docs $EVAL_DOCS \
    --json "$out/results/ppl-yarn.json"
"$PYTHON" eval.py report "$out/results/ppl-base.json" "$out/results/ppl-pi.json" "$out/results/ppl-yarn.json" \
  --out "$out/results/ppl.md"
#    no passkey step: this 2.4M-parameter base model does not retrieve a key even at L (0 of 12 in the last run
#    that asked; docs/passkey.md), so the table would measure nothing; eval.py passkey is the test on a real model

# 6) sampling from the YaRN model with a whole held-out play as the prompt (a cut of it in --quick)
play=$(ls "$out/data/heldout/"*.txt | head -n 1)
prompt="$out/results/prompt.txt"
if [ "$PROMPT_CHARS" -gt 0 ]; then head -c "$PROMPT_CHARS" "$play" > "$prompt"; else cp "$play" "$prompt"; fi
ctx=$("$PYTHON" -c "import sys; from data.tokenizer import load_tokenizer; print(len(load_tokenizer(sys.argv[1]).encode(open(sys.argv[2]).read())) + 300)" "$out/yarn" "$prompt")
step "sample from the YaRN model after $(basename "$play" .txt)" "$out/results/sample.txt" \
  sh -c "\"$PYTHON\" sample.py --model \"$out/yarn\" --ctx $ctx --prompt-file \"$prompt\" --max-new-tokens 200 --seed 0 | tee \"$out/results/sample.txt.tmp\" && mv \"$out/results/sample.txt.tmp\" \"$out/results/sample.txt\""

echo
echo "== done. Results in $out/results/:"
ls "$out/results"
echo
cat "$out/results/ppl.md"
echo
cat "$timings"
