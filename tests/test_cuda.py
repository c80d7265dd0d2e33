"""
The GPU path, on a CUDA machine (every test is skipped without one): flash attention is what trains and
prefills (only the flash kernel is allowed, so a silent fallback fails), bf16 logits are close to fp32,
one train.py step in one process (FSDP2 over a mesh of one, bf16), a 131072-token KV cache, and the
compiled decode step (one CUDA graph per token) writing the tokens of the eager path.

    python -m pytest tests/test_cuda.py -q          # bench/gpu.sh runs it, with the GPU benchmarks
"""

import json
import math
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import CHECKPOINTING, Llama, LlamaConfig
from rope import RopeConfig
from tests.helpers import FINETUNE, OpCounter, run_train  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FLASH = "_scaled_dot_product_flash_attention"


def gpu_model(dtype=torch.bfloat16, kv=2, layers=2, seed=0):
    """A small Llama with YaRN s=32 over L=4096 (the paper's 128k), head dim 64, grouped-query attention."""
    torch.manual_seed(seed)
    rope = RopeConfig(method="yarn", factor=32.0, head_dim=64, original_max_position_embeddings=4096)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv, rope=rope)
    with torch.device("cuda"):
        m = Llama(cfg)
    m.init_weights(std=0.05)
    return m.to(dtype).eval()


def test_flash_attention_trains_in_every_checkpointing_mode():
    m = gpu_model().train()
    idx = torch.randint(0, 512, (1, 4097), device="cuda")
    results = {}
    for mode in CHECKPOINTING:
        m.set_activation_checkpointing(mode)
        m.zero_grad()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), OpCounter() as ops:
            loss = m(idx[:, :-1], idx[:, 1:])
            loss.backward()
        results[mode] = (loss.item(), [p.grad.float() for p in m.parameters()], ops.counts.get(FLASH, 0))
    assert results["none"][2] == results["selective"][2] == 2 and results["full"][2] == 4
    for mode in ("full", "selective"):
        assert results[mode][0] == pytest.approx(results["none"][0], abs=1e-3)
        for a, b in zip(results[mode][1], results["none"][1]):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_flash_attention_prefills_in_chunks_with_grouped_query_attention():
    """Chunks after the first attend with a bottom-right causal mask: flash must take it (no fallback)."""
    m = gpu_model()
    idx = torch.randint(0, 512, (1, 3000), device="cuda")
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        whole = m(idx)[:, -1:]
        m.setup_cache(1, 4096)
        chunked = m.prefill(idx, chunk_size=1024)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0.05 * whole.abs().max().item())


def test_bf16_logits_close_to_fp32():
    fp32, bf16 = gpu_model(torch.float32), gpu_model(torch.bfloat16)
    idx = torch.randint(0, 512, (2, 1024), device="cuda")
    with torch.no_grad():
        a = fp32(idx)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            b = bf16(idx)
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_one_process_bf16_train_step(work):  # noqa: F811
    """train.py on one GPU: the FSDP2 path of eight GPUs on a mesh of one, bf16, selective checkpointing."""
    out = work / "cuda"
    gpu = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}  # run_train hides it
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE, "--steps", "3",
                   "--save-every", "0", "--activation-checkpointing", "selective"], env=gpu)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        logs = [json.loads(line) for line in f]
    assert len(logs) == 3 and all(math.isfinite(l["loss"]) and l["peak_mem_gb"] > 0 for l in logs)
    assert "first_step_s" in logs[0] and "tokens/s over the last 2 steps" in r.stderr


