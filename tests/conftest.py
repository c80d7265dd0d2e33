"""
The fixtures the test modules share (pytest finds them here): `work`, a prepared corpus and a random tiny
checkpoint for the training tests; `env`, the same plus a deep checkpoint and a resumable run, for the
hostile-input tests. Each is built once per module that asks for it.
"""

import shutil
import types

import pytest

import train
from data.prepare import main as prepare_data
from tests.helpers import VOCAB, digest, tiny_checkpoint, write_verse


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus of random verse, prepared with a 320-token sentencepiece, and a random tiny checkpoint."""
    d = tmp_path_factory.mktemp("train")
    write_verse(d / "corpus", 8, 200)
    prepare_data(["--input", str(d / "corpus"), "--out", str(d / "data"), "--train-tokenizer", "320",
                  "--val-fraction", "0.25"])
    tiny_checkpoint(d / "ckpt", 320, d / "data" / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A prepared corpus (320-token sentencepiece), a random tiny checkpoint with that tokenizer, a deep
    one (64 layers: its KV cache at 2^24 tokens exceeds any machine), and a resumable 1-step run."""
    d = tmp_path_factory.mktemp("hostile")
    write_verse(d / "corpus", 6, 150)
    prepare_data(["--input", str(d / "corpus"), "--out", str(d / "data"), "--train-tokenizer", str(VOCAB),
                  "--val-fraction", "0.3"])
    tiny_checkpoint(d / "ckpt")
    shutil.copy(d / "data" / "tokenizer.model", d / "ckpt")
    tiny_checkpoint(d / "deep", layers=64, kv=4)
    shutil.copy(d / "data" / "tokenizer.model", d / "deep")
    train.main(["--init", str(d / "ckpt"), "--data", str(d / "data"), "--out", str(d / "run"), "--yarn-scale", "2", "--device", "cpu",
                "--steps", "1", "--batch-size", "1", "--save-every", "1", "--warmup", "0"])
    (d / "text.txt").write_text("the king speaks of love and death\n")
    e = types.SimpleNamespace(root=d, data=str(d / "data"), ckpt=str(d / "ckpt"), deep=str(d / "deep"),
                              run=str(d / "run"), text=str(d / "text.txt"))
    e.before = digest(d)
    return e

