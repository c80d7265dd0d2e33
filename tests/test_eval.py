"""
Tests of eval.py, data/passkey.py and support/report.py: perplexity equal to transformers' on the same weights
and tokens (whole documents and strided windows, for several RoPE methods), the strided windows' token
accounting, the passkey prompt, passkey accuracy of a model built to copy (100%) and of a random one
(about 0), and the command line (tables, JSON, plots, reports, one-line errors). Tiny random models,
about a minute.

    python -m pytest tests/test_eval.py -q
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402
from data import passkey  # noqa: E402
from data.packed import prepare  # noqa: E402
from data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from model import Llama  # noqa: E402
from support import report  # noqa: E402
from rope import RopeConfig  # noqa: E402
from support.common import UserError, rope_config  # noqa: E402
from tests.helpers import WordTokenizer, copy_model, tiny_model  # noqa: E402

L = 64  # original context of the test models
ON_CPU = ["--device", "cpu", "--dtype", "float32"]  # the CLI defaults to CUDA and bf16 where there is a GPU
VOCAB = 320


def corpus_text(i, words=300):
    rng = np.random.default_rng(i)
    vocab = ("the grass sky sun is green blue yellow here we go there and back again pass key remember it "
             "what 0 1 2 3 4 5 6 7 8 9 . , ?").split()
    return " ".join(rng.choice(vocab, words)) + "\n" + passkey.passkey_text(3, 0.5, 10000 + i) + "\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint (plain RoPE, L = 64) with a 320-entry sentencepiece tokenizer."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    text = "".join(corpus_text(i) for i in range(20))
    tiny_model().save_pretrained(str(path))
    (path / "tokenizer.model").write_bytes(train_tokenizer([("t", lambda: text)], VOCAB))
    return str(path)


# ---- perplexity equals transformers' ------------------------------------------------------------------

ROPES = {
    "none": dict(),
    "linear": dict(method="linear", factor=4.0),
    "yarn": dict(method="yarn", factor=4.0),
    "llama3": dict(method="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0),
    "dynamic-ntk": dict(method="dynamic-ntk", factor=2.0),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same random weights saved once per RoPE method."""
    root = tmp_path_factory.mktemp("ropes")
    model = tiny_model()
    for name, kw in ROPES.items():
        model.config.rope = RopeConfig(head_dim=16, original_max_position_embeddings=L, **kw)
        model.save_pretrained(str(root / name))
    return {name: str(root / name) for name in ROPES}


def hf_nll(hf, tokens, length, stride):
    """Summed loss by transformers, over the windows eval.py uses (labels -100 where not scored)."""
    nll, count = 0.0, 0
    for start, end, first in ev.windows(len(tokens), length, stride):
        x = torch.tensor([tokens[start:end]])
        labels = x.clone()
        labels[:, :first - start] = -100  # transformers shifts labels itself: x[j] is scored for j >= first
        with torch.no_grad():
            nll += hf(input_ids=x, labels=labels).loss.item() * (end - first)
        count += end - first
    return nll, count


@pytest.mark.parametrize("name", list(ROPES))
def test_perplexity_equals_transformers(checkpoints, name):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
    ours = Llama.from_pretrained(checkpoints[name])
    assert ours.config.rope.method == name
    tokens = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    for length, stride in [(200, None), (100, 40)]:  # past L = 64 in both; 100-token windows over 300 tokens
        nll, count = ev.perplexity(ours, tokens, length, stride)
        ref, ref_count = hf_nll(hf, tokens, length, stride)
        assert count == ref_count == (length - 1 if stride is None else len(tokens) - 1)
        assert abs(math.exp(nll / count) / math.exp(ref / ref_count) - 1) < 1e-3  # the bar: 0.1%


