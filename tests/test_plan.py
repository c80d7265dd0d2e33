"""
Tests of support/plan.py and train.py --dry-run: the parameter count and the activation bytes of the memory
model against what torch itself holds (the model's parameters, autograd's saved tensors, what the offload
hooks copy to the host), with and without the memory switches; the dry run on a 7B-shaped config.json
alone, which must fit 8 x 80 GiB at 64k tokens with full checkpointing and be refused on 8 x 20 GiB with
switches or a --seq-len that would fit; and the long contexts of issue #26 from config.json alone:
Llama-3.1-8B at 1M tokens on 8 x 80 GiB and at 128k on one 80 GiB GPU, Qwen3-8B at 128k on 8 x 80 GiB.

    python -m pytest tests/test_plan.py -q
"""

import json
import os
import subprocess
import sys
from dataclasses import fields, replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import Llama, LlamaConfig  # noqa: E402
from support import memory  # noqa: E402
from support.distributed import environment  # noqa: E402
from support.plan import GIB, Plan, activation_bytes, kept_bytes, param_counts  # noqa: E402
from support.train_config import TrainConfig, check, parse_args, run_plan  # noqa: E402
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


def per_layer_saved(dtype, mode, tile_mlp=False, T=512):
    """What one layer more adds to autograd's saved tensors, measured (2 and 3 layers)."""
    measured = []
    for layers in (2, 3):
        cfg = LlamaConfig(**{**small().__dict__, "num_hidden_layers": layers})
        torch.manual_seed(0)
        model = Llama(cfg).to(dtype).train()
        model.set_activation_checkpointing(mode, tile_mlp=tile_mlp)
        measured.append(saved_bytes(model, torch.randint(0, 256, (1, T))))
    return measured[1] - measured[0], cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["none", "full"])
def test_tiled_mlp_and_full_checkpointing_keep_what_the_plan_says(mode, dtype):
    """Tiled (tiles of C = 128 of the 512 positions), the MLP keeps only its input, which the norm before it
    keeps already: activation_bytes without the 4 (T, I) intermediates; full checkpointing keeps the input
    (the RoPE tables are shared by every layer), with the tiled MLP too."""
    for tile_mlp in (False, True):
        measured, cfg = per_layer_saved(dtype, mode, tile_mlp)
        assert measured == kept_bytes(cfg, 512, dtype.itemsize, mode, tile_mlp), (mode, tile_mlp)
    assert activation_bytes(cfg, 512, 2) - activation_bytes(cfg, 512, 2, tile_mlp=True) == 4 * 2 * 512 * 320


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_checkpoints_are_what_the_plan_puts_on_the_host(dtype, monkeypatch):
    """With --offload-checkpoints, what the offload hooks copy to the host, measured, is the plan's host
    part for one GPU (every layer's kept input); on the device they leave only the RoPE tables, which every
    layer shares (what the device keeps without offload is that much more)."""
    host, device = [], {}

    def spy(positions, t):
        packed = to_host(positions, t)
        if isinstance(packed, memory.Offloaded):
            host.append(packed.host.untyped_storage().nbytes())
        else:
            device[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return packed

    to_host = memory.to_host
    monkeypatch.setattr(memory, "to_host", spy)
    cfg = small()
    torch.manual_seed(0)
    model = Llama(cfg).to(dtype).train()
    model.set_activation_checkpointing("full", offload=True)
    device_saved = saved_bytes(model, torch.randint(0, 256, (1, 512)))
    plan = Plan(cfg, 512, "full", 8, 10, micro_batch=1, gpus=1, memory=None, bf16=dtype == torch.bfloat16,
                offload=True)
    assert sum(host) == plan.host_parts["kept activations, pinned (--offload-checkpoints)"]
    assert len(host) == cfg.num_hidden_layers
    assert sum(device.values()) == 2 * 512 * cfg.head_dim // 2 * 4  # cos and sin (T, D/2), fp32
    model.set_activation_checkpointing("full")
    assert saved_bytes(model, torch.randint(0, 256, (1, 512))) - device_saved == sum(host) + sum(device.values())


def test_the_sharded_state_is_what_adamw_holds():
    """16 bytes a parameter (fp32 weight, gradient, two AdamW moments), counted on a real optimizer step:
    what the plan shards over the GPUs, and puts in host memory with --cpu-offload."""
    cfg = small()
    model = Llama(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 256, (1, 64)), torch.randint(0, 256, (1, 64))).backward()
    optimizer.step()
    held = sum(p.nbytes + p.grad.nbytes for p in model.parameters())
    held += sum(v.nbytes for state in optimizer.state.values() for v in state.values() if v.dim() > 0)
    on_gpu = Plan(cfg, 64, "full", 8, 10, micro_batch=1, gpus=2, memory=None)
    assert held == 2 * sum(v for k, v in on_gpu.parts.items() if "sharded" in k)
    on_host = Plan(cfg, 64, "full", 8, 10, micro_batch=1, gpus=2, memory=None, cpu_offload=True)
    assert held == on_host.host_parts["fp32 weights, gradients, AdamW (--cpu-offload)"]  # both ranks of the node
    assert not any("sharded" in k for k in on_host.parts)


