"""
Tests of data/prepare.py and its libraries data/tokenizer.py and data/packed.py: tokenizing, packing, the
train/val split, block layout, and one-line errors. Small synthetic corpora, no network, a few seconds.

    python -m pytest tests/test_data.py -q
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # so `import data.packed` works however pytest is started
from data.packed import PackedData, read_meta  # noqa: E402
from data.prepare import main  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402

WORDS = ("the king queen crown sword night day love death speak hear what where when who thou thee "
         "my lord lady good ill fair foul come go stay hold 'tis o'er none 1599 2024 !? , . ; :").split()


def make_docs(n, seed=0):
    """n documents of a few hundred random words in lines: enough text for a 320-entry BPE."""
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(40)]
        docs.append(f"Document {d}\n\n" + "\n".join(lines) + "\n  indented  line, trailing space \n")
    return docs


def write_docs(folder, docs):
    """Each text as folder/doc{i}.txt; returns their {path: text}."""
    texts = {str(folder / f"doc{i}.txt"): text for i, text in enumerate(docs)}
    for path, text in texts.items():
        with open(path, "w") as f:
            f.write(text)
    return texts


@pytest.fixture
def corpus(tmp_path):
    """Six .txt documents; returns their {path: text}."""
    return write_docs(tmp_path, make_docs(6))


def prepared(tmp_path, corpus, *extra):
    out = str(tmp_path / "out")
    main(["--input", *corpus, "--out", out, "--train-tokenizer", "320", "--val-fraction", "0.3", *extra])
    return out


def test_meta_split_and_round_trip(tmp_path, corpus):
    out = prepared(tmp_path, corpus)
    meta = read_meta(out)
    assert (meta["dtype"], meta["vocab_size"], meta["bos_id"], meta["eos_id"]) == ("uint16", 320, 1, 2)
    assert meta["tokenizer"] == "tokenizer.model"
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]  # no .tmp left

    # split by document: every document in exactly one split, round(6 * 0.3) = 2 of them in val
    train, val = meta["train"]["names"], meta["val"]["names"]
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == sorted(corpus)

    tok = load_tokenizer(out)
    for split in ("train", "val"):
        data = PackedData(out, split)
        spans = meta[split]["docs"]
        # spans tile the .bin file: contiguous, from 0 to the token count
        assert spans[0][0] == 0 and spans[-1][1] == len(data) == meta[split]["tokens"]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        for name, ids in data.documents():
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]  # EOS ends each document, only there
            assert tok.decode(ids[:-1]) == corpus[name]  # whitespace, digits and punctuation all survive
            assert tok.encode(corpus[name]) == ids[:-1].tolist()


def test_block_layout(tmp_path, corpus):
    data = PackedData(prepared(tmp_path, corpus), "train")
    T = 64
    n = data.num_blocks(T)
    assert n == len(data) // T and n > 2
    blocks = [data.block(i, T) for i in range(n)]
    assert all(b.dtype == torch.long and len(b) == T + 1 for b in blocks)
    assert all(b[0].item() == data.bos_id for b in blocks)  # every block opens with BOS
    # after the BOS, blocks are consecutive slices of the packed stream: nothing skipped or repeated
    stream = np.concatenate([b[1:].numpy() for b in blocks])
    assert np.array_equal(stream, data.tokens[: n * T])
    with pytest.raises(IndexError):
        data.block(n, T)


def assert_same_files(a, b, names=("train.bin", "val.bin", "meta.json", "tokenizer.model")):
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def test_deterministic(tmp_path, corpus):
    assert_same_files(prepared(tmp_path / "a", corpus), prepared(tmp_path / "b", corpus))


def test_jsonl_and_directory(tmp_path):
    docs = make_docs(5)
    jsonl = tmp_path / "docs.jsonl"
    lines = [json.dumps({"body": docs[0]}), "", json.dumps({"body": docs[1], "id": 7})]
    jsonl.write_text("\n".join(lines) + "\n")
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "b.txt").write_text(docs[2])
    (tmp_path / "dir" / "sub" / "a.txt").write_text(docs[3])
    (tmp_path / "dir" / "a.txt").write_text(docs[4])
    (tmp_path / "dir" / "skip.md").write_text("not a .txt file")
    out = str(tmp_path / "out")
    main(["--input", str(jsonl), str(tmp_path / "dir"), "--out", out, "--train-tokenizer", "320",
          "--text-key", "body", "--val-fraction", "0"])
    meta = read_meta(out)
    d = str(tmp_path / "dir")
    # jsonl documents are named path:line (the blank line 2 is skipped); directories are walked in sorted order
    expected = [f"{jsonl}:1", f"{jsonl}:3", f"{d}/a.txt", f"{d}/b.txt", f"{d}/sub/a.txt"]
    assert meta["train"]["names"] == expected and meta["val"] == {"tokens": 0, "docs": [], "names": []}
    tok = load_tokenizer(out)
    got = {name: tok.decode(ids[:-1]) for name, ids in PackedData(out, "train").documents()}
    assert [got[n] for n in expected] == [docs[0], docs[1], docs[4], docs[2], docs[3]]
    assert len(PackedData(out, "val")) == 0


def test_hf_tokenizer_json_without_bos(tmp_path, corpus):
    tokenizers = pytest.importorskip("tokenizers")
    # a small byte-level BPE, like Llama 3's, with an EOS token but no BOS token
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus.values(), trainer)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tok.save(str(ckpt / "tokenizer.json"))

    loaded = load_tokenizer(str(ckpt))
    eos = tok.token_to_id("<|endoftext|>")
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (-1, eos, tok.get_vocab_size())
    text = next(iter(corpus.values()))
    assert loaded.decode(loaded.encode(text)) == text

    out = str(tmp_path / "out")
    main(["--input", *corpus, "--out", out, "--tokenizer", str(ckpt)])
    meta = read_meta(out)
    assert (meta["tokenizer"], meta["bos_id"], meta["eos_id"]) == ("tokenizer.json", -1, eos)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))  # copied: the folder stands alone
    # without BOS a block is seq_len + 1 consecutive tokens, and the next block starts seq_len later
    data, T = PackedData(out, "train"), 50
    assert data.num_blocks(T) == (len(data) - 1) // T
    for i in range(data.num_blocks(T)):
        assert np.array_equal(data.block(i, T).numpy(), data.tokens[i * T : (i + 1) * T + 1])

    # a checkpoint's config.json names EOS; a list of EOS ids (Llama 3.1 instruct) gives the first. The BOS it
    # names is not added: this tokenizer's post-processor adds none, and transformers adds none (SmolLM2, #27)
    (ckpt / "config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": [7, 8]}))
    assert (load_tokenizer(str(ckpt / "tokenizer.json")).bos_id, load_tokenizer(str(ckpt)).eos_id) == (-1, 7)


def test_uint32_for_large_vocab(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    # 70k words: ids above 65535 must survive, so the .bin files switch to uint32
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["</s>"] = 70_000
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "doc.txt").write_text("w1 w65535 w69999")
    out = str(tmp_path / "out")
    main(["--input", str(tmp_path / "doc.txt"), "--out", out, "--tokenizer", str(tmp_path / "tokenizer.json")])
    assert read_meta(out)["dtype"] == "uint32"
    assert PackedData(out, "train").tokens.tolist() == [1, 65535, 69999, 70_000]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer files
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    (tmp_path / "tokenizer.model").write_text("not a model")
    with pytest.raises(ValueError):
        load_tokenizer(str(tmp_path))


def test_stale_or_missing_data(tmp_path, corpus):
    with pytest.raises(FileNotFoundError):
        read_meta(str(tmp_path))
    out = prepared(tmp_path, corpus)
    with open(os.path.join(out, "train.bin"), "r+b") as f:
        f.truncate(10)  # a .bin that does not match meta.json must not be read as if it did
    with pytest.raises(ValueError):
        PackedData(out, "train")


def run_prepare(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", "prepare.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_bad_inputs_are_one_line_errors(tmp_path, corpus):
    doc = next(iter(corpus))
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (tmp_path / "nodocs").mkdir()
    out = str(tmp_path / "out")
    cases = [
        ["--input", str(tmp_path / "missing.txt"), "--out", out, "--train-tokenizer", "320"],
        ["--input", str(tmp_path / "empty.txt"), "--out", out, "--train-tokenizer", "320"],
        ["--input", str(tmp_path / "nodocs"), "--out", out, "--train-tokenizer", "320"],
        ["--input", str(tmp_path / "bad.jsonl"), "--out", out, "--train-tokenizer", "320"],
        ["--input", doc, "--out", out, "--tokenizer", str(tmp_path / "missing.model")],
        ["--input", doc, "--out", out, "--train-tokenizer", "100000"],  # more than the corpus can give
    ]
    for args in cases:
        r = run_prepare(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not os.path.exists(os.path.join(out, "meta.json"))
    # a failed run over a prepared folder leaves it as it was
    prepared(tmp_path, corpus)
    assert run_prepare("--input", doc, "--out", out, "--train-tokenizer", "100000").returncode == 2
    assert run_prepare("--input", doc, "--out", out, "--tokenizer", str(tmp_path / "missing.model")).returncode == 2
    assert len(PackedData(out, "train")) > 0


def test_min_tokens_leaves_out_short_documents(tmp_path, capsys):
    texts = write_docs(tmp_path, [t if i % 2 else "\n".join(t.splitlines()[:6]) for i, t in enumerate(make_docs(8))])
    everything = prepared(tmp_path / "all", texts)
    tok = load_tokenizer(everything)  # the same tokenizer either way: trained on the same training documents
    count = {path: len(tok.encode(text)) for path, text in texts.items()}
    n = sorted(count.values())[4]  # the shortest long document, exactly: kept (fewer than N tokens go)
    capsys.readouterr()
    long_only = prepared(tmp_path / "long", texts, "--min-tokens", str(n))
    out = capsys.readouterr().out
    meta, full = read_meta(long_only), read_meta(everything)
    for split in ("train", "val"):
        # the split is made first: the documents kept are those of the full split with N tokens or more
        assert meta[split]["names"] == [p for p in full[split]["names"] if count[p] >= n]
        data = PackedData(long_only, split)
        for name, ids in data.documents():
            assert ids[:-1].tolist() == tok.encode(texts[name])
    dropped = {s: len(full[s]["names"]) - len(meta[s]["names"]) for s in ("train", "val")}
    assert sum(dropped.values()) == 4 and all(dropped.values())
    assert f"--min-tokens {n}: left out {dropped['train']} train and {dropped['val']} val docs of fewer tokens" in out
    assert_same_files(everything, long_only, ["tokenizer.model"])
    # none long enough: one line, exit code 2
    with pytest.raises(SystemExit) as e:
        prepared(tmp_path / "none", texts, "--min-tokens", str(max(count.values()) + 1))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: every document is shorter than") and err.count("\n") == 1


def test_workers_write_the_same_bytes(tmp_path, monkeypatch):
    import data.packed
    monkeypatch.setattr(data.packed, "CHUNK_CHARS", 3000)  # several chunks a worker, more than are let in flight
    texts = write_docs(tmp_path, [text * (1 + i % 3) for i, text in enumerate(make_docs(12))])
    one = prepared(tmp_path / "one", texts, "--min-tokens", "1000")
    two = prepared(tmp_path / "two", texts, "--min-tokens", "1000", "--workers", "2")
    assert 0 < len(read_meta(one)["train"]["names"]) < 8  # some documents are left out, in both
    assert_same_files(one, two)


def test_parquet_reads_as_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    docs = make_docs(7)
    docs[3] = "  \n"  # an empty document: skipped, as in .jsonl
    pq.write_table(pa.table({"id": list(range(7)), "body": docs}), str(tmp_path / "docs.parquet"),
                   row_group_size=2)  # four row groups, read one at a time
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    outs = {}
    for kind in ("parquet", "jsonl"):
        outs[kind] = str(tmp_path / kind)
        main(["--input", str(tmp_path / f"docs.{kind}"), "--out", outs[kind], "--train-tokenizer", "320",
              "--text-key", "body", "--val-fraction", "0.3"])
    assert_same_files(outs["parquet"], outs["jsonl"], ["train.bin", "val.bin", "tokenizer.model"])
    numbers = lambda kind: {s: [int(name.rsplit(":", 1)[1]) for name in read_meta(outs[kind])[s]["names"]]
                            for s in ("train", "val")}
    rows, lines = numbers("parquet"), numbers("jsonl")
    assert sorted(rows["train"] + rows["val"]) == [0, 1, 2, 4, 5, 6]  # named path:row, rows from 0; row 3 was empty
    assert lines == {s: [r + 1 for r in rows[s]] for s in rows}  # the same documents in each split (lines from 1)
    with pytest.raises(SystemExit) as e:  # the default --text-key "text" is not a column here
        main(["--input", str(tmp_path / "docs.parquet"), "--out", str(tmp_path / "x"), "--train-tokenizer", "320"])
    assert e.value.code == 2


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed: `import pyarrow` fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "docs.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "docs.parquet"), "--out", str(tmp_path / "out"), "--train-tokenizer", "320"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "pip install pyarrow" in err
