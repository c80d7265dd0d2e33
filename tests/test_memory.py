"""
Tests of support/memory.py and train.py's memory switches on CPU: the tiled MLP and the checkpoints kept in
host memory give the losses and gradients of the plain model (the reference: the same model without the
switch), in the model and through train.py on 1 and 2 processes; a resume may change a switch; --cpu-offload
on a CPU is a note and changes nothing; bad combinations are one line and exit code 2.

    python -m pytest tests/test_memory.py -q
"""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as model_mod  # noqa: E402
import train  # noqa: E402
from support import memory  # noqa: E402
from tests.helpers import FINETUNE, losses, run_train, tiny_model  # noqa: E402


def loss_and_grads(mode, tile_mlp=False, offload=False, dtype=torch.float32, T=200, B=2):
    """One forward and backward of the tiny model (width 64: tiles of 64 positions) on fixed tokens."""
    m = tiny_model().train().to(dtype)
    m.set_activation_checkpointing(mode, tile_mlp=tile_mlp, offload=offload)
    idx = torch.randint(0, 320, (B, T + 1), generator=torch.Generator().manual_seed(1))
    loss = m(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.fixture
def moved(monkeypatch):
    """The tensors the offload hooks copied to the host, as (the device tensor, its Offloaded)."""
    seen = []

    def spy(positions, t):
        packed = to_host(positions, t)
        if isinstance(packed, memory.Offloaded):
            seen.append((t, packed))
        return packed

    to_host = memory.to_host
    monkeypatch.setattr(memory, "to_host", spy)
    return seen


# ---- the tiled MLP ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", model_mod.CHECKPOINTING)
def test_tiled_mlp_gives_the_plain_mlps_loss_and_gradients(mode, monkeypatch):
    """Forward bitwise (each position's MLP is the same computation); gradients within fp32 rounding: the
    weights' are sums over 4 tiles (200 positions, tiles of 64) instead of one sum in one matmul."""
    calls = []
    monkeypatch.setattr(memory.TiledMLP, "apply", lambda *a, apply=memory.TiledMLP.apply: calls.append(1) or apply(*a))
    loss, grads = loss_and_grads(mode, tile_mlp=True)
    ref_loss, ref_grads = loss_and_grads("none")
    assert len(calls) == 2 * (1 + (mode != "none"))  # 2 layers; a checkpoint runs the block again
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7)


def test_tiled_mlp_in_bf16_and_without_gradients():
    loss, grads = loss_and_grads("full", tile_mlp=True, dtype=torch.bfloat16)
    ref_loss, ref_grads = loss_and_grads("full", dtype=torch.bfloat16)
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:  # bf16 gradients, each tile's summed in fp32: within bf16 rounding of the plain ones
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), rtol=2e-2, atol=2e-4)
    m = tiny_model()  # no gradients recorded: the plain MLP, bitwise
    m.set_activation_checkpointing("none", tile_mlp=True)
    idx = torch.randint(0, 320, (1, 300))
    with torch.no_grad():
        tiled = m(idx)
    m.set_activation_checkpointing("none")
    assert torch.equal(tiled, m(idx).detach())


# ---- checkpoints in host memory -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_checkpoints_are_bitwise_full_checkpointing(dtype, moved):
    loss, grads = loss_and_grads("full", offload=True, dtype=dtype)
    ref_loss, ref_grads = loss_and_grads("full", dtype=dtype)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    # what went to the host: each block's input (B, T, C), one per layer, nothing else (no weight, no RoPE table)
    assert [tuple(t.shape) for t, _ in moved] == [(2, 200, 64)] * 2
    assert all(p.host.device.type == "cpu" and torch.equal(p.host, t) for t, p in moved)
    # each links to the one moved out before it: the next to come back in backward, copied in ahead on CUDA
    assert moved[1][1].before() is moved[0][1]


def test_offload_only_under_full_checkpointing(moved):
    # under none and selective the block saves much more than its input: offload is for full only
    for mode in ("none", "selective"):
        m = tiny_model().train()
        m.set_activation_checkpointing(mode, offload=True)
        assert not m.offload
        m(torch.randint(0, 320, (1, 65)), torch.randint(0, 320, (1, 65))).backward()
    assert moved == []


# ---- through train.py: the switches change no number -----------------------------------------------------

def finetune(work, name, *extra, nproc=None):
    out = work / name
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE, "--save-every", "3",
                   "--activation-checkpointing", "full", *extra], nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def same_run(a, b, exact):
    """Two runs' losses and exported weights: equal, or (exact False) within fp32 rounding."""
    one, two = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert one.keys() == two.keys()
    if exact:
        assert losses(a) == losses(b)
        assert all(torch.equal(one[k], two[k]) for k in one)
    else:
        torch.testing.assert_close(torch.tensor(losses(a)), torch.tensor(losses(b)), atol=1e-5, rtol=1e-5)
        for k in one:
            torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("nproc", [None, 2])
def test_switches_change_no_number_in_training(work, nproc):
    """One plain process, and two under torchrun (FSDP2 on gloo): offloaded checkpoints bitwise equal to
    full checkpointing; the tiled MLP within fp32 rounding; on a CPU --cpu-offload is a note and no change."""
    tag = "two" if nproc else "one"
    base, _ = finetune(work, f"base-{tag}", nproc=nproc)
    offloaded, r = finetune(work, f"offload-{tag}", "--offload-checkpoints", "--cpu-offload", nproc=nproc)
    assert "note: --cpu-offload is for GPUs" in r.stdout and "--offload-checkpoints" in r.stdout  # the plan says so
    same_run(offloaded, base, exact=True)
    tiled, _ = finetune(work, f"tiled-{tag}", "--tile-mlp", nproc=nproc)
    same_run(tiled, base, exact=False)


def test_resume_with_a_switch_changed(work):
    """Steps 1-3 without offload, killed, resumed with --offload-checkpoints: the run of never-stopped full
    checkpointing, bitwise (the switch moves memory, not numbers)."""
    base = work / "base-one"
    if not base.exists():
        base, _ = finetune(work, "base-one")
    out = work / "resumed-offload"
    args = ["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE, "--save-every", "3",
            "--activation-checkpointing", "full"]
    r = run_train(args, crash_after_step=3)
    assert r.returncode != 0 and os.listdir(out / "checkpoints") == ["step-000003"]
    r = run_train(args + ["--resume", "--offload-checkpoints"])
    assert r.returncode == 0 and "resuming at step 3" in r.stderr, r.stderr[-3000:]
    same_run(out, base, exact=True)


@pytest.mark.parametrize("extra, message", [
    (["--offload-checkpoints", "--activation-checkpointing", "selective"], "needs --activation-checkpointing full"),
    (["--host-memory", "512"], "give them with --dry-run"),
    (["--dry-run", "--host-memory", "0"], "--host-memory must be a finite number > 0"),
])
def test_bad_switches_are_one_line_and_exit_2(work, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--init", str(work / "ckpt"), "--data", str(work / "data"), "--out", str(work / "bad"),
                    "--device", "cpu", "--steps", "1", "--batch-size", "1", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