def test_context_parallelism_divides_the_activations_not_the_tokens():
    cfg = small()
    one, four = (Plan(cfg, 4096, "full", 8, 10, micro_batch=1, gpus=8, memory=None, cp=cp) for cp in (1, 4))
    for part in ("activations kept for backward (full)", "loss (fp32 head gradient, dh, one chunk)"):
        assert four.parts[part] < one.parts[part]
    kept = "activations kept for backward (full)"
    assert four.parts[kept] * 4 == one.parts[kept]
    assert four.parts["K and V of one layer, all-gathered (--cp)"] == 2 * 2 * 4096 * 2 * 32  # 2 x T x KV x D x b
    assert four.tokens_per_step == one.tokens_per_step and four.params == one.params


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


def hinted(stderr):
    """The flags a refusal's one line names: 'error: the plan needs ... of its N GiB: FLAGS fits (...)'."""
    assert stderr.count("\n") == 1 and stderr.startswith("error: the plan needs"), stderr
    return stderr.split(" GiB: ", 1)[1].split(" fits (")[0].split()


def fits_with(args, flags):
    """The dry run of args plus the hint's flags fits. A flag train.py does not have yet (--cp comes with
    context parallelism) is applied to the same run's plan in this process instead."""
    ours = {"--" + f.name.replace("_", "-") for f in fields(TrainConfig)}
    cp = int(flags[flags.index("--cp") + 1]) if "--cp" in flags and "--cp" not in ours else 1
    flags = flags if cp == 1 else [f for i, f in enumerate(flags) if "--cp" not in flags[max(0, i - 1):i + 1]]
    if cp == 1:
        r = dry_run(*args, *flags)
        assert r.returncode == 0 and "fits (90%" in r.stdout, r.stdout + r.stderr
        return r.stdout
    tc = parse_args(["--dry-run", *map(str, args), *flags])
    tc, mcfg, _, save_dtype, _ = check(tc, environment("cpu", "auto"))
    plan = replace(run_plan(tc, mcfg, environment("cpu", "auto"), save_dtype), cp=cp)
    assert plan.fits, plan.text()
    return plan.text()


def test_7b_at_64k_is_refused_on_8_gpus_of_20_gib_with_what_fits(llama_7b):
    args = ["--init", llama_7b, "--yarn-scale", "16", "--gpus", "8", "--gpu-memory", "20", "--activation-checkpointing", "full"]
    r = dry_run(*args)
    assert r.returncode == 2 and "does NOT fit" in r.stdout
    fits_with(args, hinted(r.stderr))  # the hint is a run that fits
    # so small a GPU that no switch is enough: the hint shortens the sequences too, and is a run that fits
    small_gpu = args[:6] + ["--gpu-memory", "6"] + args[8:]
    r = dry_run(*small_gpu)
    assert r.returncode == 2 and "--seq-len" in hinted(r.stderr), r.stderr
    fits_with(small_gpu, hinted(r.stderr))
    # selective at 64k does not fit 8 x 64 GiB, full does: the hint names the mode first
    r = dry_run("--init", llama_7b, "--yarn-scale", "16", "--gpus", "8", "--gpu-memory", "64")
    assert r.returncode == 2 and "--activation-checkpointing full fits" in r.stderr, (r.stdout, r.stderr)


# ---- issue #26: past 64k tokens, from config.json alone ------------------------------------------------------

LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001}
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645}


def config_dir(tmp_path, name, hf):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(hf))
    return tmp_path / name


def test_llama_31_8b_at_64k_fits_8_gpus_and_128k_needs_a_switch(tmp_path):
    """The issue's figures: full checkpointing fits 64k (58.6 GiB) and not 128k (95.4 GiB), whose refusal
    names the cheapest switch that fits."""
    args = ["--init", config_dir(tmp_path, "llama31", LLAMA_31_8B), "--gpus", "8", "--gpu-memory", "80",
            "--activation-checkpointing", "full"]
    r = dry_run(*args, "--seq-len", "65536")
    assert r.returncode == 0 and "8.03B parameters" in r.stdout and "58.61 GiB  fits" in r.stdout, r.stdout
    r = dry_run(*args, "--seq-len", "131072")
    assert r.returncode == 2 and "95.37 GiB  does NOT fit" in r.stdout, r.stdout
    fits_with(args + ["--seq-len", "131072"], hinted(r.stderr))


