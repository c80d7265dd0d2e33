"""
Tests of sample.py and generation.py: cached decoding equals full forward passes (static and dynamic
RoPE, across the original length L), chunked prefill equals one pass, the sampler's filters, the command
line, and its one-line errors. Tiny random models, a few seconds each.

    python -m pytest tests/test_sample.py -q
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import generation  # noqa: E402
import sample  # noqa: E402
from support.common import UserError, rope_config  # noqa: E402
from data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402
from rope import RopeConfig  # noqa: E402
from tests.helpers import logits_for_length  # noqa: E402

L = 32  # original context of the test models: prompts of 20 tokens + 30 new ones cross it
ON_CPU = ["--device", "cpu", "--dtype", "float32"]  # the command line's defaults are CUDA and bf16 where there is a GPU


def tiny_model(method="none", factor=1.0, vocab=300, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      rope=RopeConfig(method=method, factor=factor, head_dim=16, original_max_position_embeddings=L))
    model = Llama(cfg)
    model.init_weights(std=0.05)  # larger than the default: clear argmax gaps, so greedy paths are stable
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint with a 300-entry sentencepiece tokenizer in it."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    text = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7919 % 1000} times."
                     for i in range(400))
    tiny_model().save_pretrained(str(path))
    (path / "tokenizer.model").write_bytes(train_tokenizer([("t", lambda: text)], 300))
    return str(path)


# ---- the KV cache path equals full forward passes ---------------------------------------------------

def reference_greedy(model, prompt, n, rope_lens=None):
    """Greedy decoding by full causal forward passes over the whole text, no cache."""
    seq = list(prompt)
    logits = []
    for i in range(n):
        rope_len = rope_lens[i] if rope_lens else len(seq)
        out = logits_for_length(model, torch.tensor([seq]), rope_len)[0, -1]
        logits.append(out)
        seq.append(int(out.argmax()))
    return seq[len(prompt):], logits


@pytest.mark.parametrize("method,factor", [("yarn", 4.0), ("dynamic-yarn", 1.0), ("dynamic-ntk", 2.0)])
def test_cached_greedy_equals_full_forward(method, factor):
    model = tiny_model(method, factor)
    prompt = torch.randint(3, 300, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    want, want_logits = reference_greedy(model, prompt, 30)

    # dynamic_growth=1: the dynamic scale follows the length at every token, as a full forward does
    model.setup_cache(1, 64, dynamic_growth=1)
    got_logits = []
    got, _ = generation.generate(model, prompt, 30, temperature=0.0, on_token=lambda t, lg: got_logits.append(lg.clone()))
    assert got == want
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["dynamic-yarn", "dynamic-ntk"])
def test_cached_decoding_with_default_growth_matches_its_rope_len(method):
    """With the default geometric growth the scale is that of model.cache.rope_len (>= the length):
    every step must equal a full forward pass at that rope_len."""
    model = tiny_model(method, 2.0)
    prompt = torch.randint(3, 300, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    model.setup_cache(1, 64)  # dynamic_growth 1.25
    steps = []
    new, _ = generation.generate(model, prompt, 30,
                             on_token=lambda t, lg: steps.append((t, lg.clone(), model.cache.rope_len)))
    rope_lens = [r for _, _, r in steps]
    assert len(set(rope_lens)) > 2 and max(rope_lens) > L  # the text crossed L and the scale moved
    for i, (token, logits, rope_len) in enumerate(steps):
        seq = prompt + new[:i]
        full = logits_for_length(model, torch.tensor([seq]), rope_len)[0, -1]
        torch.testing.assert_close(logits, full, atol=2e-5, rtol=1e-4)
        assert token == int(full.argmax())


@pytest.mark.parametrize("method", ["none", "dynamic-yarn"])
def test_chunked_prefill_equals_one_pass(method):
    model = tiny_model(method)
    prompt = torch.randint(3, 300, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    model.setup_cache(1, 128)
    first = []
    generation.generate(model, prompt, 1, chunk_size=16, on_token=lambda t, lg: first.append(lg))  # 7 chunks
    full = logits_for_length(model, torch.tensor([prompt]), model.cache.rope_len)[0, -1]
    torch.testing.assert_close(first[0], full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method,factor", [("yarn", 4.0), ("dynamic-yarn", 1.0)])
def test_fixed_shape_decode_step_equals_the_cached_forward(method, factor):
    """model.decode_step (the whole cache, masked) gives the logits of the growing-slice path, also
    while a dynamic method's scale moves (its RoPE state is in buffers, rewritten in place)."""
    model = tiny_model(method, factor)
    prompt = torch.randint(3, 300, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    runs = []
    for step in (None, model.decode_step):
        model.setup_cache(1, 64)
        logits = []
        new, _ = generation.generate(model, prompt, 40, on_token=lambda t, lg: logits.append(lg.clone()), decode_step=step)
        runs.append((new, logits, model.cache.rope_len))
    (want, want_logits, want_len), (got, got_logits, got_len) = runs
    assert got == want and got_len == want_len and (method == "yarn" or got_len > L)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_generation_stops_at_eos_and_when_the_cache_is_full():
    model = tiny_model()
    prompt = [5, 6, 7]
    greedy, _ = generation.generate(model, prompt, 10)
    model.cache = None
    stopped, _ = generation.generate(model, prompt, 10, eos_id=greedy[3])
    assert stopped == greedy[:greedy.index(greedy[3]) + 1]
    model.setup_cache(1, 6)  # 3 prompt tokens + 3 fed back: 4 new tokens fit
    full, timing = generation.generate(model, prompt, 10)
    assert full == greedy[:4] and timing.new_tokens == 4 and timing.prompt_tokens == 3
    with pytest.raises(ValueError, match="more than"):
        generation.generate(model, list(range(3, 10)), 1)


# ---- the sampler ---------------------------------------------------------------------------------------

def test_sample_token_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)

    def support(**kw):
        return {generation.sample_token(logits, generator=g, **kw) for _ in range(300)}

    assert generation.sample_token(logits, 0.0) == 0
    assert support(temperature=1.0) == {0, 1, 2, 3}
    assert support(temperature=1.0, top_k=2) == {0, 1}
    assert support(temperature=1.0, top_p=0.5) == {0}          # 0.5 alone reaches p
    assert support(temperature=1.0, top_p=0.6) == {0, 1}
    assert support(temperature=1.0, top_p=0.9) == {0, 1, 2}
    assert support(temperature=1.0, top_k=3, top_p=0.6) == {0, 1}
    a = [generation.sample_token(logits, 1.0, generator=torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [generation.sample_token(logits, 1.0, generator=torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b  # the seed decides
    for bad in [dict(temperature=-1, top_k=0, top_p=1), dict(temperature=1, top_k=-1, top_p=1),
                dict(temperature=1, top_k=0, top_p=0), dict(temperature=1, top_k=0, top_p=1.5)]:
        with pytest.raises(UserError):
            generation.check_sampling(**bad)


def test_rope_config_override():
    base = RopeConfig(method="yarn", factor=16, head_dim=16, original_max_position_embeddings=4096,
                      attention_factor=1.5)
    assert rope_config(base) is base
    assert rope_config(base, "model", 32).factor == 32
    assert rope_config(base, "none").method == "none"
    linear = rope_config(base, "linear", None, target_len=16384)
    assert (linear.method, linear.factor, linear.attention_factor) == ("linear", 4.0, None)
    assert rope_config(base, "dynamic-yarn", None, 16384).factor == 1.0
    with pytest.raises(UserError):
        rope_config(base, "rotary")
    with pytest.raises(UserError):
        rope_config(base.replace(method="none", factor=1.0, attention_factor=None), "model", 2.0)


# ---- command line ----------------------------------------------------------------------------------------

def test_cli_streams_greedy_text(checkpoint, capsys):
    sample.main(["--model", checkpoint, "--ctx", "100", "--prompt", "the quick brown", "--temperature", "0",
                 "--max-new-tokens", "12", "--rope", "dynamic-yarn", "--prefill-chunk", "2", *ON_CPU])
    out, err = capsys.readouterr()
    tok = load_tokenizer(checkpoint)
    model = Llama.from_pretrained(checkpoint)
    model.set_rope(rope_config(model.config.rope, "dynamic-yarn"))
    ids = [tok.bos_id] + tok.encode("the quick brown")
    new, _ = generation.generate(model, ids, 12, eos_id=tok.eos_id)
    assert out == tok.decode(new) + "\n"
    assert "KV cache: 100 tokens" in err and "dynamic-yarn" in err and "tok/s" in err and "peak memory" in err
    # dynamic YaRN scales with the text: --ctx 100 > L = 32 is what it is for, no note; where L comes from is said
    assert "exceeds" not in err and "note: L = 32, the max_position_embeddings of config.json" in err
    # a static method noted past its s*L, naming L and s in force (the override's, not the checkpoint's)
    sample.main(["--model", checkpoint, "--ctx", "100", "--prompt", "the quick brown", "--temperature", "0",
                 "--max-new-tokens", "2", "--rope", "yarn", "--rope-factor", "2", *ON_CPU])
    err = capsys.readouterr().err
    assert "--ctx 100 exceeds the 64 tokens that yarn s=2 (L=32) reaches" in err
    # without --ctx the cache is s*L of the method in force
    sample.main(["--model", checkpoint, "--prompt", "the quick brown", "--temperature", "0",
                 "--max-new-tokens", "2", "--rope", "yarn", "--rope-factor", "4", *ON_CPU])
    err = capsys.readouterr().err
    assert "KV cache: 128 tokens" in err and "exceeds" not in err


def test_cli_compiled_decoding_gives_the_eager_tokens(checkpoint, capsys):
    """--compile: the fixed-shape step through torch.compile (inductor on a CPU) writes the same text,
    with a dynamic method whose scale moves on the way (L = 32, 40 new tokens)."""
    args = ["--model", checkpoint, "--ctx", "100", "--prompt", "the quick brown", "--temperature", "0",
            "--max-new-tokens", "40", "--rope", "dynamic-yarn", *ON_CPU]
    sample.main(args)
    eager = capsys.readouterr().out
    sample.main(args + ["--compile"])
    out, err = capsys.readouterr()
    assert out == eager and "compiled the decode step" in err


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--rope", "rotary"], "unknown RoPE method"),
    (["--rope", "yarn", "--rope-factor", "0.5"], "factor must be >= 1"),
    (["--ctx", "3", "--prompt", "the quick brown fox jumps"], "longer than --ctx 3"),
    (["--prompt-file", "EMPTY"], "is empty"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "not found"),
])
def test_cli_errors(checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text(" \n")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", checkpoint, "--ctx", "64", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1 and message in err


def test_cli_errors_in_a_real_process(checkpoint, tmp_path):
    """Missing model and missing tokenizer, as a user sees them: exit 2, one line, no traceback."""
    no_tok = tmp_path / "no-tokenizer"
    tiny_model().save_pretrained(str(no_tok))
    cases = [(["--model", str(tmp_path / "nope")], "checkpoint directory not found"),
             (["--model", str(no_tok)], "tokenizer"),
             (["--model", checkpoint, "--temperature", "nan"], "--temperature")]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), *a, "--prompt", "hi"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for a, _ in cases]
    for p, (_, message) in zip(procs, cases):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err and message in err
