"""
Tests of train.py on CPU: YaRN fine-tuning with FSDP2 under torchrun (gloo) against a single process,
an exact resume after SIGKILL, the output checkpoint in model.py and transformers, and a one-line
error with exit code 2 for each bad input. Tiny model, tiny corpus: about half a minute.

    python -m pytest tests/test_train.py -q
"""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from model import Llama  # noqa: E402
from tests.helpers import FINETUNE, losses, run_train, tiny_checkpoint  # noqa: E402

L = 64  # the tiny checkpoint's original context; --yarn-scale 2 trains at s*L = 128


@pytest.fixture(scope="module")
def fsdp_out(work):
    """Two processes, FSDP2 over gloo, full activation checkpointing, a checkpoint every 3 steps."""
    out = work / "fsdp"
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE,
                   "--save-every", "3", "--activation-checkpointing", "full"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_fsdp_yarn_finetune_learns_and_loads(work, fsdp_out):
    curve = losses(fsdp_out)
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.3, curve
    with open(fsdp_out / "config.json") as f:
        cfg = json.load(f)
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": L}
    assert cfg["max_position_embeddings"] == 2 * L
    assert (fsdp_out / "tokenizer.model").read_bytes() == (work / "data" / "tokenizer.model").read_bytes()
    model = Llama.from_pretrained(fsdp_out)
    assert model.config.rope.method == "yarn" and model.config.context_length == 2 * L
    before = load_file(work / "ckpt" / "model.safetensors")
    after = load_file(fsdp_out / "model.safetensors")
    assert after.keys() == before.keys() and not torch.equal(after["lm_head.weight"], before["lm_head.weight"])

    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(fsdp_out, dtype=torch.float32).eval()
    idx = torch.randint(0, 320, (2, 2 * L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_one_and_two_processes_agree(work, fsdp_out):
    # one plain process (no FSDP), and no activation checkpointing: neither may change the numbers
    out = work / "single"
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE,
                   "--save-every", "0", "--activation-checkpointing", "none"])
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(fsdp_out)), atol=1e-5, rtol=1e-5)
    one, two = load_file(out / "model.safetensors"), load_file(fsdp_out / "model.safetensors")
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-5, rtol=1e-4)


def test_fsdp_in_one_process_and_selective_checkpointing_agree(work, fsdp_out):
    # torchrun with one process takes the FSDP2 path (a mesh of one), as a single GPU does; with
    # selective checkpointing: the same losses as two processes with full checkpointing
    out = work / "fsdp1"
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE,
                   "--save-every", "0", "--activation-checkpointing", "selective"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(fsdp_out)), atol=1e-5, rtol=1e-5)
    with open(out / "metrics.jsonl") as f:
        logs = [json.loads(line) for line in f]
    assert "first_step_s" in logs[0] and all("first_step_s" not in l for l in logs[1:])
    assert "tokens/s over the last 5 steps" in r.stderr


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compiled_fsdp_training_equals_eager(work, fsdp_out, mode):
    # --compile with FSDP2 (one process) and checkpointing: the losses of the eager runs
    out = work / f"compiled-{mode}"
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE,
                   "--save-every", "0", "--activation-checkpointing", mode, "--compile"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(fsdp_out)), atol=1e-5, rtol=1e-5)


def test_resume_after_sigkill_is_exact(work, fsdp_out):
    out = work / "killed"
    args = ["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE,
            "--save-every", "3", "--activation-checkpointing", "full"]
    r = run_train(args, nproc=2, crash_after_step=3)  # rank 0 dies right after saving step 3
    assert r.returncode != 0
    assert os.listdir(out / "checkpoints") == ["step-000003"] and not (out / "config.json").exists()
    # a crash in the middle of the next save left a partial temporary directory: it must be ignored
    os.makedirs(out / "checkpoints" / ".step-000006.tmp")
    (out / "checkpoints" / ".step-000006.tmp" / "__0_0.distcp").write_bytes(b"partial")

    r = run_train(args + ["--resume"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at step 3" in r.stderr
    assert losses(out) == losses(fsdp_out)  # steps 1-3 kept from the first run, 4-6 recomputed
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(fsdp_out / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert os.listdir(out / "checkpoints") == ["step-000006"]


def test_resume_on_another_world_size(work, fsdp_out):
    """A checkpoint written by 2 processes (each its own shards) resumed by 1: each tensor is put back
    together from the shards, so the run ends where the 2-process one did (up to float summation order)."""
    out = work / "reshard"
    args = ["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE,
            "--save-every", "3", "--activation-checkpointing", "full"]
    r = run_train(args, nproc=2, crash_after_step=3)
    assert r.returncode != 0 and sorted(os.listdir(out / "checkpoints" / "step-000003")) == [
        "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors", "train_state.json"]
    r = run_train(args + ["--resume"])
    assert r.returncode == 0 and "resuming at step 3" in r.stderr, r.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(fsdp_out)), atol=1e-5, rtol=1e-5)
    one, two = load_file(out / "model.safetensors"), load_file(fsdp_out / "model.safetensors")
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-5, rtol=1e-4)


