"""
Tests of support/plan.py and train.py --dry-run: the parameter count and the activation bytes of the memory
model against what torch itself holds (the model's parameters, autograd's saved tensors), and the dry
run on a 7B-shaped config.json alone, which must fit 8 x 80 GiB at 64k tokens with full checkpointing and
be refused on 8 x 20 GiB with a --seq-len that would fit.

    python -m pytest tests/test_plan.py -q
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import Llama, LlamaConfig  # noqa: E402
from support.plan import GIB, Plan, activation_bytes, param_counts  # noqa: E402
from rope import RopeConfig  # noqa: E402
from tests.helpers import FINETUNE, run_train  # noqa: E402

SHAPES = {  # small configs of each kind the memory model distinguishes
    "llama": dict(),
    "tied": dict(tie_word_embeddings=True),
    "qwen2 (q/k/v biases)": dict(qkv_bias=True, model_type="qwen2"),
    "qwen3 (q/k norms, head_dim 2C/H)": dict(qk_norm=True, head_dim=64, model_type="qwen3"),
    "bias everywhere": dict(attention_bias=True, mlp_bias=True),
}


def small(**kw):
    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, rope=RopeConfig(original_max_position_embeddings=512), **kw)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_parameter_count_is_the_models(shape):
    cfg = small(**SHAPES[shape])
    with torch.device("meta"):
        model = Llama(cfg)
    total, block, root = param_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert block == sum(p.numel() for p in model.model.layers[0].parameters())


def saved_bytes(model, idx):
    """Bytes of the tensors autograd saves for backward in one forward with the loss, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["llama", "qwen2 (q/k/v biases)", "qwen3 (q/k norms, head_dim 2C/H)"])
def test_activation_bytes_are_what_autograd_saves(shape, dtype):
    """The none mode's per-layer count, against autograd's own saved tensors: one layer more adds exactly
    activation_bytes (in bf16 as the FSDP2 policy computes, and in fp32)."""
    T, measured = 512, []
    for layers in (2, 3):
        cfg = LlamaConfig(**{**small(**SHAPES[shape]).__dict__, "num_hidden_layers": layers})
        torch.manual_seed(0)
        model = Llama(cfg).to(dtype).train()
        measured.append(saved_bytes(model, torch.randint(0, 256, (1, T))))
    assert measured[1] - measured[0] == activation_bytes(cfg, T, dtype.itemsize)


def test_checkpointing_modes_order_and_scale():
    cfg = small()
    plans = {m: Plan(cfg, 4096, m, 8, 10, micro_batch=1, gpus=1, memory=None) for m in ("none", "selective", "full")}
    assert plans["none"].total > plans["selective"].total > plans["full"].total
    long = Plan(cfg, 8192, "full", 8, 10, micro_batch=1, gpus=1, memory=None)
    kept = "activations kept for backward (full)"
    assert long.parts[kept] == 2 * plans["full"].parts[kept]  # linear in the length
    sharded = Plan(cfg, 4096, "full", 8, 10, micro_batch=1, gpus=8, memory=None)
    assert sharded.parts["AdamW moments (fp32, sharded)"] * 8 == plans["full"].parts["AdamW moments (fp32, sharded)"]


# ---- train.py --dry-run ------------------------------------------------------------------------------------

@pytest.fixture
def llama_7b(tmp_path):
    """Llama 2 7B's config.json, and nothing else: no weights, no tokenizer, no data."""
    cfg = LlamaConfig(rope=RopeConfig(head_dim=128, original_max_position_embeddings=4096))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf(torch.bfloat16)))
    return tmp_path


def dry_run(*args):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dry-run", *map(str, args)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_7b_at_64k_fits_8_gpus_of_80_gib_with_full_checkpointing(llama_7b):
    r = dry_run("--init", llama_7b, "--yarn-scale", "16", "--gpus", "8", "--gpu-memory", "80",
                "--activation-checkpointing", "full")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    out = r.stdout
    assert "6.74B parameters, yarn s=16 over L=4096, 65536-token sequences" in out, out
    assert "fits (90% of 80 GiB)" in out and "4.19M per step (64 x 65536), 1.68G in 400 steps" in out
    assert "h in all" in out and "80.9GB per resumable checkpoint, 13.5GB for the export" in out
    assert not (llama_7b / "out").exists() and os.listdir(llama_7b) == ["config.json"]  # nothing written


