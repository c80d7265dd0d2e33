"""bench/passkey_learning.py: its copy measurements on models whose answer is known, and a 2-step run.

    python -m pytest tests/test_passkey_learning.py -q
"""

import json
import random

import pytest

from bench import passkey_learning as pl
from data.passkey import passkey_document
from data.prepare import main as prepare_data
from rope import RopeConfig
from tests.helpers import WordTokenizer, copy_model, tiny_model, write_verse  # noqa: E402

LINES = ["the king is dead", "long live the queen", "what thou hear", "good night my lord"] * 10


def documents(n, filler=(0, 6)):
    rng = random.Random(3)
    return [passkey_document(rng, LINES, rng.randint(*filler)) for _ in range(n)]


def test_copy_accuracy_is_1_for_a_copying_model_and_about_0_for_a_random_one():
    tok = WordTokenizer()  # a number is one token, so the hand-built copier answers every key
    docs = documents(10)
    assert list(pl.copy_accuracy(copy_model(tok), tok, docs)) == [1.0, 1.0, 1.0]
    rope = RopeConfig(theta=1e6, head_dim=16, original_max_position_embeddings=4096)
    assert max(pl.copy_accuracy(tiny_model(rope, vocab=tok.vocab_size), tok, docs)) <= 0.1


@pytest.mark.parametrize("share", ["0.5", "1"])
def test_two_steps_write_the_log(tmp_path, share):
    write_verse(tmp_path / "txt", 4, 300)
    prepare_data(["--input", str(tmp_path / "txt"), "--out", str(tmp_path / "data"), "--train-tokenizer", "300",
                  "--val-fraction", "0.25"])
    out = tmp_path / "log.json"
    pl.main(["--data", str(tmp_path / "data"), "--seq-len", "256", "--n-layer", "1", "--n-embd", "32",
             "--n-head", "2", "--n-kv-head", "1", "--steps", "2", "--every", "1", "--batch", "2",
             "--passkey-share", share, "--probe-docs", "3", "--trials", "1", "--json", str(out)])
    log = json.load(open(out))["log"]
    assert [r["step"] for r in log] == [1, 2] and [r["tokens"] for r in log] == [512, 1024]
    for r in log:
        assert all(0 <= r[k] <= 1 for k in ("repeat", "first", "answer", "eval_at_L")) and r["loss"] > 0
        assert set(r["eval_at_L_by_depth"]) == {"0", "0.5", "1"}
