"""
Hostile and bad inputs to every command (issue #10): each is refused with exit code 2 and exactly one
line on stderr ("error: ...", naming the file, key or flag), never a traceback or a warning, and nothing
that existed before is lost. Ctrl-C is one line, "interrupted", and exit code 130 (128 + SIGINT, the
shell's convention). The commands run in this process (their main() with SIGINT simulated nowhere);
only Ctrl-C needs a real process. About half a minute on 2 cores.

    python -m pytest tests/test_hostile.py -q
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import rundir  # noqa: E402
from data import prepare  # noqa: E402
from tests.helpers import PPL, SAMPLE, SCRATCH, TRAIN, ckpt_weights, digest, no_space, one_line_exit_2  # noqa: E402

L = 64
VOCAB = 320
READ_ONLY = "/sys/yarn-hostile-test"  # sysfs refuses new files even to root


# ---- making bad inputs from good ones ---------------------------------------------------------------------

def ckpt_with(e, t, raw=None, drop=(), **changes):
    """A copy of the good checkpoint with config.json changed (or replaced by the raw text)."""
    c = t / "ckpt"
    shutil.copytree(e.ckpt, c)
    cfg = json.loads((c / "config.json").read_text())
    cfg.update(changes)
    for k in drop:
        cfg.pop(k)
    (c / "config.json").write_text(raw if raw is not None else json.dumps(cfg))  # inf/nan as Infinity/NaN
    return str(c)


def nan_weights(w):
    w["model.norm.weight"][0] = float("nan")
    return w


def truncated(e, t):
    c = t / "ckpt"
    shutil.copytree(e.ckpt, c)
    data = (c / "model.safetensors").read_bytes()
    (c / "model.safetensors").write_bytes(data[:len(data) // 2])
    return str(c)


def sharded(e, t, index):
    """The good weights under model-00001-of-00001.safetensors with the given index text."""
    c = t / "ckpt"
    shutil.copytree(e.ckpt, c)
    os.rename(c / "model.safetensors", c / "model-00001-of-00001.safetensors")
    (c / "model.safetensors.index.json").write_text(index)
    return str(c)


def data_with(e, t, raw=None, tokens=None, **changes):
    """A copy of the prepared data with meta.json changed, or train.bin's first ids replaced."""
    d = t / "data"
    shutil.copytree(e.data, d)
    meta = json.loads((d / "meta.json").read_text())
    meta.update(changes)
    (d / "meta.json").write_text(raw if raw is not None else json.dumps(meta))
    if tokens is not None:
        ids = np.fromfile(d / "train.bin", dtype=np.uint16)
        ids[:len(tokens)] = tokens
        ids.tofile(d / "train.bin")
    return str(d)


def report_file(t, obj):
    p = t / "run.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def a_file(t):
    (t / "a-file").write_text("not a directory\n")
    return str(t / "a-file")


def resumable(e, t):
    """A copy of the 1-step run, with its checkpoint in checkpoints/step-000001."""
    shutil.copytree(e.run, t / "run")
    return t / "run", t / "run" / "checkpoints" / "step-000001"


def resume_missing_state(e, t):
    out, step = resumable(e, t)
    os.remove(step / "train_state.json")
    return str(out)


def resume_truncated_shard(e, t):
    out, step = resumable(e, t)
    shard = next(p for p in step.iterdir() if p.suffix == ".safetensors")
    shard.write_bytes(shard.read_bytes()[:100])
    return str(out)


# ---- the cases -------------------------------------------------------------------------------------------