def test_7b_at_64k_is_refused_on_8_gpus_of_20_gib_with_what_fits(llama_7b):
    r = dry_run("--init", llama_7b, "--yarn-scale", "16", "--gpus", "8", "--gpu-memory", "20",
                "--activation-checkpointing", "full")
    assert r.returncode == 2 and "does NOT fit" in r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: the plan needs"), r.stderr
    seq = int(r.stderr.split("--seq-len ")[1].split()[0])
    again = dry_run("--init", llama_7b, "--yarn-scale", "16", "--gpus", "8", "--gpu-memory", "20",
                    "--activation-checkpointing", "full", "--seq-len", seq)
    assert again.returncode == 0 and "fits" in again.stdout  # the hint is a run that fits
    # selective at 64k does not fit 8 x 64 GiB, full does: the hint names the mode first
    r = dry_run("--init", llama_7b, "--yarn-scale", "16", "--gpus", "8", "--gpu-memory", "64")
    assert r.returncode == 2 and "--activation-checkpointing full fits" in r.stderr, (r.stdout, r.stderr)


def test_gpus_without_memory_needs_it(llama_7b):
    r = dry_run("--init", llama_7b, "--yarn-scale", "16", "--gpus", "8")
    assert r.returncode == 2 and "--gpu-memory" in r.stderr and r.stderr.count("\n") == 1


def test_every_run_prints_its_plan_first(work):
    out = work / "planned"
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE, "--steps", "1"])
    assert r.returncode == 0, r.stderr
    notes, plan = r.stdout.split("plan: ")  # the note on L, then the plan
    assert notes.startswith("note: L = 64") and "memory per CPU" in plan and "128-token sequences" in plan
    assert r.stderr.index("step 1/1") > 0  # the plan came before the training


def test_micro_batch_multiplies_what_one_forward_holds():
    cfg = small()
    one, four = (Plan(cfg, 4096, "selective", 8, 10, micro_batch=mb, gpus=1, memory=None) for mb in (1, 4))
    for part in ("activations kept for backward (selective)", "attention workspace (backward)"):
        assert four.parts[part] == 4 * one.parts[part]
    assert four.parts["weights (fp32, sharded)"] == one.parts["weights (fp32, sharded)"]
    assert four.tokens_per_step == one.tokens_per_step  # the step's tokens are the batch's, whatever the micro-batch


def test_plan_flags_belong_to_a_dry_run_and_rope_factor_scales_the_own_method(llama_7b, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--init", str(llama_7b), "--data", str(tmp_path),
                        "--gpus", "8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--dry-run" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # --rope-factor without --rope: the checkpoint's own method at that factor (plain RoPE has none to scale)
    r = dry_run("--init", llama_7b, "--rope-factor", "4", "--gpus", "8", "--gpu-memory", "80")
    assert r.returncode == 2 and "--rope-factor needs a --rope METHOD" in r.stderr, r.stderr
    cfg = json.loads((llama_7b / "config.json").read_text())
    cfg.update(rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
               max_position_embeddings=32768)
    (llama_7b / "config.json").write_text(json.dumps(cfg))
    r = dry_run("--init", llama_7b, "--rope-factor", "4", "--seq-len", "8192", "--gpus", "8", "--gpu-memory", "80")
    assert r.returncode == 0 and "yarn s=4 over L=4096" in r.stdout, r.stdout + r.stderr
    # a dry run checks the batch against the GPUs it plans for, not this machine's processes
    r = dry_run("--init", llama_7b, "--seq-len", "8192", "--gpus", "3", "--gpu-memory", "80", "--batch-size", "64")
    assert r.returncode == 2 and "world size 3" in r.stderr, r.stderr


def test_checkpoints_in_step_order_past_a_million(tmp_path):
    from support import rundir
    for n in ("step-000002", "step-1000000", "step-999999", "step-best", ".step-000003.tmp"):
        (tmp_path / "checkpoints" / n).mkdir(parents=True)
    names = [os.path.basename(p) for p in rundir.checkpoints(str(tmp_path))]
    assert names == ["step-000002", "step-999999", "step-1000000"]
