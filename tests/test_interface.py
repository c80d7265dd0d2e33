"""
One interface for every command (issue #22): the same flag means the same thing in train.py, sample.py
and eval.py (--dtype bf16|fp16|fp32 and the long spellings, --device auto|cuda|cpu, --rope METHOD
--rope-factor S and --yarn-scale S, --original-ctx L), and --help shows each default once, in groups.

    python -m pytest tests/test_interface.py -q
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402
import sample  # noqa: E402
from support.common import pick_dtype  # noqa: E402
from tests.helpers import PPL, SAMPLE  # noqa: E402


def help_of(*command):
    r = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("command", [["train.py"], ["sample.py"], ["eval.py", "ppl"], ["eval.py", "passkey"],
                                     ["data/prepare.py"]])
def test_help_shows_each_default_once(command):
    text = help_of(*command)
    flags = re.split(r"\n  (?=-)", text.split("options:", 1)[1])  # one chunk of help per flag
    for chunk in flags:  # "(default: X)" is added only where the help does not say its default itself
        assert "(default: None)" not in chunk and not ("(default: " in chunk and chunk.count("default") > 1), chunk
    assert "(default: " in text  # and the defaults are shown


def test_train_help_is_in_groups():
    text = help_of("train.py")
    for group in ("model and data:", "RoPE:", "optimisation", "engine:", "checkpoints and logging:", "the plan",
                  "--init scratch only"):
        assert group in text, group
    # the scratch-only flags come after every fine-tuning one
    assert text.index("--n-layer") > text.index("--mfu") > text.index("--lr ")


@pytest.mark.parametrize("short,long", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_dtype_spellings_are_one(short, long):
    from support.common import dtype_flag
    assert dtype_flag(short) == dtype_flag(long) == short
    assert pick_dtype(short, None) is pick_dtype(long, None)


def test_every_command_takes_the_same_flags(env, tmp_path, capsys):
    """--device auto, --dtype fp32/float32, and --yarn-scale S in sample.py, eval.py and train.py."""
    for dtype in ("fp32", "float32"):
        sample.main(SAMPLE(env.ckpt, "--device", "auto", "--dtype", dtype, "--yarn-scale", "2"))
        err = capsys.readouterr().err
        assert "yarn s=2 (L=64)" in err and "float32 on cpu" in err, err
        ev.main(PPL(env, "--device", "auto", "--dtype", dtype, "--yarn-scale", "2"))
        assert "yarn s=2 (L=64)" in capsys.readouterr().out
    # --yarn-scale S is --rope yarn --rope-factor S: the same table row
    ev.main(PPL(env, "--device", "cpu", "--rope", "yarn", "--rope-factor", "2"))
    assert "yarn s=2 (L=64)" in capsys.readouterr().out
    for command, argv in (("sample", SAMPLE(env.ckpt, "--yarn-scale", "2", "--rope", "linear")),
                          ("eval", PPL(env, "--yarn-scale", "2", "--rope", "ntk:4"))):
        with pytest.raises(SystemExit) as e:
            (sample.main if command == "sample" else ev.main)(argv)
        assert e.value.code == 2 and "--yarn-scale S means" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "train.py", "--init", env.ckpt, "--dry-run", "--yarn-scale", "2", "--device",
                        "auto", "--dtype", "float32"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0 and "yarn s=2 over L=64" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "train.py", "--init", env.ckpt, "--dry-run", "--dtype", "fp16"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "loss scaling" in r.stderr


def config_json_reads(monkeypatch):
    """The paths of every config.json this process opens from now on (tokenizer_config.json is another file)."""
    import builtins
    opened, real_open = [], builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)) == "config.json":
            opened.append(os.fspath(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", counting_open)
    return opened


def test_each_command_reads_config_json_once(env, tmp_path, capsys, monkeypatch):
    """The flags are resolved in one pass: config.json is read once and handed down (issue #25)."""
    import train
    opened = config_json_reads(monkeypatch)
    train.main(["--init", env.ckpt, "--yarn-scale", "2", "--dry-run", "--gpus", "1", "--gpu-memory", "80"])
    assert len(opened) == 1, opened
    opened.clear()
    sample.main(SAMPLE(env.ckpt, "--rope", "yarn", "--rope-factor", "2", "--device", "cpu"))
    assert len(opened) == 1, opened
    opened.clear()
    ev.main(PPL(env, "--rope", "yarn:2", "--device", "cpu"))
    assert len(opened) == 1, opened
