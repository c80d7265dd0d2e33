"""
Hostile files and the user's data (issue #10, security and data loss): nothing in a checkpoint is
unpickled or read from outside it, nothing of the user's is deleted or overwritten, one run per --out,
and an export killed halfway is finished by the next run. One process, tiny model: about 20 s.

    python -m pytest tests/test_safety.py -q
"""

import fcntl
import json
import os
import pickle
import shutil

import pytest
import torch

from support import publish
import train
from model import Llama
from support.checkpoint import CheckpointError
from tests.helpers import FINETUNE, losses, tiny_checkpoint  # noqa: E402


def run(args, capsys):
    """train.main in this process, on CPU; returns (exit code, stderr)."""
    try:
        train.main(["--device", "cpu"] + [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def good(work, out, *extra):
    return ["--init", work / "ckpt", "--data", work / "data", "--out", out, *FINETUNE, *extra]


class Bomb:
    """Unpickling this creates the file `path`: proof that something unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_unpickles_nothing(work, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(good(work, out, "--save-every", "3", "--steps", "3"), capsys)
    assert code == 0, err
    step3 = out / "checkpoints" / "step-000003"
    marker = tmp_path / "pwned"
    for name in (".metadata", "__0_0.distcp", "train_state.pt", "optim.pt"):  # what a pickle reader would open
        (step3 / name).write_bytes(pickle.dumps(Bomb(str(marker))))
    code, err = run(good(work, out, "--save-every", "3", "--steps", "6", "--resume"), capsys)
    assert code == 0, err
    assert "resuming at step 3" in err and not marker.exists()
    assert len(losses(out)) == 6
    # no checkpoint file is a pickle: safetensors and JSON only
    final = out / "checkpoints" / "step-000006"
    assert sorted(os.listdir(final)) == ["rank-00000-of-00001.safetensors", "train_state.json"]


def test_resume_rejects_a_damaged_or_foreign_checkpoint(work, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(good(work, out, "--save-every", "3", "--steps", "3"), capsys)[0] == 0
    step3 = out / "checkpoints" / "step-000003"
    shard = step3 / "rank-00000-of-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, err = run(good(work, out, "--save-every", "3", "--steps", "6", "--resume"), capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot read the checkpoint" in err, err
    shard.write_bytes(data)
    (step3 / "train_state.json").write_text("{not json")
    code, err = run(good(work, out, "--save-every", "3", "--steps", "6", "--resume"), capsys)
    assert code == 2 and err.count("\n") == 1 and "train_state.json" in err, err


def test_save_pretrained_replaces_only_a_checkpoint(tmp_path):
    m = Llama.from_pretrained(tiny_checkpoint(tmp_path / "ckpt", 64))
    user = tmp_path / "notes"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="thesis.tex"):
        m.save_pretrained(user)
    assert (user / "thesis.tex").read_text() == "years of work" and os.listdir(user) == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        m.save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    # a checkpoint is replaced by a complete one, with nothing left beside it
    m.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_save_pretrained_without_atomic_exchange(tmp_path, monkeypatch):
    """Where renameat2 is missing the old checkpoint is moved aside, then the new one in."""
    m = Llama.from_pretrained(tiny_checkpoint(tmp_path / "ckpt", 64))
    monkeypatch.setattr(publish, "exchange_dirs", lambda a, b: False)
    with torch.no_grad():
        m.lm_head.weight.zero_()
    m.save_pretrained(tmp_path / "ckpt")
    assert Llama.from_pretrained(tmp_path / "ckpt").lm_head.weight.abs().sum() == 0
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_atomic_exchange_is_used_here(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not publish.exchange_dirs(str(a), str(b)):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/passwd", "sub/model.safetensors",
                                   "..", "model.bin"])
def test_index_cannot_point_outside_the_checkpoint(tmp_path, shard):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", 64)
    os.makedirs(tmp_path / "other")
    shutil.copy(ckpt / "model.safetensors", tmp_path / "other" / "model.safetensors")
    os.remove(ckpt / "model.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(CheckpointError, match="not a .safetensors file name of this directory"):
        Llama.from_pretrained(ckpt)


def test_out_with_files_of_the_user_is_refused(work, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model_card.json").write_text("{}")
    (out / "tokenizer.model").write_text("my own")
    code, err = run(good(work, out), capsys)
    assert code == 2 and err.count("\n") == 1 and "not empty" in err, err
    assert sorted(os.listdir(out)) == ["model_card.json", "tokenizer.model"]
    assert (out / "tokenizer.model").read_text() == "my own"
    (tmp_path / "afile").write_text("x")
    code, err = run(good(work, tmp_path / "afile"), capsys)
    assert code == 2 and "is a file" in err and (tmp_path / "afile").read_text() == "x"


def test_out_of_an_earlier_run_keeps_the_users_extra_files(work, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(good(work, out, "--save-every", "0", "--steps", "2"), capsys)[0] == 0
    (out / "model_card.json").write_text("{}")  # named like our files, but not ours
    (out / "notes.txt").write_text("keep")
    assert run(good(work, out, "--save-every", "0", "--steps", "2", "--overwrite"), capsys)[0] == 0
    assert (out / "model_card.json").exists() and (out / "notes.txt").read_text() == "keep"
    Llama.from_pretrained(out)


def test_out_may_not_be_init(work, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(work / "ckpt", ckpt)
    (ckpt / "metrics.jsonl").write_text("")
    code, err = run(["--init", ckpt, "--data", work / "data", "--out", ckpt, *FINETUNE], capsys)
    assert code == 2 and "must not be the --init" in err, err


def test_symlinked_side_file_out_of_the_checkpoint_is_refused(work, tmp_path, capsys):
    secret = tmp_path / "secret"
    secret.write_text("private key")
    os.chmod(secret, 0o600)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(work / "ckpt", ckpt)
    os.symlink(secret, ckpt / "tokenizer_config.json")
    out = tmp_path / "out"
    code, err = run(["--init", ckpt, "--data", work / "data", "--out", out, *FINETUNE], capsys)
    assert code == 2 and err.count("\n") == 1 and "symbolic link" in err, err
    assert not (out / "tokenizer_config.json").exists()


def test_hub_cache_symlinks_are_followed(work, tmp_path, capsys):
    """The Hugging Face hub cache: snapshots/REV/file -> ../../blobs/HASH, all inside the repository."""
    repo = tmp_path / "models--me--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for name in os.listdir(work / "ckpt"):
        shutil.copy(work / "ckpt" / name, blobs / ("h-" + name))
        os.symlink(os.path.join("..", "..", "blobs", "h-" + name), snap / name)
    out = tmp_path / "out"
    code, err = run(["--init", snap, "--data", work / "data", "--out", out, *FINETUNE, "--steps", "1",
                     "--save-every", "0"], capsys)
    assert code == 0, err
    assert (out / "tokenizer.model").read_bytes() == (work / "ckpt" / "tokenizer.model").read_bytes()


def test_one_run_per_out(work, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another train.py holds --out
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run(good(work, out), capsys)
    assert code == 2 and err.count("\n") == 1 and "another train.py is running" in err, err
    assert not (out / "metrics.jsonl").exists()
    assert run(good(work, out, "--steps", "1", "--save-every", "0"), capsys)[0] == 0  # the lock went with it


def test_an_export_killed_halfway_is_finished_by_the_next_run(work, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(good(work, out, "--save-every", "2", "--steps", "2"), capsys)[0] == 0
    expected = {n: (out / n).read_bytes() for n in ("config.json", "model.safetensors", "tokenizer.model")}
    # the state publish_export leaves when killed after moving the weights: no config.json in out
    os.makedirs(out / ".export")
    os.rename(out / "config.json", out / ".export" / "config.json")
    shutil.copy(out / "tokenizer.model", out / ".export" / "tokenizer.model")
    with pytest.raises(CheckpointError):
        Llama.from_pretrained(out)
    code, err = run(good(work, out, "--save-every", "2", "--steps", "2", "--resume"), capsys)
    assert code == 0 and "finished publishing" in err, err
    assert {n: (out / n).read_bytes() for n in expected} == expected
    assert not (out / ".export").exists()