def test_set_rope_equals_reloading(checkpoints):
    """eval.py loads the weights once and swaps the RoPE method: same numbers as loading it that way."""
    tokens = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    model = Llama.from_pretrained(checkpoints["none"])
    for name in ("yarn", "llama3", "dynamic-ntk", "none"):
        saved = Llama.from_pretrained(checkpoints[name])
        model.set_rope(saved.config.rope)
        assert ev.perplexity(model, tokens, 200) == pytest.approx(ev.perplexity(saved, tokens, 200), rel=1e-6)
    model.set_rope(rope_config(model.config.rope, "yarn", None, target_len=4 * L))  # default factor: 256 / 64
    saved = Llama.from_pretrained(checkpoints["yarn"])
    assert ev.perplexity(model, tokens, 200) == pytest.approx(ev.perplexity(saved, tokens, 200), rel=1e-6)


# ---- strided windows: every token after the first is scored exactly once ---------------------------

class Recorder(torch.nn.Module):
    """Stands in for the model: records what perplexity() feeds and scores, returns a zero loss."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, idx, targets, reduction):
        self.calls.append((idx[0].tolist(), targets[0].tolist()))
        return torch.zeros(())


@pytest.mark.parametrize("n,length,stride", [(1000, 256, 255), (1000, 256, 100), (1000, 256, 1), (257, 256, 64),
                                             (256, 256, 8), (100, 256, 8), (1000, 256, None)])
def test_strided_token_accounting(n, length, stride):
    model = Recorder()
    tokens = np.arange(n)  # token value = position: targets say exactly which positions were scored
    _, count = ev.perplexity(model, tokens, length, stride)
    scored = []
    for k, (idx, targets) in enumerate(model.calls):
        assert len(idx) == min(n, length)  # every window has the full context length
        assert idx == list(range(idx[0], idx[0] + len(idx)))
        for i, t in enumerate(targets):
            if t != -100:
                assert t == idx[i] + 1  # the target of position i is the token after it
                scored.append(t)
        if k > 0:
            assert sum(t != -100 for t in targets) <= stride  # only the new tokens
    want = list(range(1, n)) if stride is not None else list(range(1, min(n, length)))
    assert sorted(scored) == want and count == len(want)


def test_stride_must_leave_context():
    with pytest.raises(ValueError):
        ev.windows(1000, 256, 256)


def test_strided_with_one_window_equals_whole_document():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (128,), generator=torch.Generator().manual_seed(2)).tolist()
    assert ev.perplexity(model, tokens, 128, stride=16) == ev.perplexity(model, tokens, 128)
    # a document longer than the length: windows score all tokens after the first, truncation only length - 1
    assert ev.perplexity(model, tokens, 64, stride=16)[1] == 127
    assert ev.perplexity(model, tokens, 64)[1] == 63


# ---- passkey ------------------------------------------------------------------------------------------

PAPER_PROMPT = (  # Mohtashami & Jaggi (2023), as the YaRN paper uses it: two filler sentences, key in the middle
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
    "The pass key is 54321. Remember it. 54321 is the pass key.\n"
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
    "What is the pass key? The pass key is")


def test_passkey_text_is_the_papers_prompt():
    assert passkey.passkey_text(2, 0.5, 54321) == PAPER_PROMPT
    for n, depth in ((0, 0.5), (5, 0.0), (5, 1.0), (7, 0.3)):
        lines = passkey.passkey_text(n, depth, 54321).split("\n")
        assert len(lines) == 5 and lines[0] == passkey.TASK and lines[2] == passkey.KEY_LINE.format(key=54321)
        assert lines[-1] == "What is the pass key? The pass key is"
        assert lines[1].count(passkey.FILLER) == round(depth * n)
        assert lines[3].count(passkey.FILLER) == n - round(depth * n)


def test_passkey_prompt_layout(checkpoint):
    tok = load_tokenizer(checkpoint)
    for length in (250, 500, 1500):  # this tokenizer spends ~60 tokens on one filler line
        for depth in (0.0, 0.5, 1.0):
            ids = passkey.passkey_prompt(tok, length, depth, 54321)
            text = tok.decode(ids)
            per = len(tok.encode(" " + passkey.FILLER))
            assert length - 2 * per <= len(ids) <= length  # fills the length, never exceeds it
            assert ids[0] == tok.bos_id and text.startswith(passkey.TASK + "\n") and text.endswith(passkey.QUESTION)
            assert text.count("The pass key is 54321. Remember it. 54321 is the pass key.") == 1
            assert text.count("54321") == 2
            before, after = text.split(passkey.KEY_LINE.format(key=54321))
            n_before, n_after = before.count(passkey.FILLER), after.count(passkey.FILLER)
            assert n_before + n_after >= 1
            assert n_before == round(depth * (n_before + n_after))  # the key sits at the depth asked
    with pytest.raises(ValueError, match="too short"):
        passkey.passkey_prompt(tok, 10, 0.5, 12345)


def test_passkey_copy_model_scores_100_and_random_model_about_0():
    tok = WordTokenizer()
    lengths, depths = [80, 150, 400], [0.0, 0.5, 1.0]
    acc = passkey.passkey_accuracy(copy_model(tok), tok, lengths, depths, trials=3, seed=0)
    assert set(acc) == set(lengths) and all(set(row) == set(depths) for row in acc.values())
    assert all(a == 1.0 for row in acc.values() for a in row.values()), acc
    random_model = tiny_model(RopeConfig(theta=1e6, head_dim=16, original_max_position_embeddings=4096),
                              vocab=tok.vocab_size)
    acc = passkey.passkey_accuracy(random_model, tok, lengths, depths, trials=3, seed=0)
    assert np.mean([a for row in acc.values() for a in row.values()]) <= 0.1, acc


# ---- command line ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Four text documents of different lengths, and the same documents prepared as a .bin split."""
    root = tmp_path_factory.mktemp("texts")
    for i, words in enumerate([40, 150, 400, 600]):
        (root / f"doc{i}.txt").write_text(corpus_text(i, words))
    return root


