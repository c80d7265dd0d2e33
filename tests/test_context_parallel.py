"""
Tests of context parallelism (context_parallel.py, train.py --cp) on CPU, gloo: the attention of one
rank's two chunks against one process's full causal attention (output and q, k, v gradients); training
with --cp 2 (2 processes) and --cp 2 x data-parallel 2 (4 processes) on a Llama under YaRN and a Qwen3
(q_norm, k_norm, head_dim 2C/H) under dynamic YaRN, against one plain process: every step's loss, the
validation loss and every exported weight; a resume under another --cp; the bad --cp lines.

Tolerance: fp32, atol = rtol = 1e-5 for losses, as for FSDP against one process (tests/test_train.py):
the same sums in another order (gathered chunks, a reduce-scatter, FSDP's averaging) differ by a few
ulps, ~1e-7 relative per operation, ~1e-6 after a few steps of AdamW.

    python -m pytest tests/test_context_parallel.py -q
"""

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import context_parallel  # noqa: E402
from tests.helpers import free_port, one_line_exit_2, run_train, tiny_checkpoint  # noqa: E402


# ---- the attention alone: N gloo processes against one full causal SDPA --------------------------------

def attention_worker(rank, n, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    try:
        torch.manual_seed(0)  # the same q, k, v, w on every rank
        B, H, KV, T, D = 2, 4, 2, 16 * n, 8
        q, k, v, w = torch.randn(B, H, T, D), torch.randn(B, KV, T, D), torch.randn(B, KV, T, D), torch.randn(B, H, T, D)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        y = F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True)
        (y * w).sum().backward()  # a random linear loss: each output has its own weight in the gradients
        # this rank's tokens, written out here: chunks r and 2N-1-r of 2N
        c = T // (2 * n)
        mine = torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * n - 1 - rank) * c, (2 * n - rank) * c)])
        cp = context_parallel.ContextParallel(dist.group.WORLD, rank, n, T)
        assert torch.equal(context_parallel.positions(cp, "cpu"), mine)
        part = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
        y_cp = context_parallel.attention(*part, cp)
        (y_cp * w[:, :, mine]).sum().backward()
        torch.testing.assert_close(y_cp, y[:, :, mine], atol=1e-6, rtol=1e-5)
        for name, a, b in zip("qkv", part, full):  # k, v: summed over the queries of every rank
            torch.testing.assert_close(a.grad, b.grad[:, :, mine], atol=1e-6, rtol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n", [2, 4])
def test_attention_equals_one_process(n):
    mp.spawn(attention_worker, args=(n, free_port()), nprocs=n)


# ---- training: --cp 2 and --cp 2 x data-parallel 2 against one plain process ----------------------------

CONFIGS = {  # the checkpoint's extra config, the RoPE flags
    # YaRN at s*L = 128: wrong positions (a rank's own 0..63) would change every loss
    "llama-yarn": ({}, ["--yarn-scale", "2"]),
    # Qwen3 under dynamic YaRN s=4 trained at 128 tokens: scaled for the whole T (s_l = 2), where scaling for
    # a rank's 64 tokens would be plain RoPE
    "qwen3-dynamic-yarn": (dict(model_type="qwen3", qk_norm=True, head_dim=32), ["--rope", "dynamic-yarn", "--rope-factor", "4"]),
}
RUN = ["--seq-len", "128", "--steps", "4", "--batch-size", "4", "--lr", "3e-3", "--warmup", "1", "--eval-every", "2",
       "--eval-blocks", "2"]
LAYOUTS = {  # processes, --activation-checkpointing: the recomputation repeats the all-gather in backward
    "cp2": (2, "full"),
    "cp2-dp2": (4, "selective"),
}
TOL = dict(atol=1e-5, rtol=1e-5)


def metrics(out):
    with open(out / "metrics.jsonl") as f:
        logs = [json.loads(line) for line in f]
    return torch.tensor([log["loss"] for log in logs]), torch.tensor([log["val_loss"] for log in logs if "val_loss" in log])


def assert_same_run(out, ref):
    """Every step's loss, the validation losses and every exported weight of `out` equal those of `ref`."""
    (loss, val), (ref_loss, ref_val) = metrics(out), metrics(ref)
    assert len(loss) == 4 and len(val) == 2
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(val, ref_val, **TOL)
    mine, theirs = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module", params=list(CONFIGS))
def single(work, request):
    """One plain process (no FSDP, no checkpointing) per config: the reference, made once per module."""
    config, rope = CONFIGS[request.param]
    ckpt = work / f"ckpt-{request.param}"
    if not ckpt.exists():
        tiny_checkpoint(ckpt, tokenizer=work / "data" / "tokenizer.model", **config)
    args = ["--init", ckpt, "--data", work / "data", *rope, *RUN, "--save-every", "0"]
    out = work / f"single-{request.param}"
    r = run_train(args + ["--out", out, "--activation-checkpointing", "none"])
    assert r.returncode == 0, r.stderr[-3000:]
    return args, out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_training_equals_one_process(single, layout):
    args, ref = single
    nproc, mode = LAYOUTS[layout]
    out = ref.parent / f"{ref.name}-{layout}"
    r = run_train(args + ["--out", out, "--cp", "2", "--activation-checkpointing", mode], nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{nproc} process(es) ({nproc // 2} data-parallel x --cp 2)" in r.stderr
    assert_same_run(out, ref)


@pytest.mark.parametrize("single", ["llama-yarn"], indirect=True)  # the same reference run as above
def test_resume_under_another_cp(work, single):
    """Killed after step 2 of a --cp 2 run on 2 processes, resumed as plain data parallelism on 2 (--cp 1):
    the shards depend on the world alone, the data order on the step, so it ends as one process does."""
    args, ref = single
    out = work / "resumed-cp"
    r = run_train(args + ["--out", out, "--cp", "2", "--save-every", "2"], nproc=2, crash_after_step=2)
    assert r.returncode != 0 and os.listdir(out / "checkpoints") == ["step-000002"]
    r = run_train(args + ["--out", out, "--cp", "1", "--save-every", "2", "--resume"], nproc=2)
    assert r.returncode == 0 and "resuming at step 2" in r.stderr, r.stderr[-3000:]
    assert_same_run(out, ref)


# ---- bad --cp: one line, exit code 2, before any process group ------------------------------------------

BAD_CP = {  # flags, WORLD_SIZE as torchrun would set it, what the line says
    "below 1": (["--cp", "0"], "1", "--cp must be >= 1, got 0"),
    "not dividing the world": (["--cp", "3"], "4", "--cp 3 does not divide the world size 4"),
    "sequence not in 2N chunks": (["--cp", "3", "--seq-len", "128"], "3", "does not cut into 2 x --cp = 6 equal chunks"),
    "batch vs data-parallel groups": (["--cp", "2", "--batch-size", "3"], "4", "world size 4 / --cp 2 x --micro-batch 1"),
}


@pytest.mark.parametrize("case", list(BAD_CP))
def test_bad_cp_is_one_line_and_exit_2(work, case, capsys, monkeypatch):
    flags, world, message = BAD_CP[case]
    monkeypatch.setenv("WORLD_SIZE", world)
    argv = ["--init", str(work / "ckpt"), "--data", str(work / "data"), "--out", str(work / "bad-cp"), "--yarn-scale",
            "2", "--steps", "1", "--batch-size", "4", "--device", "cpu", *flags]
    assert message in one_line_exit_2("train", argv, capsys)


def test_context_parallel_with_the_memory_switches_equals_one_process(work):
    """--cp 2 with --tile-mlp and --offload-checkpoints (2 processes) against one plain process: the switches
    act on each rank's part (256 tokens over 2 ranks: 128 each, two MLP tiles of C = 64 positions; the block
    inputs kept on the host hold the rank's positions), and the run is still the single process's."""
    ckpt = work / "ckpt-llama-yarn"
    if not ckpt.exists():
        tiny_checkpoint(ckpt, tokenizer=work / "data" / "tokenizer.model")
    args = ["--init", ckpt, "--data", work / "data", "--yarn-scale", "4", *RUN, "--save-every", "0"]
    args[args.index("--seq-len") + 1] = "256"
    ref, out = work / "single-256", work / "cp2-switches-256"
    r = run_train(args + ["--out", ref, "--activation-checkpointing", "none"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(args + ["--out", out, "--cp", "2", "--activation-checkpointing", "full", "--tile-mlp",
                          "--offload-checkpoints"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--tile-mlp" in r.stdout and "--offload-checkpoints" in r.stdout and "--cp 2" in r.stdout  # the plan names them
    assert_same_run(out, ref)
