"""
Tests of eval.py ruler and data/ruler.py: every task's prompt is exactly the length asked (in the model's
tokens) and holds its answers; the scoring is RULER's metrics on hand-made cases; greedy answers decoded in
a batch equal transformers' generate on the same ids; the command line (JSON, table, --save-samples, --resume,
report) and its one-line errors. A tiny random Llama and a small sentencepiece, about half a minute.

    python -m pytest tests/test_ruler.py -q
"""

import json
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402
from data import ruler  # noqa: E402
from data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from generation import greedy_batch  # noqa: E402
from model import Llama  # noqa: E402
from support import report  # noqa: E402
from tests.helpers import one_line_exit_2, tiny_model  # noqa: E402

ON_CPU = ["--device", "cpu", "--dtype", "float32"]
VOCAB = 1000
SYLLABLES = [a + b for a in "bdfgklmnprstvz" for b in ("a", "e", "i", "o", "u", "an", "el", "or")]


def haystack_text(sentences, seed=0):
    """Sentences of made-up words (112 syllables, words of one to three): an essay-like haystack."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))  # noqa: E731
    return " ".join(" ".join(word() for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(sentences))


SQUAD = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [
    {"context": f"Paragraph {i} says the river Zorn{i} is long.", "qas": [
        {"question": f"Which river does paragraph {i} name?", "is_impossible": False,
         "answers": [{"text": f"Zorn{i}"}, {"text": f"the river Zorn{i}"}]},
        {"question": "Unanswerable?", "is_impossible": True, "answers": []}]} for i in range(40)]}]}
HOTPOT = [{"question": f"Who built tower {i}?", "answer": f"Mason{i}",
           "context": [[f"Tower {i}", [f"Tower {i} was built by Mason{i}.", " It is tall."]],
                       [f"Town {i}", [f"Town {i} has a tower."]]]} for i in range(30)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random checkpoint with a 1000-token sentencepiece trained on RULER's own words and a haystack; the
    haystack file; SQuAD and HotpotQA files."""
    root = tmp_path_factory.mktemp("ruler")
    (root / "hay.txt").write_text(haystack_text(1500))
    text = "\n".join([haystack_text(300, seed=1), ruler.NIAH, ruler.NEEDLE, ruler.NOISE, ruler.VT, ruler.CWE,
                      ruler.FWE, ruler.QA, " ".join(ruler.ADJECTIVES), " ".join(ruler.NOUNS),
                      "0123456789 abcdef ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
    tiny_model(vocab=VOCAB).save_pretrained(str(root / "ckpt"))
    (root / "ckpt" / "tokenizer.model").write_bytes(train_tokenizer([("t", lambda: text)], VOCAB))
    (root / "squad.json").write_text(json.dumps(SQUAD))
    (root / "hotpot.json").write_text(json.dumps(HOTPOT))
    (root / "bad.json").write_text(json.dumps({"rows": [{"question": "?"}]}))
    return root


@pytest.fixture(scope="module")
def sources(files):
    tok = load_tokenizer(str(files / "ckpt"))
    qa = [str(files / "squad.json"), str(files / "hotpot.json")]
    src, tasks = ruler.make_sources(tok, list(ruler.TASKS), [1100], [str(files / "hay.txt")], qa, seed=0)
    assert tasks == list(ruler.TASKS)
    return tok, src


# ---- the prompts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ruler.TASKS))
def test_prompt_is_exactly_the_length_and_holds_the_answers(sources, name):
    tok, src = sources
    task, guess = ruler.TASKS[name], None
    for length in (1100, 1337):
        for index in range(3):
            s, guess = ruler.make_sample(task, tok, length, index, 0, src, guess)
            assert len(s.ids) == length and s.ids[0] == tok.bos_id  # the length asked, to the token, BOS included
            text = tok.decode(s.ids)
            assert all(a in text for a in s.answers), (name, s.answers)  # no needle cut by the fitting
            prefix = {"niah": ("in the provided text is", "in the provided text are"), "vt": "they are:",
                      "cwe": "appear most often in the list are:", "qa": "Answer:",
                      "fwe": "the three most frequently appeared words are:"}[task.kind]
            assert text.rstrip().endswith(prefix), text[-200:]  # the template and its answer prefix, last
        again, _ = ruler.make_sample(task, tok, length, index, 0, src)  # reproducible alone, without the guess
        assert again.ids == s.ids and again.answers == s.answers
    other, _ = ruler.make_sample(task, tok, length, index, 1, src)
    assert other.ids != s.ids  # another seed, another sample


def test_prompts_follow_rulers_templates(sources):
    tok, src = sources
    s, _ = ruler.make_sample(ruler.TASKS["niah_single_1"], tok, 1100, 0, 0, src)
    text = tok.decode(s.ids)
    lines = text.split("\n")
    assert lines[0] == ("A special magic number is hidden within the following text. Make sure to memorize it. I will "
                        "quiz you about the number afterwards.")  # niah.py's singular form of the template
    needle = [line for line in lines if line.startswith("One of the special magic numbers for ")]
    assert len(needle) == 1 and needle[0].endswith(f" is: {s.answers[0]}.")
    assert set(lines[1:-2]) == {ruler.NOISE, needle[0]}  # the noise haystack, cut to fit in its last line only
    assert ruler.NOISE.startswith(lines[-2]) and lines[-1].startswith("What is the special magic number for ")
    s, _ = ruler.make_sample(ruler.TASKS["niah_multiquery"], tok, 1100, 0, 0, src)
    text = tok.decode(s.ids)
    assert len(s.answers) == 4 and "What are all the special magic numbers for " in text and ", and " in text
    s, _ = ruler.make_sample(ruler.TASKS["vt"], tok, 1100, 0, 0, src)
    text = tok.decode(s.ids)
    assert f"VAR {s.answers[1]} = VAR {s.answers[0]} " in text and "5 variables are assigned the value" in text
    assert text.count("Memorize and track the chain(s)") == 2  # the one-shot example first
    s, _ = ruler.make_sample(ruler.TASKS["fwe"], tok, 1100, 0, 0, src)
    words = tok.decode(s.ids).split("Find the three most frequently appeared coded words.")[1].split("\n")[0].split()
    counts = sorted({w: words.count(w) for w in set(words) if w != "..."}.items(), key=lambda x: -x[1])
    assert [w for w, _ in counts[:3]] == s.answers  # the answers are the three most frequent coded words


def test_lengths_the_haystack_cannot_fill_are_refused(sources, files):
    tok, src = sources
    with pytest.raises(ValueError, match="too short"):
        ruler.make_sample(ruler.TASKS["niah_single_1"], tok, 40, 0, 0, src)
    with pytest.raises(ValueError, match="haystack is too short"):  # 1500 sentences: about 40k tokens of essay
        ruler.make_sample(ruler.TASKS["niah_single_2"], tok, 200000, 0, 0, src)


def test_haystack_from_text_jsonl_or_a_prepared_dataset(files, tmp_path):
    from data.packed import prepare
    text = (files / "hay.txt").read_text()
    want = ruler.haystack_words([text])
    (tmp_path / "hay.jsonl").write_text(json.dumps({"text": text}) + "\n")
    prepare(str(tmp_path / "data"), [("a", lambda: text)], [("a", lambda: text)], tokenizer=str(files / "ckpt"))
    for paths in ([str(files / "hay.txt")], [str(tmp_path / "hay.jsonl")], [str(tmp_path / "data")],
                  [str(tmp_path / "data" / "train.bin")]):
        assert ruler.read_haystack(paths, 100000) == want, paths  # decoded with the dataset's own tokenizer
    assert len(ruler.read_haystack([str(files / "hay.txt")], 10)) == len(want)  # whole documents, never cut
    assert len(ruler.distinct_words(want)) > 1000


# ---- scoring: RULER's definitions ---------------------------------------------------------------------

def test_scoring_is_rulers():
    # string_match_all: the fraction of references in the prediction, ignoring case (RULER's evaluate.py)
    assert ruler.string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == 2 / 3
    assert ruler.string_match_all("ABC-def", ["abc-DEF"]) == 1.0
    assert ruler.string_match_all("nothing", ["x1"]) == 0.0
    # string_match_part: 1 if any reference is there (QA)
    assert ruler.string_match_part("It is Zorn3, I think", ["the river Zorn3", "zorn3"]) == 1.0
    assert ruler.string_match_part("Zorn4", ["Zorn3", "the river Zorn3"]) == 0.0
    # postprocess_pred: stripped, control characters made newlines
    assert ruler.postprocess("  \x01 1234567\x02tail \n") == "1234567\ntail"
    assert ruler.score(ruler.TASKS["qa_1"], "zorn3", ["Zorn3", "the river Zorn3"]) == 1.0
    assert ruler.score(ruler.TASKS["niah_multivalue"], " 1, 2", ["1", "2", "3", "4"]) == 0.5
    assert [ruler.TASKS[t].metric for t in ("vt", "cwe", "fwe", "niah_single_1", "qa_2")] == \
        ["string_match_all"] * 4 + ["string_match_part"]


def test_stop_at_eos_or_a_newline_after_the_answer(sources):
    tok, _ = sources
    stop = ruler.Stop(tok)
    ids = tok.encode(" 1234567.\nMore text")
    first = next(i for i in range(len(ids)) if stop(ids[:i + 1]))
    assert tok.decode(ids[:first + 1]).rstrip("\n").endswith("1234567.")
    assert ruler.answer_text(tok, ids[:first + 1]) == " 1234567."
    lead = tok.encode("\n 42")
    assert not any(stop(lead[:i + 1]) for i in range(len(lead)))  # a newline before the answer does not stop it
    assert stop([5, tok.eos_id])


# ---- greedy decoding equals transformers' --------------------------------------------------------------

def test_greedy_batch_equals_transformers_generate(sources, files):
    transformers = pytest.importorskip("transformers")
    tok, src = sources
    ckpt = str(files / "ckpt")
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours = Llama.from_pretrained(ckpt)
    prompts = [ruler.make_sample(ruler.TASKS[t], tok, 300, i, 0, src)[0].ids
               for t, i in (("niah_single_1", 0), ("niah_multikey_2", 1), ("fwe", 0))]
    stop = ruler.Stop(tok)
    got = greedy_batch(ours, prompts, 20, stop, vocab=tok.vocab_size)
    for ids, mine in zip(prompts, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=0)
        theirs = out[0, len(ids):].tolist()
        end = next((i + 1 for i in range(len(theirs)) if stop(theirs[:i + 1])), len(theirs))  # our stop rule on theirs
        assert mine == theirs[:end]
    assert ours.cache is not None and ours.cache.tokens.shape == (3, 320)  # one batch of three


# ---- the command line ----------------------------------------------------------------------------------

def RULER(files, *extra):
    return ["ruler", *ON_CPU, "--model", str(files / "ckpt"), "--haystack", str(files / "hay.txt"), *extra]


def test_cli_json_table_samples_resume_and_report(files, tmp_path, capsys, monkeypatch):
    out, log = tmp_path / "r.json", tmp_path / "r.jsonl"
    args = RULER(files, "--tasks", "niah_single_2,cwe,qa_1", "--lengths", "1000,1200", "--samples", "3", "--batch-size",
                 "2", "--qa-file", str(files / "squad.json"), "--json", str(out), "--save-samples", str(log))
    ev.main(args)
    stdout = capsys.readouterr().out
    run = json.loads(out.read_text())
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert run["task"] == "ruler" and run["tasks"] == ["niah_single_2", "cwe", "qa_1"] and run["samples"] == 3
    assert len(lines) == 3 * 2 * 3
    tok = load_tokenizer(str(files / "ckpt"))
    for line in lines:  # each line audits itself: its prompt's length, its answer, its score
        assert len(line["input_ids"]) == line["length"] and line["output"] == ruler.answer_text(tok, line["output_ids"])
        assert line["score"] == ruler.score(ruler.TASKS[line["task"]], line["output"], line["answers"])
    r = run["results"][0]
    for t in run["tasks"]:
        for n in (1000, 1200):
            mine = [x["score"] for x in lines if x["task"] == t and x["length"] == n]
            assert r["scores"][t][str(n)] == pytest.approx(100 * sum(mine) / 3)
    assert r["average"]["1000"] == pytest.approx(sum(r["scores"][t]["1000"] for t in run["tasks"]) / 3)
    assert "| task \\ length | 1000 | 1200 |" in stdout and f"| cwe | {r['scores']['cwe']['1000']:.1f} |" in stdout

    # a run cut short: the last two lines lost, a third cut mid-line; --resume decodes only what is missing
    log.write_text("".join(x + "\n" for x in log.read_text().splitlines()[:-3]) + log.read_text().splitlines()[-3][:50])
    decoded = []
    real = ruler.greedy_batch
    monkeypatch.setattr(ruler, "greedy_batch",
                        lambda m, prompts, *a, **k: decoded.extend(prompts) or real(m, prompts, *a, **k))
    ev.main(args + ["--resume"])
    assert len(decoded) == 3 and json.loads(out.read_text())["results"][0]["scores"] == r["scores"]
    assert [json.loads(x)["index"] for x in log.read_text().splitlines()] == [x["index"] for x in lines]

    # two checkpoints side by side (here the same weights under another label and method)
    ev.main(RULER(files, "--tasks", "niah_single_2,cwe", "--lengths", "1000", "--samples", "2", "--label", "tuned",
                  "--rope", "yarn:4", "--json", str(tmp_path / "t.json")))
    capsys.readouterr()
    merged = report.report([str(out), str(tmp_path / "t.json")], str(tmp_path / "all.md"))
    table = (tmp_path / "all.md").read_text()
    assert len(merged) == 2 and "| task \\ length | 1000 A | 1000 B | 1200 A | 1200 B |" in table
    assert "B: tuned, yarn s=4 (L=64)" in table and "| qa_1 |" in table


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "niah_single_9", "--lengths", "700"], "unknown task 'niah_single_9'"),
    (["--tasks", "niah_single_1", "--lengths", "40"], "too short"),
    (["--tasks", "niah_single_2", "--lengths", "200000"], "haystack is too short"),
    (["--tasks", "qa_1", "--lengths", "700", "--qa-file", "bad.json"], "neither SQuAD JSON"),
    (["--tasks", "qa_1", "--lengths", "700", "--qa-file", "hay.txt"], "not JSON"),
    (["--tasks", "niah_single_1", "--lengths", "700", "--resume"], "--resume"),
    (["--tasks", "niah_single_1", "--lengths", "700", "--samples", "0"], "--samples"),
    (["--tasks", "niah_single_1", "--lengths", "700", "--save-samples", "bad.json"], "is not a samples file"),
    (["--tasks", "niah_single_1", "--lengths", "700", "--save-samples", "hay.txt"], "is an input of this command"),
])
def test_cli_errors(files, capsys, extra, message):
    extra = [str(files / x) if x.endswith((".txt", ".json")) else x for x in extra]
    err = one_line_exit_2("eval", RULER(files, *extra), capsys)
    assert message in err, err


def test_cli_needs_a_haystack_for_the_essay_tasks(files, capsys):
    err = one_line_exit_2("eval", ["ruler", *ON_CPU, "--model", str(files / "ckpt"), "--lengths", "700"], capsys)
    assert "--haystack FILE is needed by niah_single_2" in err