CASES = {  # name: (command, argv builder (env, tmp_path), what the one line must say)
    # config.json: types and ranges, named by file and key
    "config vocab_size float": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, vocab_size=512.0)),
                                "config.json: vocab_size must be a positive integer, got 512.0"),
    "config vocab_size string": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, vocab_size="512")),
                                 "vocab_size must be a positive integer, got '512'"),
    "config vocab_size null": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, vocab_size=None)),
                               "vocab_size must be a positive integer, got None"),
    "config num_hidden_layers string": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, num_hidden_layers="2")),
                                        "num_hidden_layers must be a positive integer, got '2'"),
    "config heads string": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, num_attention_heads="4")),
                            "num_attention_heads must be a positive integer, got '4'"),
    "config heads zero": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, num_attention_heads=0)),
                          "num_attention_heads must be a positive integer, got 0"),
    "config kv heads negative": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, num_key_value_heads=-1)),
                                 "num_key_value_heads must be a positive integer, got -1"),
    "config kv heads not dividing": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, num_key_value_heads=3)),
                                     "multiple of num_key_value_heads"),
    "config hidden_size bool": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, hidden_size=True)),
                                "hidden_size must be a positive integer, got True"),
    "config intermediate negative": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, intermediate_size=-5)),
                                     "intermediate_size must be a positive integer"),
    "config head_dim odd": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, head_dim=15)), "even"),
    "config eps string": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, rms_norm_eps="1e-5")),
                          "rms_norm_eps must be a finite number, got '1e-5'"),
    "config eps zero": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, rms_norm_eps=0)), "rms_norm_eps must be > 0"),
    "config eps nan": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, rms_norm_eps=math.nan)),
                       "rms_norm_eps must be a finite number"),
    "config tie not bool": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, tie_word_embeddings="yes")),
                            "tie_word_embeddings must be true or false"),
    "config bos negative": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, bos_token_id=-3)), "bos_token_id"),
    "config sliding_window string": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, sliding_window="x")),
                                     "sliding_window must be a positive integer"),
    "config rope_theta inf": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, rope_theta=math.inf)),
                              "rope_theta must be a finite number, got inf"),
    "config rope_theta 1": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, rope_theta=1.0)),
                            "rope_theta must be a finite number > 1"),
    "config max_position string": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, max_position_embeddings="4096")),
                                   "max_position_embeddings must be a positive integer"),
    "config rope factor inf": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, rope_scaling={
        "rope_type": "yarn", "factor": math.inf, "original_max_position_embeddings": L})),
        "rope_scaling factor must be a finite number, got inf"),
    "config rope factor string": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, rope_scaling={
        "rope_type": "linear", "factor": "16"})), "rope_scaling factor must be a finite number, got '16'"),
    "config rope L float": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64.5})),
        "original_max_position_embeddings must be a positive integer"),
    "config rope attention_factor negative": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "attention_factor": -1.0})), "attention_factor must be > 0"),
    "config rope_scaling string": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, rope_scaling="yarn")),
                                   "rope_scaling must be a dict"),
    "config not an object": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, raw="[1, 2]")), "not a JSON object"),
    "config missing key": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, drop=["num_hidden_layers"])),
                           "config.json is missing 'num_hidden_layers'"),
    "config huge vocab (sample)": ("sample", lambda e, t: SAMPLE(ckpt_with(e, t, vocab_size=10**13)), "shape"),
    "config huge vocab (train)": ("train", lambda e, t: TRAIN(e, t, init=ckpt_with(e, t, vocab_size=10**13)),
                                  "weight has shape (320, 64)"),
    "config heads string (train)": ("train", lambda e, t: TRAIN(e, t, init=ckpt_with(e, t, num_attention_heads="4")),
                                    "num_attention_heads must be a positive integer, got '4'"),
    "config vocab string (eval)": ("eval", lambda e, t: PPL(e, model=ckpt_with(e, t, vocab_size="512")),
                                   "vocab_size must be a positive integer, got '512'"),
    # weights and the index of shards
    "weights NaN (sample)": ("sample", lambda e, t: SAMPLE(ckpt_weights(e, t, nan_weights)), "NaN or infinite"),
    "weights NaN (train)": ("train", lambda e, t: TRAIN(e, t, init=ckpt_weights(e, t, nan_weights)),
                            "NaN or infinite"),
    "weights truncated": ("sample", lambda e, t: SAMPLE(truncated(e, t)), "cannot read"),
    "index not JSON": ("sample", lambda e, t: SAMPLE(sharded(e, t, "{oops")), "corrupt"),
    "index without weight_map": ("sample", lambda e, t: SAMPLE(sharded(e, t, '{"metadata": {}}')), "corrupt"),
    "index weight_map a list": ("sample", lambda e, t: SAMPLE(sharded(e, t, '{"weight_map": []}')), "corrupt"),
    "index names a missing shard": ("sample", lambda e, t: SAMPLE(sharded(e, t, json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))), "is missing"),
    # data: meta.json, the .bin files, token ids
    "data is a file": ("train", lambda e, t: TRAIN(e, t, data=os.path.join(e.data, "train.bin")), "is a file"),
    "meta dtype float16": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, dtype="float16")),
                           "dtype must be one of uint16, uint32, got 'float16'"),
    "meta dtype unknown": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, dtype="uint9")), "dtype"),
    "meta missing keys": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, raw='{"dtype": "uint16"}')),
                          "lacks vocab_size"),
    "meta not an object": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, raw="[]")), "not a JSON object"),
    "meta not JSON": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, raw="{")), "corrupt"),
    "meta vocab string": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, vocab_size="320")),
                          "vocab_size must be an integer"),
    "meta vocab string (scratch)": ("train", lambda e, t: SCRATCH(e, t, data=data_with(e, t, vocab_size="512")),
                                    "vocab_size must be an integer"),
    "meta vocab too big for uint16": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, vocab_size=70000)),
                                      "vocab_size must be an integer in [1, 65536]"),
    "meta bos outside vocab": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, bos_id=999)), "bos_id"),
    "meta tokenizer a path": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, tokenizer="../../etc/passwd")),
                              "tokenizer must be a file name"),
    "meta docs out of range": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, val={
        "tokens": 5, "docs": [[0, 99]], "names": ["x"]})), "val.docs"),
    "meta tokens mismatch": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, train={
        "tokens": 7, "docs": [[0, 7]], "names": ["x"]})), "holds"),
    "token id beyond vocab (train)": ("train", lambda e, t: TRAIN(e, t, data=data_with(e, t, tokens=[5, 65000])),
                                      "token id 65000, outside the vocabulary of 320"),
    "token id beyond vocab (eval)": ("eval", lambda e, t: PPL(e, data=os.path.join(
        data_with(e, t, tokens=[65000]), "train.bin")), "token id 65000"),
    # train.py flags: each range, before any work
    "grad-clip negative": ("train", lambda e, t: TRAIN(e, t, "--grad-clip", "-1"), "--grad-clip must be a finite"),
    "lr inf": ("train", lambda e, t: TRAIN(e, t, "--lr", "inf"), "--lr must be a finite number > 0, got inf"),
    "lr nan": ("train", lambda e, t: TRAIN(e, t, "--lr", "nan"), "--lr must be a finite number > 0, got nan"),
    "lr zero": ("train", lambda e, t: TRAIN(e, t, "--lr", "0"), "--lr must be"),
    "lr not a number": ("train", lambda e, t: TRAIN(e, t, "--lr", "fast"), "--lr"),
    "batch-size 0": ("train", lambda e, t: TRAIN(e, t, "--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    "micro-batch 0": ("train", lambda e, t: TRAIN(e, t, "--micro-batch", "0"), "--micro-batch must be >= 1"),
    "steps 0": ("train", lambda e, t: TRAIN(e, t, "--steps", "0"), "--steps must be >= 1"),
    "warmup negative": ("train", lambda e, t: TRAIN(e, t, "--warmup", "-1"), "--warmup must be >= 0"),
    "eval-blocks -1": ("train", lambda e, t: TRAIN(e, t, "--eval-blocks", "-1"), "--eval-blocks must be >= 1"),
    "weight-decay negative": ("train", lambda e, t: TRAIN(e, t, "--weight-decay", "-0.1"), "--weight-decay"),
    "yarn-scale inf": ("train", lambda e, t: TRAIN(e, t, "--yarn-scale", "inf"), "--yarn-scale must be a finite"),
    "rope-factor nan": ("train", lambda e, t: TRAIN(e, t, "--rope", "linear", "--rope-factor", "nan"),
                        "--rope-factor must be a finite"),
    "original-ctx 0": ("train", lambda e, t: TRAIN(e, t, "--original-ctx", "0"), "--original-ctx must be >= 1"),
    "n-layer -1": ("train", lambda e, t: SCRATCH(e, t, "--n-layer", "-1"), "--n-layer must be >= 1, got -1"),
    "n-head 0": ("train", lambda e, t: SCRATCH(e, t, "--n-head", "0"), "--n-head must be >= 1, got 0"),
    "n-embd not heads x even": ("train", lambda e, t: SCRATCH(e, t, "--n-head", "3"), "even head dim"),
    "n-kv-head not dividing": ("train", lambda e, t: SCRATCH(e, t, "--n-kv-head", "3", "--n-embd", "48",
                                                             "--n-head", "4"), "multiple of --n-kv-head"),
    "rope-theta 1": ("train", lambda e, t: SCRATCH(e, t, "--rope-theta", "1"), "--rope-theta must be a finite number > 1"),
    "out is a file": ("train", lambda e, t: TRAIN(e, t, out=a_file(t)), "is a file, not a directory"),
    "out under a file": ("train", lambda e, t: TRAIN(e, t, out=os.path.join(a_file(t), "sub")), "is a file"),
    "out read-only": ("train", lambda e, t: TRAIN(e, t, out=READ_ONLY), "cannot write in"),
    # --resume: what the last checkpoint holds must be readable and fit
    "resume without train_state.json": ("train", lambda e, t: TRAIN(
        e, t, "--yarn-scale", "2", "--save-every", "1", "--warmup", "0", "--resume", out=resume_missing_state(e, t)),
        "train_state.json"),
    "resume a truncated shard": ("train", lambda e, t: TRAIN(
        e, t, "--yarn-scale", "2", "--save-every", "1", "--warmup", "0", "--resume", out=resume_truncated_shard(e, t)),
        "--resume: cannot read the checkpoint"),
    "resume with another model shape": ("train", lambda e, t: TRAIN(
        e, t, "--yarn-scale", "2", "--save-every", "1", "--warmup", "0", "--resume", init=e.deep,
        out=str(resumable(e, t)[0])), "--resume"),
    # sample.py
    "sample ctx 0": ("sample", lambda e, t: SAMPLE(e.ckpt, "--ctx", "0"), "--ctx must be in [1, 16777216]"),
    "sample ctx negative": ("sample", lambda e, t: SAMPLE(e.ckpt, "--ctx", "-5"), "--ctx must be"),
    "sample ctx beyond fp32 positions": ("sample", lambda e, t: SAMPLE(e.ckpt, "--ctx", str(2**40)), "2^24"),
    "sample ctx too large to allocate": ("sample", lambda e, t: SAMPLE(e.deep, "--ctx", str(2**24)),
                                         "more than the"),
    "sample rope-factor inf": ("sample", lambda e, t: SAMPLE(e.ckpt, "--rope", "yarn", "--rope-factor", "inf"),
                               "factor"),
    "sample rope-factor nan": ("sample", lambda e, t: SAMPLE(e.ckpt, "--rope", "yarn", "--rope-factor", "nan"),
                               "factor"),
    "sample model is a file": ("sample", lambda e, t: SAMPLE(a_file(t)), "checkpoint directory not found"),
    "sample ctx not a number": ("sample", lambda e, t: SAMPLE(e.ckpt, "--ctx", "many"), "--ctx"),
    # eval.py
    "eval json a directory": ("eval", lambda e, t: PPL(e, "--json", str(t)), "--json"),
    "eval json under a file": ("eval", lambda e, t: PPL(e, "--json", os.path.join(a_file(t), "x.json")), "is a file"),
    "eval json read-only": ("eval", lambda e, t: PPL(e, "--json", READ_ONLY + "/ppl.json"), "cannot write in"),
    "eval plot a directory": ("eval", lambda e, t: PPL(e, "--plot", str(t)), "--plot"),
    "eval passkey json a directory": ("eval", lambda e, t: ["passkey", "--model", e.ckpt, "--lengths", "256",
                                                            "--json", str(t)], "--json"),
    "eval rope factor inf": ("eval", lambda e, t: PPL(e, "--rope", "yarn:inf"), "factor"),
    "eval lengths beyond fp32 positions": ("eval", lambda e, t: PPL(e)[:-1] + [str(2**30)], "--lengths"),
    "report neither ppl nor passkey": ("eval", lambda e, t: ["report", report_file(t, {"task": "sample"})],
                                       "not the output"),
    "report passkey result not an object": ("eval", lambda e, t: ["report", report_file(t, {
        "task": "passkey", "lengths": [8], "depths": [0.5], "results": [3]})], '"accuracy" object'),
    "report passkey without depths": ("eval", lambda e, t: ["report", report_file(t, {"task": "passkey",
                                                                                      "lengths": [8]})], "depths"),
    "report ppl without lengths": ("eval", lambda e, t: ["report", report_file(t, {"task": "ppl"})], "lengths"),
    "report a list": ("eval", lambda e, t: ["report", report_file(t, [1, 2])], "not the output"),
    "report bad cell": ("eval", lambda e, t: ["report", report_file(t, {"task": "ppl", "lengths": [8], "results": [
        {"method": "m", "ppl": {"8": {"ppl": "x", "tokens": 3}}}]})], "m @ 8"),
    "report not JSON": ("eval", lambda e, t: ["report", report_file(t, "NaN, oops")], "run.json"),
    "report missing file": ("eval", lambda e, t: ["report", str(t / "nope.json")], "cannot read"),
    "report out a directory": ("eval", lambda e, t: ["report", report_file(t, "{}"), "--out", str(t)], "--out"),
    # data/prepare.py
    "prepare out is a file": ("prepare", lambda e, t: ["--input", e.text, "--out", a_file(t), "--tokenizer", e.ckpt],
                              "cannot write"),
    "prepare out read-only": ("prepare", lambda e, t: ["--input", e.text, "--out", READ_ONLY, "--tokenizer", e.ckpt],
                              "cannot write"),
    "prepare vocab not a number": ("prepare", lambda e, t: ["--input", e.text, "--out", str(t / "o"),
                                                            "--train-tokenizer", "big"], "--train-tokenizer"),
}
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(env, case, tmp_path, capsys):
    command, build, message = CASES[case]
    argv = [str(a) for a in build(env, tmp_path)]
    capsys.readouterr()
    before = digest(tmp_path)
    err = one_line_exit_2(command, argv, capsys)
    assert message in err, err
    assert digest(env.root) == env.before  # the shared inputs are untouched
    after = digest(tmp_path)
    assert all(after.get(k) == v for k, v in before.items()), "a file was changed or removed"
    assert not any(n.endswith(("config.json", "meta.json")) and n not in before for n in after), after  # no output


# ---- failures in the middle of the work ---------------------------------------------------------------------


def test_diverging_loss_stops_without_exporting(env, tmp_path, capsys):
    out = tmp_path / "out"
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--steps", "4", "--lr", "1e30", "--warmup", "0"), capsys,
                          after_progress=True)
    assert "training diverged" in err and not (out / "config.json").exists()
    assert all(math.isfinite(json.loads(line)["loss"]) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_full_disk_at_export_keeps_the_earlier_export(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(env.ckpt, out)  # an earlier export in --out, by an earlier train.py run
    (out / "metrics.jsonl").write_text("")
    before = digest(out)
    before.pop("metrics.jsonl")  # the new run's log replaces the old one's
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--overwrite", out=str(out)), capsys, after_progress=True)
    assert "cannot export" in err and "No space left on device" in err
    after = digest(out)
    assert all(after.get(k) == v for k, v in before.items())
    assert not (out / ".export").exists() and not (out / ".export.tmp").exists()


def test_full_disk_at_checkpoint_keeps_the_run_resumable(env, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--save-every", "1"), capsys, after_progress=True)
    assert "cannot write a checkpoint" in err and not rundir.checkpoints(str(tmp_path / "out"))


def test_full_disk_while_preparing_leaves_no_meta_json(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare.os, "replace", no_space)
    err = one_line_exit_2("prepare", ["--input", env.text, "--out", str(tmp_path / "d"), "--tokenizer", env.ckpt],
                          capsys)
    assert "cannot write" in err and not (tmp_path / "d" / "meta.json").exists()


# ---- Ctrl-C: a real process, SIGINT while it works -----------------------------------------------------------

def test_ctrl_c_is_one_line_and_exit_130(env, tmp_path):
    out = tmp_path / "pk.json"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), "passkey", "--model", env.ckpt,
                          "--lengths", "2048", "--trials", "50", "--json", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"},
                         # a shell's background job starts with SIGINT ignored, and so would the child: as at a terminal
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until main() runs: it imports sentencepiece late
        time.sleep(0.2)
        with open(f"/proc/{p.pid}/maps") as f:
            if "sentencepiece" in f.read():
                break
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "interrupted\n", err
    assert not out.exists()