def test_cli_ppl_text_and_bin_data(checkpoint, texts, tmp_path, capsys):
    out = tmp_path / "res" / "ppl.json"
    ev.main(["ppl", *ON_CPU, "--model", checkpoint, "--data", str(texts), "--lengths", "128,512",
             "--rope", "model", "--rope", "yarn:4", "--rope", "dynamic-yarn", "--json", str(out)])
    stdout, err = capsys.readouterr()
    res = json.loads(out.read_text())
    assert [r["method"] for r in res["results"]] == ["model: none (L=64)", "yarn s=4 (L=64)", "dynamic-yarn (L=64)"]
    for r in res["results"]:
        assert f"| {r['method']} | {r['ppl']['128']['ppl']:.3f} | {r['ppl']['512']['ppl']:.3f} |" in stdout
    assert "shorter ones skipped" in err

    # the same numbers from the functions: documents with enough tokens, BOS first, truncated
    tok = load_tokenizer(checkpoint)
    docs = [[tok.bos_id] + tok.encode((texts / f"doc{i}.txt").read_text()) for i in range(4)]
    model = Llama.from_pretrained(checkpoint)
    model.set_rope(rope_config(model.config.rope, "yarn", 4.0))
    long_docs = [d for d in docs if len(d) >= 512]
    nll = sum(ev.perplexity(model, d[:512], 512)[0] for d in long_docs)
    r = res["results"][1]["ppl"]["512"]
    assert r["docs"] == len(long_docs) and r["tokens"] == 511 * len(long_docs)
    assert r["ppl"] == pytest.approx(math.exp(nll / r["tokens"]), rel=1e-5)
    assert res["documents"] == [str(texts / f"doc{i}.txt") for i in range(4) if len(docs[i]) >= 512]
    if _has_matplotlib():
        assert (tmp_path / "res" / "ppl.png").stat().st_size > 1000
    else:
        assert "plot skipped" in err

    # a .bin split from data/prepare.py gives the same documents, hence the same numbers
    docs_for_prepare = [(str(texts / f"doc{i}.txt"), lambda i=i: (texts / f"doc{i}.txt").read_text()) for i in range(4)]
    prepare(str(tmp_path / "data"), docs_for_prepare[:1], docs_for_prepare, tokenizer=checkpoint)
    ev.main(["ppl", *ON_CPU, "--model", checkpoint, "--data", str(tmp_path / "data" / "val.bin"), "--lengths", "128,512",
             "--rope", "yarn:4", "--json", str(tmp_path / "bin.json"), "--max-docs", "5"])
    run_bin = json.loads((tmp_path / "bin.json").read_text())
    res_bin = run_bin["results"][0]["ppl"]
    assert res_bin["512"]["ppl"] == pytest.approx(r["ppl"], rel=1e-5)
    assert res_bin["128"]["ppl"] == pytest.approx(res["results"][1]["ppl"]["128"]["ppl"], rel=1e-5)
    assert run_bin["documents"] == res["documents"]  # a prepared split names its documents as they were read