def test_131072_token_cache_and_compiled_decode_equals_eager():
    """A cache of 128k positions, filled by a chunked flash prefill; then greedy decoding by the fixed-shape
    step, eager and compiled (mode reduce-overhead: a CUDA graph), gives the same tokens; its first logits
    are those of the growing-slice path."""
    m = gpu_model()
    T, n = 131072 - 16, 12
    prompt = torch.randint(0, 512, (1, T), device="cuda")
    m.setup_cache(1, 131072)
    assert m.cache_bytes() == 2 * 2 * 2 * 64 * 131072 * 2  # K and V x layers x kv heads x D x positions x bf16
    runs = []
    with torch.no_grad():
        for step in (m.decode_step, m.compile_decode()):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                logits = m.prefill(prompt)
            tokens = [logits.argmax(-1)]
            for i in range(n):
                logits = m.decode(tokens[-1], T + i, step)
                tokens.append(logits.argmax(-1).clone())
            runs.append(torch.cat(tokens, 1))
        first = m.decode(runs[0][:, :1], T, m.decode_step)
        growing = m(runs[0][:, :1], pos=T, last_only=True)
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(first, growing, rtol=0, atol=0.05 * growing.abs().max().item())


# ---- issue #26: the memory switches on the GPU --------------------------------------------------------

def test_offloaded_checkpoints_go_to_pinned_host_memory_and_change_nothing(monkeypatch):
    """Full checkpointing with each block's input in pinned host memory (copied out on a side stream): loss
    and gradients bitwise those of full checkpointing, and the GPU's peak lower by about the inputs kept."""
    from support import memory
    moved = []

    def spy(positions, t):
        packed = to_host(positions, t)
        if isinstance(packed, memory.Offloaded):
            moved.append(packed.host)
        return packed

    to_host = memory.to_host
    monkeypatch.setattr(memory, "to_host", spy)
    m = gpu_model(layers=8).train()
    idx = torch.randint(0, 512, (1, 32769), device="cuda")
    results = {}
    for offload in (False, True):
        m.set_activation_checkpointing("full", offload=offload)
        m.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = m(idx[:, :-1], idx[:, 1:])
        torch.cuda.synchronize()  # the copies out are done: the inputs' memory is free
        after_forward = torch.cuda.memory_allocated()
        loss.backward()
        results[offload] = (loss.detach(), [p.grad.clone() for p in m.parameters()], after_forward)
    assert len(moved) == 8 and all(h.device.type == "cpu" and h.is_pinned() for h in moved)
    assert torch.equal(results[True][0], results[False][0])
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1]))
    kept = 8 * 32768 * 256 * 2  # layers x T x C x bf16: what full checkpointing keeps, now on the host
    assert results[False][2] - results[True][2] >= 0.5 * kept, (results[False][2], results[True][2], kept)


def test_tiled_mlp_gradients_on_the_gpu():
    m = gpu_model().train()
    idx = torch.randint(0, 512, (1, 8193), device="cuda")
    grads = {}
    for tile in (False, True):
        m.set_activation_checkpointing("full", tile_mlp=tile)
        m.zero_grad(set_to_none=True)
        loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads[tile] = (loss.item(), [p.grad.float() for p in m.parameters()])
    assert grads[True][0] == pytest.approx(grads[False][0], abs=1e-3)
    for a, b in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_one_process_train_step_with_every_memory_switch(work):  # noqa: F811
    """train.py on one GPU with --tile-mlp --offload-checkpoints --cpu-offload (FSDP2's CPUOffloadPolicy:
    the shards and AdamW on the host): the losses of the run without them, to bf16 rounding."""
    gpu = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}  # run_train hides it
    runs = {}
    for name, extra in (("plain", []), ("switches", ["--tile-mlp", "--offload-checkpoints", "--cpu-offload"])):
        out = work / f"cuda-{name}"
        r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE, "--steps", "3",
                       "--save-every", "0", "--activation-checkpointing", "full", *extra], env=gpu)
        assert r.returncode == 0, r.stderr[-3000:]
        with open(out / "metrics.jsonl") as f:
            runs[name] = [json.loads(line)["loss"] for line in f]
    assert runs["switches"] == pytest.approx(runs["plain"], abs=2e-2)