def test_pretrain_from_scratch(work):
    out = work / "scratch"
    train.main(["--init", "scratch", "--data", str(work / "data"), "--out", str(out), "--seq-len", "64", "--device", "cpu",
                "--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--n-kv-head", "2", "--steps", "8",
                "--batch-size", "4", "--warmup", "2", "--save-every", "0", "--eval-every", "4"])
    curve = losses(out)
    assert curve[-1] < curve[0] - 0.3, curve
    with open(out / "metrics.jsonl") as f:
        logs = [json.loads(line) for line in f]
    assert "val_loss" in logs[3] and "val_loss" in logs[-1] and logs[0]["lr"] == pytest.approx(5e-4)  # 1e-3 default
    model = Llama.from_pretrained(out)
    assert model.config.vocab_size == 320 and model.config.num_key_value_heads == 2
    assert model.config.rope.method == "none" and model.config.rope.original_max_position_embeddings == 64
    assert (out / "tokenizer.model").exists()


# ---- bad input: one line on stderr, exit code 2 ---------------------------------------------------------

@pytest.fixture(scope="module")
def bad(work):
    d = work / "bad"
    os.makedirs(d / "corrupt-config")
    (d / "corrupt-config" / "config.json").write_text("{not json")
    shutil.copytree(work / "ckpt", d / "corrupt-weights")
    data = (work / "ckpt" / "model.safetensors").read_bytes()
    (d / "corrupt-weights" / "model.safetensors").write_bytes(data[:len(data) // 2])
    tiny_checkpoint(d / "small-vocab", 256)  # the data has ids up to 319
    return d


BAD_INPUTS = {  # case: (flags over a good command, environment, what the message says)
    "missing init": (["--init", "{work}/nope"], {}, "checkpoint directory not found"),
    "corrupt config": (["--init", "{bad}/corrupt-config"], {}, "corrupt config.json"),
    "corrupt weights": (["--init", "{bad}/corrupt-weights"], {}, "cannot read"),
    "missing data": (["--data", "{work}/nope"], {}, "meta.json not found"),
    "data shorter than a sequence": (["--seq-len", "65536"], {}, "fewer than one sequence"),
    "vocab mismatch": (["--init", "{bad}/small-vocab"], {}, "vocab mismatch"),
    "seq-len not a multiple": (["--seq-len", "100"], {}, "multiple of 64"),
    "yarn scale below 1": (["--yarn-scale", "0.5"], {}, "--yarn-scale must be a finite number >= 1"),
    "batch vs micro-batch": (["--batch-size", "6", "--micro-batch", "4"], {}, "not divisible"),
    # as torchrun would set it: the check comes before any process group is made
    "batch vs world size": (["--batch-size", "3"], {"WORLD_SIZE": "2"}, "world size 2"),
    "rope without factor": (["--rope", "linear"], {}, "needs --rope-factor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(work, bad, case, capsys, monkeypatch):
    extra, env, message = BAD_INPUTS[case]
    args = {"--init": str(work / "ckpt"), "--data": str(work / "data"), "--out": str(work / "bad-out"),
            "--steps": "1", "--batch-size": "2", "--device": "cpu"}
    args.update({flag: value.format(work=work, bad=bad) for flag, value in zip(extra[::2], extra[1::2])})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as e:
        train.main([x for kv in args.items() for x in kv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_bad_input_from_the_command_line(work):
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--seq-len", "100"])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "multiple of 64" in r.stderr


def test_refuses_to_overwrite_checkpoints_without_resume(work, fsdp_out, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--init", str(work / "ckpt"), "--data", str(work / "data"), "--out", str(fsdp_out),
                    "--device", "cpu", *FINETUNE])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
