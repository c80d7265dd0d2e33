"""
What the test modules share: tiny checkpoints and corpora, the way to run train.py (one process or under
torchrun, on CPU), the argument lists of the hostile-input cases, and small models built by hand. The
fixtures built from these are in conftest.py; a test module imports from here, never from another test.
"""

import errno
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from data import passkey, prepare  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402
from rope import RopeConfig  # noqa: E402

L = 64  # the tiny checkpoints' original context; --yarn-scale 2 trains at s*L = 128
VOCAB = 320  # the tests' sentencepiece vocabulary

# a few steps of YaRN fine-tuning, with a learning rate large enough to see the loss fall
FINETUNE = ["--yarn-scale", "2", "--steps", "6", "--batch-size", "4", "--lr", "3e-3", "--warmup", "2"]


def write_verse(folder, docs, lines):
    """`docs` text files of `lines` lines of random verse each in `folder`: the same on every run."""
    words = "the king queen crown sword night day love death speak hear what thou thee my lord good ill".split()
    rng = random.Random(0)
    os.makedirs(folder)
    for i in range(docs):
        text = (" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(lines))
        with open(os.path.join(folder, f"doc{i}.txt"), "w") as f:
            f.write("\n".join(text))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args, nproc=None, env=None, crash_after_step=None):
    """train.py under torchrun with nproc CPU processes, or as a plain `python train.py` (nproc None).
    On CPU even where there is a GPU: these are tests of the CPU path. crash_after_step: rank 0 is
    killed by SIGKILL right after saving the checkpoint of that step (tests/crash_after_checkpoint.py)."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port())] if nproc else [sys.executable])
    script = [os.path.join(ROOT, "train.py")] if crash_after_step is None else \
        [os.path.join(ROOT, "tests", "crash_after_checkpoint.py"), str(crash_after_step)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(launch + script + [str(a) for a in args], capture_output=True, text=True, env=env,
                          timeout=300)


def losses(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def digest(root):
    """{relative path: sha1} of every file under root: what a failed command must leave as it was."""
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            p = os.path.join(folder, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha1(f.read()).hexdigest()
    return out


def ckpt_weights(e, t, change):
    """A copy of the good checkpoint whose model.safetensors went through change(dict of tensors)."""
    from safetensors.torch import load_file, save_file
    c = t / "ckpt"
    shutil.copytree(e.ckpt, c)
    save_file(change(load_file(c / "model.safetensors")), c / "model.safetensors", metadata={"format": "pt"})
    return str(c)


def TRAIN(e, t, *extra, init=None, data=None, out=None):
    return ["--init", init or e.ckpt, "--data", data or e.data, "--out", out or str(t / "out"), "--steps", "1",
            "--batch-size", "1", *extra]


def SCRATCH(e, t, *extra, data=None):
    return TRAIN(e, t, "--seq-len", "64", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", *extra, init="scratch",
                 data=data)


def SAMPLE(model, *extra):
    return ["--model", model, "--prompt", "the king", "--max-new-tokens", "2", "--ctx", "64", *extra]


def PPL(e, *extra, model=None, data=None):
    return ["ppl", "--model", model or e.ckpt, "--data", data or e.text, "--lengths", "8", *extra]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def logits_for_length(m, idx, rope_len):
    """m(idx) with dynamic methods scaled for a text rope_len long, not idx's own length: what a KV cache
    whose scale was set for rope_len computes. (A plain forward reads its tables for its own length from
    m.rope_tables; here that one call is pointed at rope_len instead.)"""
    tables = m.rope_tables
    m.rope_tables = lambda length, device: tables(rope_len, device)
    try:
        return m(idx)
    finally:
        del m.rope_tables


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run, by name (what forward and backward really compute)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def tiny_model(rope=None, vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      rope=rope or RopeConfig(head_dim=16, original_max_position_embeddings=L))
    model = Llama(cfg)
    model.init_weights(std=0.05)
    return model.eval()


class WordTokenizer:
    """Words and punctuation are tokens, and each 5-digit number is a single token (ids num0 + n - 10000)."""

    def __init__(self):
        words = sorted(set(re.findall(r"[A-Za-z]+|[^\w\s]", passkey.passkey_text(1, 0.5, 12345))))
        self.words = ["<unk>", "<s>", "</s>"] + words
        self.index = {w: i for i, w in enumerate(self.words)}
        self.bos_id, self.eos_id, self.num0 = 1, 2, len(self.words)
        self.vocab_size = self.num0 + 90000

    def encode(self, text):
        return [self.num0 + int(t) - 10000 if t.isdigit() else self.index.get(t, 0)
                for t in re.findall(r"\d+|[A-Za-z]+|[^\w\s]", text)]

    def decode(self, ids):
        return " ".join(str(i - self.num0 + 10000) if i >= self.num0 else self.words[i] for i in ids if i > 2)


def copy_model(tok, C=64, H=4):
    """A one-layer Llama built by hand to answer the passkey: every head attends to the number tokens
    (the key, written twice) and copies their identity to the output.
    Residual stream: dim 0 = "is a number", dim 1 = 1 for every token, dims 2.. = a random unit code per token.
    Query = dim 1 and key = dim 0, both in RoPE's slowest pair (D/2 - 1) where, with theta = 1e6, positions
    barely rotate them: so the score is large for numbers and 0 for everything else. Values carry the
    code; o_proj adds 50x the key's code to the stream; lm_head reads codes back, so the key wins."""
    D, V = C // H, tok.vocab_size
    model = Llama(LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=8, num_hidden_layers=1,
                              num_attention_heads=H, num_key_value_heads=H, bos_token_id=1, eos_token_id=2,
                              rope=RopeConfig(theta=1e6, head_dim=D, original_max_position_embeddings=4096)))
    code = torch.randn(V, C - 2, generator=torch.Generator().manual_seed(0))
    code /= code.norm(dim=1, keepdim=True)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 0] = (torch.arange(V) >= tok.num0).float()
        emb[:, 1] = 1.0
        emb[:, 2:] = code
        attn = model.model.layers[0].self_attn
        for h in range(H):
            attn.q_proj.weight[h * D + D // 2 - 1, 1] = 4.0
            attn.k_proj.weight[h * D + D // 2 - 1, 0] = 4.0
        for i in range(C - 2):
            attn.v_proj.weight[i, 2 + i] = 1.0
            attn.o_proj.weight[2 + i, i] = 50.0
        model.lm_head.weight[:, 2:] = code  # the MLP stays zero: it adds nothing
    return model.eval()


def tiny_checkpoint(path, vocab=VOCAB, tokenizer=None, seed=0, layers=2, kv=2, **config):
    """A random tiny Llama (width 64, 4 heads over `kv` KV heads, L = 64) saved at `path`, with a copy of
    `tokenizer` beside it if given; `config`: other LlamaConfig fields (a Qwen3: model_type, qk_norm, head_dim)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv,
                      rope=RopeConfig(head_dim=16, original_max_position_embeddings=L), **config)
    model = Llama(cfg)
    model.init_weights()
    model.save_pretrained(str(path))
    if tokenizer:
        shutil.copy(tokenizer, path)
    return path


COMMANDS = {"train": train.main, "sample": sample.main, "eval": ev.main, "prepare": prepare.main}


def one_line_exit_2(command, argv, capsys, after_progress=False):
    """Run a command in this process; it must exit 2 with one line on stderr and no warning. A failure in
    the middle of training comes after the progress the run printed (after_progress): then the error is
    the last line, one line, and nothing else on stderr is an error, a warning or a traceback."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as e:
            COMMANDS[command](argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert not caught, [str(w.message) for w in caught]  # a warning would be a second line on stderr
    assert "Traceback" not in err and err.endswith("\n"), err
    if after_progress:
        *progress, err = err.splitlines(keepends=True)
        assert not any(w in line.lower() for line in progress for w in ("error", "warning")), progress
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err