def test_cli_ppl_strided_and_plot_optional(checkpoint, texts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    ev.main(["ppl", *ON_CPU, "--model", checkpoint, "--data", str(texts / "doc3.txt"), "--lengths", "64,128",
             "--stride", "32", "--json", str(tmp_path / "s.json")])
    stdout, err = capsys.readouterr()
    res = json.loads((tmp_path / "s.json").read_text())["results"][0]["ppl"]
    n = len(load_tokenizer(checkpoint).encode((texts / "doc3.txt").read_text())) + 1  # with BOS
    assert res["64"]["tokens"] == res["128"]["tokens"] == n - 1  # the whole document, at each length
    assert "stride 32" in stdout and "plot skipped" in err and not (tmp_path / "s.png").exists()


def test_cli_ppl_same_documents_at_every_length(checkpoint, texts, tmp_path, capsys):
    """The paper's protocol by default: the documents that reach the longest length, each truncated to
    every length; --docs-per-length scores at each length all that reach it (different texts)."""
    tok = load_tokenizer(checkpoint)
    lens = {str(texts / f"doc{i}.txt"): 1 + len(tok.encode((texts / f"doc{i}.txt").read_text())) for i in range(4)}
    assert sorted(lens.values()) == list(lens.values()) and lens[str(texts / "doc1.txt")] < 1024  # 482 ... 2007
    long_names = [name for name, n in lens.items() if n >= 1024]
    runs = {}
    for flags in ([], ["--docs-per-length"]):
        out = tmp_path / f"run{len(flags)}.json"
        ev.main(["ppl", *ON_CPU, "--model", checkpoint, "--data", str(texts), "--lengths", "128,1024",
                 "--json", str(out), *flags])
        runs[bool(flags)] = json.loads(out.read_text())
    err = capsys.readouterr().err
    same, per_length = runs[False], runs[True]
    assert same["docs_per_length"] is False and per_length["docs_per_length"] is True
    assert same["documents"] == long_names  # named once: the same documents at both lengths
    assert [same["results"][0]["ppl"][n]["docs"] for n in ("128", "1024")] == [len(long_names)] * 2
    assert f"{len(long_names)} documents of at least 1024 tokens, each scored at every length" in err
    assert per_length["documents"] == {"128": list(lens), "1024": long_names}  # one list per length
    assert per_length["results"][0]["ppl"]["128"]["docs"] == 4
    assert "names" not in same["results"][0]["ppl"]["128"]  # named once, at the top
    # the longest length scores the same set either way; the short one is the long documents' first 128 tokens
    assert per_length["results"][0]["ppl"]["1024"]["ppl"] == pytest.approx(same["results"][0]["ppl"]["1024"]["ppl"],
                                                                          rel=1e-6)
    model = Llama.from_pretrained(checkpoint)
    docs = [np.array([tok.bos_id] + tok.encode(open(name).read())) for name in long_names]
    nll = sum(ev.perplexity(model, d[:128], 128)[0] for d in docs)
    assert same["results"][0]["ppl"]["128"]["ppl"] == pytest.approx(math.exp(nll / (127 * len(docs))), rel=1e-5)
    # --max-docs takes the first of the long documents, at every length
    ev.main(["ppl", *ON_CPU, "--model", checkpoint, "--data", str(texts), "--lengths", "128,1024", "--max-docs", "1",
             "--json", str(tmp_path / "one.json")])
    assert json.loads((tmp_path / "one.json").read_text())["documents"] == long_names[:1]
    assert ev.choose_documents([("a", [0] * 5), ("b", [0] * 9), ("c", [0] * 9)], [4, 8], max_docs=1,
                               per_length=True) == {4: [("a", [0] * 5)], 8: [("b", [0] * 9)]}


def test_cli_ppl_stride_cost_is_announced(checkpoint, texts, capsys):
    """Windows of 128 tokens moving by 1 read each scored token about 128 times: one line says so first."""
    ev.main(["ppl", *ON_CPU, "--model", checkpoint, "--data", str(texts / "doc3.txt"), "--lengths", "128",
             "--stride", "1", "--max-tokens", "256"])
    err = capsys.readouterr().err.splitlines()
    passes, read, scored = 1 + 128, 129 * 128, 255  # one window of 128, then one more per new token up to 256
    warning = [line for line in err if line.startswith("warning: --stride")]
    assert warning == [f"warning: --stride 1: {passes} forward passes reading {read:,} tokens to score {scored} "
                       f"({read / scored:.0f}x, for each --rope method); a larger --stride or fewer --max-docs "
                       "costs less"]
    assert err.index(warning[0]) < min(i for i, line in enumerate(err) if "perplexity" in line)  # before the run
    # stride 32 reads each token about 4 times: quiet
    ev.main(["ppl", *ON_CPU, "--model", checkpoint, "--data", str(texts / "doc3.txt"), "--lengths", "128",
             "--stride", "32"])
    assert "warning: --stride" not in capsys.readouterr().err


def test_cli_label_and_report_merge_runs(checkpoint, texts, tmp_path, capsys):
    for label, rope, lengths in (("base", "none", "128"), ("tuned", "yarn:4", "128,512")):
        ev.main(["ppl", *ON_CPU, "--model", checkpoint, "--label", label, "--rope", rope, "--data", str(texts),
                 "--lengths", lengths, "--json", str(tmp_path / f"{label}.json")])
    capsys.readouterr()
    merged = report.report([str(tmp_path / "base.json"), str(tmp_path / "tuned.json")], str(tmp_path / "all.md"))
    table = (tmp_path / "all.md").read_text()
    base, tuned = (json.loads((tmp_path / f"{x}.json").read_text())["results"][0] for x in ("base", "tuned"))
    assert [r["method"] for r in merged] == ["base, none (L=64)", "tuned, yarn s=4 (L=64)"]
    assert f"| base, none (L=64) | {base['ppl']['128']['ppl']:.3f} | - |" in table
    assert f"| tuned, yarn s=4 (L=64) | {tuned['ppl']['128']['ppl']:.3f} | {tuned['ppl']['512']['ppl']:.3f} |" in table
    with pytest.raises(SystemExit) as e:
        ev.main(["report", str(tmp_path / "all.md")])
    assert e.value.code == 2


def test_cli_passkey(checkpoint, tmp_path, capsys, monkeypatch):
    ev.main(["passkey", *ON_CPU, "--model", checkpoint, "--lengths", "256,320", "--depths", "0,0.5,1", "--trials", "2",
             "--rope", "model", "--rope", "dynamic-yarn", "--json", str(tmp_path / "pk.json")])
    stdout, err = capsys.readouterr()
    res = json.loads((tmp_path / "pk.json").read_text())
    assert res["depths"] == [0.0, 0.5, 1.0] and len(res["results"]) == 2
    for r in res["results"]:
        assert set(r["accuracy"]) == {"256", "320"} and set(r["accuracy"]["256"]) == {"0.0", "0.5", "1.0"}
        assert r["mean"] <= 0.2  # a random model does not find the key
        assert f"{r['method']}: mean" in stdout
    assert "| length \\ depth | 0 | 0.5 | 1 |" in stdout
    if _has_matplotlib():
        assert (tmp_path / "pk.png").stat().st_size > 1000

    # report merges passkey runs of several checkpoints: one row each, the mean over depths per length;
    # and the keys asked are odd: data/passkey.py trains on even ones, so none was ever seen in training
    keys, prompt = [], passkey.passkey_prompt
    monkeypatch.setattr(passkey, "passkey_prompt", lambda tok, n, d, key: keys.append(key) or prompt(tok, n, d, key))
    ev.main(["passkey", *ON_CPU, "--model", checkpoint, "--label", "tuned", "--lengths", "256", "--depths", "0,1",
             "--trials", "5", "--json", str(tmp_path / "pk2.json")])
    assert keys[0] == 12345 and len(keys) == 11  # a first prompt checks the length, then 2 x 5 trials
    assert all(k % 2 == 1 and 10000 < k < 100000 for k in keys[1:]), keys
    capsys.readouterr()
    merged = report.report([str(tmp_path / "pk.json"), str(tmp_path / "pk2.json")], str(tmp_path / "pk.md"))
    table = (tmp_path / "pk.md").read_text()
    assert len(merged) == 3 and "| method \\ length | 256 | 320 |" in table
    first = res["results"][0]
    assert f"| {first['method']} | {sum(first['accuracy']['256'].values()) / 3:.0%} |" in table
    assert "| tuned, model: none (L=64) | " in table and table.strip().endswith("| - |")
    ppl_run = {"task": "ppl", "lengths": [256], "results": [{"method": "x", "ppl": {"256": {"ppl": 2.0, "tokens": 9}}}]}
    (tmp_path / "ppl.json").write_text(json.dumps(ppl_run))
    with pytest.raises(UserError, match="not the output of eval.py passkey"):  # a passkey run and a ppl run do not make one table
        report.report([str(tmp_path / "pk.json"), str(tmp_path / "ppl.json")])


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("args,message", [
    (["ppl", "--lengths", "0"], "--lengths"),
    (["ppl", "--lengths", "a,b"], "--lengths"),
    (["ppl", "--lengths", "128", "--stride", "128"], "--stride"),
    (["ppl", "--lengths", "128", "--rope", "yarn:x"], "factor after ':'"),
    (["ppl", "--lengths", "128", "--rope", "rotary"], "unknown RoPE method"),
    (["ppl", "--lengths", "128", "--data", "/nonexistent/val.bin"], "not found"),
    (["ppl", "--lengths", "128", "--data", "/nonexistent/dir"], "not found"),
    (["ppl", "--lengths", "128", "--max-tokens", "500"], "--stride"),
    (["ppl", "--lengths", "128,4096"], "no document has 4096 tokens"),  # the longest is 2007: names the ways out
    (["ppl", "--lengths", "128,4096"], "--docs-per-length"),
    (["passkey", "--lengths", "128", "--trials", "0"], "--trials"),
    (["passkey", "--lengths", "8"], "too short"),
    (["passkey", "--lengths", "128", "--depths", "1.5"], "--depths"),
])
def test_cli_errors(checkpoint, texts, capsys, args, message):
    if args[0] == "ppl" and "--data" not in args:
        args = args + ["--data", str(texts)]
    with pytest.raises(SystemExit) as e:
        ev.main(args + ["--model", checkpoint])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_cli_errors_in_a_real_process(checkpoint, texts, tmp_path):
    """Missing model, and a tokenizer missing for text data: exit 2, one line, no traceback."""
    no_tok = tmp_path / "no-tokenizer"
    tiny_model().save_pretrained(str(no_tok))
    cases = [(["ppl", "--model", str(tmp_path / "nope"), "--data", str(texts)], "checkpoint directory not found"),
             (["ppl", "--model", str(no_tok), "--data", str(texts)], "tokenizer"),
             (["passkey", "--model", str(no_tok)], "tokenizer")]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), *a, "--lengths", "128"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for a, _ in cases]
    for p, (_, message) in zip(procs, cases):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err and message in err