def test_llama_31_8b_at_1m_tokens_fits_8_gpus_of_80_gib(tmp_path):
    args = ["--init", config_dir(tmp_path, "llama31", LLAMA_31_8B), "--gpus", "8", "--gpu-memory", "80",
            "--seq-len", "1048576", "--batch-size", "8"]
    r = dry_run(*args)
    assert r.returncode == 2 and "1048576-token sequences" in r.stdout
    flags = hinted(r.stderr)
    assert "--cp" in flags and "--tile-mlp" in flags, flags  # a 1M-token sequence does not fit one GPU's activations
    plan = fits_with(args, flags)
    assert "tokens: 8.39M per step (8 x 1048576)" in plan  # --cp splits the sequence, not the batch


def test_llama_31_8b_at_128k_fits_one_gpu_of_80_gib(tmp_path):
    """One GPU: 8B's fp32 weights, gradients and AdamW (120 GiB) alone do not fit; --cpu-offload puts them in
    host memory, and the plan counts it (host memory per node)."""
    args = ["--init", config_dir(tmp_path, "llama31", LLAMA_31_8B), "--gpus", "1", "--gpu-memory", "80",
            "--seq-len", "131072", "--batch-size", "8"]
    r = dry_run(*args)
    assert r.returncode == 2
    flags = hinted(r.stderr)
    assert "--cpu-offload" in flags and "GiB of host memory per node" in r.stderr, r.stderr
    plan = fits_with(args, flags)
    assert "fp32 weights, gradients, AdamW (--cpu-offload)" in plan and "119.66 GiB" in plan, plan
    # a host too small for it is refused as such
    r = dry_run(*args, *flags, "--host-memory", "128")
    assert r.returncode == 2 and "of host memory per node, more than 90% of its 128 GiB" in r.stderr, r.stderr


def test_qwen3_8b_at_128k_fits_8_gpus_of_80_gib(tmp_path):
    args = ["--init", config_dir(tmp_path, "qwen3", QWEN3_8B), "--gpus", "8", "--gpu-memory", "80",
            "--rope", "yarn", "--rope-factor", "4", "--seq-len", "131072"]
    r = dry_run(*args)
    assert r.returncode == 2 and "8.19B parameters, yarn s=4 over L=32768" in r.stdout, r.stdout + r.stderr
    fits_with(args, hinted(r.stderr))


def settings_of(flags):
    """The Plan fields a hint's flags set."""
    out, i = {}, 0
    while i < len(flags):
        flag = flags[i]
        if flag in ("--cp", "--seq-len", "--activation-checkpointing"):
            value = flags[i + 1]
            out[{"--cp": "cp", "--seq-len": "seq_len", "--activation-checkpointing": "mode"}[flag]] = \
                value if flag == "--activation-checkpointing" else int(value)
            i += 2
        else:
            out[{"--tile-mlp": "tile_mlp", "--offload-checkpoints": "offload", "--cpu-offload": "cpu_offload"}[flag]] = True
            i += 1
    return out


@pytest.mark.parametrize("seq_len, gpus, memory", [(131072, 8, 80), (1048576, 8, 80), (131072, 1, 80), (262144, 1, 80),
                                                   (65536, 8, 20), (4194304, 8, 80)])
def test_a_hint_fits_and_has_no_switch_to_spare(seq_len, gpus, memory):
    """Whatever a refusal names fits, and without any one of its switches (or with half its --cp) it would
    not: the fewest switches, not merely some that fit."""
    cfg = LlamaConfig.from_hf(LLAMA_31_8B)
    plan = Plan(cfg, seq_len, "selective", 8, 10, micro_batch=1, gpus=gpus, memory=memory * GIB)
    assert not plan.fits
    hint = plan.hint()
    settings = settings_of(hint.split(" fits (")[0].split())
    assert replace(plan, **settings).fits, hint
    for key, value in settings.items():
        if key == "seq_len":
            continue
        fewer = {**settings, key: value // 2 if key == "cp" else getattr(plan, key)}
        if key != "cp" or value // 2 > plan.cp:
            assert not replace(plan, **fewer).fits, (hint, key)


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
