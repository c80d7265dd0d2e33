"""
The third hostile probe and a newcomer's findings (issue #27), one test per class of what broke, each
written to fail without its fix: a full disk that was a traceback (safetensors raises its own error
type), --resume that took a changed model shape, symlinks around --out, hostile JSON, datasets that
could not be used, absurd finite numbers, two outputs under one name, a finished run started over, and
a BOS the tokenizer itself never adds (against transformers' AutoTokenizer).

    python -m pytest tests/test_probe.py -q
"""

import errno
import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402
import train  # noqa: E402
from support import rundir  # noqa: E402
from tests.helpers import PPL, SCRATCH, TRAIN, digest, one_line_exit_2  # noqa: E402

CPU = ["--device", "cpu"]
NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"


def safetensors_full_disk(monkeypatch, fails):
    """safetensors.torch.save_file raising what safetensors raises on a full disk (its own SafetensorError,
    not an OSError) for the paths where fails(path) is true; the others are written."""
    import safetensors.torch
    from safetensors import SafetensorError
    real = safetensors.torch.save_file

    def save_file(tensors, path, *args, **kwargs):
        if fails(str(path)):
            raise SafetensorError(NO_SPACE)
        return real(tensors, path, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


# ---- 1. a full disk: one line that says what was saved and where the last good checkpoint is ---------------

def test_a_full_disk_at_a_checkpoint_names_the_last_good_one(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    safetensors_full_disk(monkeypatch, lambda p: ".step-000002" in p)
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--steps", "3", "--save-every", "1", *CPU), capsys,
                          after_progress=True)
    good = out / "checkpoints" / "step-000001"
    assert "No space left on device" in err and str(good) in err and "--resume" in err, err
    assert [p for p in rundir.checkpoints(str(out))] == [str(good)]
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".")]  # no half-written staging left
    monkeypatch.undo()  # space freed: the last good checkpoint is whole, and the run continues from it
    train.main(TRAIN(env, tmp_path, "--steps", "3", "--save-every", "1", "--resume", *CPU))
    assert (out / "config.json").exists()


def test_a_full_disk_at_the_export_names_the_last_good_checkpoint(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    safetensors_full_disk(monkeypatch, lambda p: rundir.EXPORT in p)
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--steps", "2", "--save-every", "2", *CPU), capsys,
                          after_progress=True)
    assert "cannot export" in err and "No space left on device" in err and "step-000002" in err, err
    assert not (out / "config.json").exists() and not (out / rundir.EXPORT).exists()
    monkeypatch.undo()
    train.main(TRAIN(env, tmp_path, "--steps", "2", "--save-every", "2", "--resume", *CPU))
    assert (out / "config.json").exists()


def test_a_full_disk_anywhere_in_the_run_is_one_line_naming_the_checkpoint(env, tmp_path, capsys, monkeypatch):
    from support import progress
    write = progress.Progress.write

    def full_after_two(self, log):
        if log["step"] >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "metrics.jsonl"))
        write(self, log)
    monkeypatch.setattr(progress.Progress, "write", full_after_two)
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--steps", "3", "--save-every", "1", *CPU), capsys,
                          after_progress=True)
    assert "metrics.jsonl: No space left on device" in err and "step-000001" in err, err


def test_a_full_disk_under_report_out_names_the_file(env, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run.json"
    ev.main(PPL(env, "--json", str(run), *CPU))
    capsys.readouterr()
    from support import publish

    def full(fd):  # what write()/flush() raise on a full disk: an OSError that names no file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(publish.os, "fsync", full)
    err = one_line_exit_2("eval", ["report", str(run), "--out", str(tmp_path / "t.md")], capsys, after_progress=True)
    assert f"cannot write {tmp_path / 't.md'}: No space left on device" in err, err
    assert not (tmp_path / "t.md").exists()


# ---- 2. --resume: every flag that shapes the model or its RoPE is the run's -----------------------------------

RESHAPED = {  # flag: (the run's value, the resumed one); --n-head and --rope-theta keep every weight's shape
    "--n-head": ("2", "1"),
    "--rope-theta": ("10000", "500000"),
    "--n-kv-head": ("2", "1"),
    "--intermediate-size": ("96", "128"),
    "--n-layer": ("1", "2"),
}


@pytest.mark.parametrize("flag", list(RESHAPED))
def test_resume_refuses_another_model_shape(env, tmp_path, capsys, flag):
    before, after = RESHAPED[flag]
    args = SCRATCH(env, tmp_path, "--save-every", "1", *CPU)
    args = [a for i, a in enumerate(args) if a != flag and (i == 0 or args[i - 1] != flag)]  # SCRATCH's own value out
    train.main(args + [flag, before])
    out = tmp_path / "out"
    kept = digest(out / "checkpoints")
    capsys.readouterr()
    err = one_line_exit_2("train", args + [flag, after, "--steps", "2", "--resume"], capsys)
    assert f"--resume: {flag} was {float(before) if flag == '--rope-theta' else before}" in err, err
    assert f"now {float(after) if flag == '--rope-theta' else after}" in err, err
    assert digest(out / "checkpoints") == kept and json.loads((out / "config.json").read_text())[
        "num_attention_heads"] == (2 if flag != "--n-head" else int(before))


# ---- 10. a finished run is the user's result: the same command again is refused, unless --overwrite ------------

def test_rerunning_a_finished_run_is_refused_unless_overwrite(env, tmp_path, capsys):
    out = tmp_path / "out"
    args = TRAIN(env, tmp_path, "--save-every", "0", *CPU)
    train.main(args)
    before = digest(out)
    capsys.readouterr()
    err = one_line_exit_2("train", args, capsys)
    assert "finished run" in err and "--overwrite" in err and digest(out) == before, err
    train.main(args + ["--overwrite", "--steps", "2"])
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # started over: the new run's steps only
