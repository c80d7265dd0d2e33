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
