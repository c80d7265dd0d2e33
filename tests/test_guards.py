"""
The second hostile probe (issue #21), one test per class of what broke, each written to fail without its
fix: writers that wrote wherever they were pointed, sweeps that caught the user's files, real checkpoints
the loader tripped on, shells (a closed pipe, a full disk), one-line errors that were tracebacks, and
runs that exited 0 with something wrong. Each asserts the exit code, the one line, and, for the writers,
that the user's files are byte-identical afterwards.

    python -m pytest tests/test_guards.py -q
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402
from support import rundir  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from data import prepare  # noqa: E402
from data.packed import PackedData  # noqa: E402
from model import Llama  # noqa: E402
from tests.helpers import PPL, SAMPLE, SCRATCH, TRAIN, ckpt_weights, digest, no_space, one_line_exit_2  # noqa: E402

CPU = ["--device", "cpu"]


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---- 1. every writer: a new file, a file of ours of the same kind, or one line; never an input -----------------

def test_prepare_refuses_to_write_into_a_checkpoint(env, tmp_path, capsys):
    ckpt = copy(env.ckpt, tmp_path / "ckpt")
    before = digest(ckpt)
    err = one_line_exit_2("prepare", ["--input", env.text, "--out", str(ckpt), "--tokenizer", env.ckpt], capsys)
    assert "not a dataset" in err and digest(ckpt) == before


def test_prepare_refuses_an_out_that_holds_its_inputs(env, tmp_path, capsys):
    corpus = copy(env.root / "corpus", tmp_path / "corpus")
    before = digest(corpus)
    err = one_line_exit_2("prepare", ["--input", str(corpus), "--out", str(corpus), "--tokenizer", env.ckpt], capsys)
    assert "input" in err and digest(corpus) == before


def test_an_interrupted_prepare_keeps_the_old_dataset(env, tmp_path, capsys, monkeypatch):
    data = copy(env.data, tmp_path / "data")
    before = digest(data)
    calls = []

    def interrupted(*args, **kwargs):  # Ctrl-C after the train split was written
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return write_split(*args, **kwargs)

    import data.packed as packed
    write_split = packed.write_split
    monkeypatch.setattr(packed, "write_split", interrupted)
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", env.text, "--out", str(data), "--tokenizer", env.ckpt])
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    assert digest(data) == before and len(PackedData(str(data), "train")) > 0  # the old one, whole
    monkeypatch.undo()
    prepare.main(["--input", env.text, "--out", str(data), "--tokenizer", env.ckpt])  # a dataset of ours: replaced
    assert digest(data) != before and PackedData(str(data), "train").documents()


def test_eval_json_never_replaces_a_file_that_is_not_a_result(env, tmp_path, capsys):
    ckpt = copy(env.ckpt, tmp_path / "ckpt")
    before = digest(ckpt)
    err = one_line_exit_2("eval", PPL(env, "--json", str(ckpt / "config.json"), model=str(ckpt), *CPU), capsys)
    assert "config.json" in err and digest(ckpt) == before
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    err = one_line_exit_2("eval", PPL(env, "--json", str(notes), *CPU), capsys)
    assert "not a result of eval.py" in err and notes.read_text() == '{"my": "notes"}'
    # a result of ours is replaced, the earlier run's
    out = tmp_path / "ppl.json"
    ev.main(PPL(env, "--json", str(out), *CPU))
    ev.main(PPL(env, "--json", str(out), "--label", "again", *CPU))
    assert json.loads(out.read_text())["results"][0]["method"].startswith("again")


def test_eval_refuses_a_picture_it_did_not_draw_before_evaluating(env, tmp_path, capsys):
    (tmp_path / "ppl.png").write_bytes(b"\x89PNG my holiday")
    err = one_line_exit_2("eval", PPL(env, "--json", str(tmp_path / "ppl.json"), *CPU), capsys)
    assert "ppl.png" in err and (tmp_path / "ppl.png").read_bytes() == b"\x89PNG my holiday"
    assert not (tmp_path / "ppl.json").exists()  # refused before the evaluation, not after


def test_report_never_writes_over_its_inputs_or_a_users_file(env, tmp_path, capsys):
    run = tmp_path / "run.json"
    ev.main(PPL(env, "--json", str(run), *CPU))
    capsys.readouterr()
    before = run.read_bytes()
    err = one_line_exit_2("eval", ["report", str(run), "--out", str(run)], capsys)
    assert "input" in err and run.read_bytes() == before
    (tmp_path / "thesis.md").write_text("# my thesis\n")
    err = one_line_exit_2("eval", ["report", str(run), "--out", str(tmp_path / "thesis.md")], capsys)
    assert (tmp_path / "thesis.md").read_text() == "# my thesis\n"


# ---- 2. our sweeps remove only what we wrote; --resume never discards a finished run ---------------------------

def test_a_checkpoint_copied_by_hand_survives_the_next_save(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(TRAIN(env, tmp_path, "--save-every", "1", *CPU)) is None
    shutil.copytree(rundir.checkpoints(str(out))[-1], out / "checkpoints" / "step-best")
    before = digest(out / "checkpoints" / "step-best")
    train.main(TRAIN(env, tmp_path, "--save-every", "1", "--steps", "2", "--resume", *CPU))
    assert digest(out / "checkpoints" / "step-best") == before
    assert [os.path.basename(p) for p in rundir.checkpoints(str(out))] == ["step-000002"]


def test_resume_never_restarts_a_finished_run(env, tmp_path, capsys):
    out = tmp_path / "out"
    train.main(TRAIN(env, tmp_path, "--save-every", "0", *CPU))
    before = digest(out)
    capsys.readouterr()
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--save-every", "0", "--resume", *CPU), capsys)
    assert "nothing to resume" in err and digest(out) == before
    # in a new or an empty directory --resume starts (a launcher's automatic restart)
    (tmp_path / "empty").mkdir()
    train.main(TRAIN(env, tmp_path, "--save-every", "0", "--resume", *CPU, out=str(tmp_path / "empty")))
    train.main(TRAIN(env, tmp_path, "--save-every", "0", "--resume", *CPU, out=str(tmp_path / "new")))
    assert (tmp_path / "empty" / "config.json").exists() and (tmp_path / "new" / "config.json").exists()


# ---- 3. real checkpoints -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float8", "int8"])
def test_an_unknown_torch_dtype_is_one_line_before_training(env, tmp_path, capsys, dtype):
    ckpt = copy(env.ckpt, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}))
    err = one_line_exit_2("train", TRAIN(env, tmp_path, *CPU, init=str(ckpt)), capsys)
    assert "torch_dtype" in err and not (tmp_path / "out").exists()


def test_the_exported_tokenizer_has_the_name_readers_look_for(env, tmp_path, capsys):
    shutil.copy(os.path.join(env.data, "tokenizer.model"), tmp_path / "my-spm.model")
    train.main(SCRATCH(env, tmp_path, "--tokenizer", str(tmp_path / "my-spm.model"), *CPU))
    out = tmp_path / "out"
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "my-spm.model").read_bytes()
    assert not (out / "my-spm.model").exists()
    sample.main(SAMPLE(str(out), *CPU))
    assert capsys.readouterr().out


def test_eval_scores_over_the_tokenizers_vocabulary_only(env, tmp_path, capsys):
    """A model padded past its tokenizer (Qwen2.5: 152,064 rows for 151,665 tokens): the padding rows are
    no tokens, so perplexity is over the tokenizer's vocabulary, as if the rows were not there."""
    padded = tmp_path / "padded"
    model = Llama.from_pretrained(env.ckpt)
    cfg = model.config
    big = Llama(type(cfg)(**{**cfg.__dict__, "vocab_size": cfg.vocab_size + 64}))
    with torch.no_grad():
        for name, p in big.named_parameters():
            src = model.state_dict()[name]
            p.zero_()
            p[:src.shape[0]] = src
        big.lm_head.weight[cfg.vocab_size:] = model.lm_head.weight[:64]  # as likely as real tokens: they would halve p
    big.save_pretrained(padded, extra_files=[os.path.join(env.ckpt, "tokenizer.model")])
    scores = []
    for ckpt in (env.ckpt, str(padded)):
        ev.main(PPL(env, "--json", str(tmp_path / "p.json"), *CPU, model=ckpt))
        scores.append(json.loads((tmp_path / "p.json").read_text())["results"][0]["ppl"]["8"]["ppl"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)


# ---- 4. shells ------------------------------------------------------------------------------------------------

def test_a_closed_pipe_ends_quietly(env):
    argv = SAMPLE(env.ckpt, "--max-new-tokens", "64", *CPU)
    cmd = f"{shlex.join([sys.executable, os.path.join(ROOT, 'sample.py'), *argv])} | head -c 3"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr
    assert r.returncode in (0, 141), r.stderr  # 141: the writer ended by the closed pipe, as any Unix tool


def test_a_full_disk_is_one_line(env, tmp_path, capsys, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *SAMPLE(env.ckpt, *CPU)], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    *notes, last = r.stderr.splitlines()  # sample.py's notes (the model, the cache), then the one line
    assert r.returncode == 2 and last.startswith("error: ") and "No space left" in last, r.stderr
    assert "Traceback" not in r.stderr and not any("error" in line for line in notes), r.stderr
    # eval's results on a full disk, after the evaluation: one line, and no half-written file
    from support import publish
    monkeypatch.setattr(publish.os, "replace", no_space)
    err = one_line_exit_2("eval", PPL(env, "--json", str(tmp_path / "p.json"), *CPU), capsys, after_progress=True)
    assert "cannot write" in err and "p.json" in err and "No space left" in err and not os.listdir(tmp_path)


# ---- 5. one line, not a traceback -----------------------------------------------------------------------------

def test_one_line_errors(env, tmp_path, capsys):
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--rope", "longrope", "--rope-factor", "4", *CPU), capsys)
    assert "longrope" in err
    for command, argv in (("train", TRAIN(env, tmp_path, "--seed", str(2**70), *CPU)),
                          ("sample", SAMPLE(env.ckpt, "--seed", str(2**70), *CPU))):
        assert "--seed" in one_line_exit_2(command, argv, capsys)
    err = one_line_exit_2("eval", PPL(env, "--plot", str(tmp_path / "p.xyz"), *CPU), capsys)
    assert "--plot" in err and "xyz" in err
    zeros = "/dev/zero"
    err = one_line_exit_2("sample", ["--model", env.ckpt, "--prompt-file", zeros, "--ctx", "64", *CPU], capsys)
    assert "--ctx" in err


def test_a_tiny_temperature_samples(env, capsys):
    sample.main(SAMPLE(env.ckpt, "--temperature", "1e-300", *CPU))
    greedy = capsys.readouterr().out
    sample.main(SAMPLE(env.ckpt, "--temperature", "0", *CPU))
    assert capsys.readouterr().out == greedy


def test_a_perplexity_past_floats_is_reported_not_a_traceback(env, tmp_path, capsys):
    ckpt = ckpt_weights(env, tmp_path, lambda w: {**w, "lm_head.weight": w["lm_head.weight"] * 1e4})
    ev.main(PPL(env, "--json", str(tmp_path / "p.json"), *CPU, model=ckpt))
    out = capsys.readouterr().out
    assert "inf" in out
    ev.main(["report", str(tmp_path / "p.json")])  # and the result reads back
    assert "inf" in capsys.readouterr().out


# ---- 6. exit 0, but wrong ---------------------------------------------------------------------------------------

def test_a_tensor_in_two_shards_is_refused(env, tmp_path, capsys):
    ckpt = copy(env.ckpt, tmp_path / "ckpt")
    w = load_file(ckpt / "model.safetensors")
    os.remove(ckpt / "model.safetensors")
    names = sorted(w)
    save_file({n: w[n] for n in names[:5]}, ckpt / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({n: w[n] * (2 if n == names[0] else 1) for n in names[5:] + names[:1]},
              ckpt / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f"model-0000{1 if i < 5 else 2}-of-00002.safetensors"
                                            for i, n in enumerate(names)}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    err = one_line_exit_2("sample", SAMPLE(str(ckpt), *CPU), capsys)
    assert names[0] in err and "model-00002-of-00002.safetensors" in err


def test_integer_weights_are_refused(env, tmp_path, capsys):
    ckpt = ckpt_weights(env, tmp_path, lambda w: {**w, "model.norm.weight": w["model.norm.weight"].to(torch.int32)})
    err = one_line_exit_2("sample", SAMPLE(ckpt, *CPU), capsys)
    assert "model.norm.weight" in err and "int32" in err


def test_report_tells_two_checkpoints_apart(env, tmp_path, capsys):
    other = copy(env.ckpt, tmp_path / "other")
    for name, ckpt in (("a.json", env.ckpt), ("b.json", str(other))):
        ev.main(PPL(env, "--json", str(tmp_path / name), *CPU, model=ckpt))
    capsys.readouterr()
    ev.main(["report", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 2 and rows[0] != rows[1], rows
