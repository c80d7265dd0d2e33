"""model.py: Hugging Face checkpoints in and out, parity with transformers, chunked loss, KV cache.

    python -m pytest tests/test_model.py -q
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import model as model_mod
from model import Llama, LlamaConfig
from support.checkpoint import CheckpointError
from rope import RopeConfig
from tests.helpers import OpCounter, logits_for_length  # noqa: E402

L = 32  # the tiny models' original context
LONGROPE = {"short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.7],  # per-pair divisors, 8 pairs: head_dim 16
            "long_factor": [1.0, 1.3, 2.0, 2.9, 4.1, 5.6, 7.2, 8.5]}


def tiny(method="none", factor=1.0, tied=False, kv=2, vocab=97, layers=2, seed=0, **rope_kw):
    torch.manual_seed(seed)
    rope = RopeConfig(method=method, factor=factor, head_dim=16, original_max_position_embeddings=L, **rope_kw)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=tied, rope=rope)
    m = Llama(cfg)
    m.init_weights(std=0.2)  # larger than usual so that positions visibly matter in the logits
    return m.eval()


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- save / load ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method,factor", [("none", 1.0), ("yarn", 8.0), ("dynamic-yarn", 4.0), ("ntk", 4.0),
                                           ("longrope", 8.0)])
def test_round_trip_is_exact(tmp_path, tied, method, factor):
    m = tiny(method, factor, tied=tied, **(LONGROPE if method == "longrope" else {}))
    m.save_pretrained(tmp_path / "ckpt")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == ["config.json", "model.safetensors"]
    from safetensors import safe_open
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) != tied
    back = Llama.from_pretrained(tmp_path / "ckpt")
    assert same_state(m, back)
    if method == "ntk":  # static NTK has no rope type anywhere: it is saved as plain RoPE at the new base
        assert back.config.rope.method == "none" and back.config.context_length == m.config.context_length
    else:
        assert back.config == m.config
    if tied:
        assert back.lm_head.weight is back.model.embed_tokens.weight
    idx = torch.randint(0, 97, (2, 50))
    assert torch.equal(m(idx), back(idx))


def test_sharded_round_trip(tmp_path):
    m = tiny("yarn", 4.0)
    m.save_pretrained(tmp_path / "c", max_shard_bytes=40_000)
    files = os.listdir(tmp_path / "c")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.load(open(tmp_path / "c" / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(m.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in m.state_dict().values())
    assert same_state(m, Llama.from_pretrained(tmp_path / "c"))


def test_config_json_per_method(tmp_path):
    for method, rs, max_pos in [("yarn", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": L}, 8 * L),
                                ("linear", {"rope_type": "linear", "factor": 8.0}, L),
                                ("dynamic-ntk", {"rope_type": "dynamic", "factor": 8.0}, L),
                                ("none", None, L)]:
        tiny(method, 8.0 if method != "none" else 1.0).save_pretrained(tmp_path / method)
        hf = json.load(open(tmp_path / method / "config.json"))
        assert hf["rope_scaling"] == rs and hf["max_position_embeddings"] == max_pos
        assert hf["model_type"] == "llama" and hf["torch_dtype"] == "float32" and hf["head_dim"] == 16


def test_dtype_and_rope_override_on_load(tmp_path):
    tiny("none").save_pretrained(tmp_path / "c")
    m = Llama.from_pretrained(tmp_path / "c", dtype=torch.bfloat16, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.config.rope.method == "yarn" and m.config.rope.original_max_position_embeddings == L
    assert m(torch.randint(0, 97, (1, 8))).dtype == torch.float32  # logits always fp32


def test_save_is_atomic(tmp_path, monkeypatch):
    good = tiny("none", seed=1)
    good.save_pretrained(tmp_path / "c")
    before = open(tmp_path / "c" / "model.safetensors", "rb").read()
    import safetensors.torch
    def crash(*a, **k):
        raise KeyboardInterrupt("simulated crash mid-save")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny("none", seed=2).save_pretrained(tmp_path / "c")
    assert open(tmp_path / "c" / "model.safetensors", "rb").read() == before
    assert os.listdir(tmp_path) == ["c"]  # no temp directory left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(tmp_path / "c").st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert os.stat(tmp_path / "c" / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask


# ---- clear errors for bad checkpoints ---------------------------------------------------------------

def test_errors_on_bad_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny("none").save_pretrained(tmp_path / "ok")
    weights = load_file(tmp_path / "ok" / "model.safetensors")
    config = json.load(open(tmp_path / "ok" / "config.json"))

    def ckpt(name, cfg=config, tensors=weights, raw_config=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(raw_config if raw_config is not None else json.dumps(cfg))
        if tensors is not None:
            save_file(tensors, d / "model.safetensors")
        return d

    cases = {
        "not found": tmp_path / "nope",
        "no config.json": (tmp_path / "empty").mkdir() or tmp_path / "empty",
        "corrupt config.json": ckpt("corrupt", raw_config="{not json"),
        "missing tensors": ckpt("missing", tensors={k: v for k, v in weights.items() if "layers.1." not in k}),
        "shape": ckpt("shape", cfg={**config, "intermediate_size": 128}),
        "unsupported model_type": ckpt("gpt2", cfg={**config, "model_type": "gpt2"}),
        "unexpected tensor": ckpt("extra", tensors={**weights, "transformer.wte.weight": torch.zeros(2)}),
        "missing 'hidden_size'": ckpt("nokey", cfg={k: v for k, v in config.items() if k != "hidden_size"}),
        "unsupported rope_scaling": ckpt("rope", cfg={**config, "rope_scaling": {"rope_type": "mrope", "factor": 2.0}}),
    }
    pickled = ckpt("pickle", tensors=None)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    cases["refusing to unpickle"] = pickled
    broken = ckpt("broken", tensors=None)
    (broken / "model.safetensors").write_bytes(b"garbage")
    cases["cannot read"] = broken
    for message, path in cases.items():
        with pytest.raises(CheckpointError) as e:
            Llama.from_pretrained(path)
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))


# ---- parity with Hugging Face transformers ----------------------------------------------------------

PARITY = [("none", 1.0, {}), ("linear", 4.0, {}), ("yarn", 4.0, {}), ("yarn", 8.0, {"truncate": False}),
          ("llama3", 4.0, {"low_freq_factor": 1.0, "high_freq_factor": 4.0}), ("dynamic-ntk", 4.0, {}),
          ("longrope", 8.0, LONGROPE)]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("method,factor,kw", PARITY)
def test_logits_match_transformers(tmp_path, method, factor, kw, kv, tied):
    transformers = pytest.importorskip("transformers")
    m = tiny(method, factor, tied=tied, kv=kv, **kw)
    m.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 97, (2, 4 * L + 5))  # well past L, where the methods differ
    with torch.no_grad():
        ours, theirs = m(idx), hf(idx).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        loss_theirs = hf(idx, labels=idx).loss  # transformers shifts labels itself
    # same length as theirs (dynamic methods scale with it): the last position has no target
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], 1)
    assert m(idx, targets).item() == pytest.approx(loss_theirs.item(), rel=1e-5)


def test_longrope_logits_match_transformers_within_and_past_L(tmp_path):
    # transformers picks the short factors while the largest position + 1 <= L, the long ones past it
    transformers = pytest.importorskip("transformers")
    m = tiny("longrope", 8.0, **LONGROPE)
    m.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        for T in (L - 1, L, L + 1):
            idx = torch.randint(0, 97, (1, T))
            torch.testing.assert_close(m(idx), hf(idx).logits, rtol=0, atol=1e-4)
        short, long = m(idx[:, :L])[:, -1], logits_for_length(m, idx, L + 1)[:, L - 1]  # the same position, both sets
    assert (short - long).abs().max().item() > 1e-3  # the check above is not vacuous


def test_loads_a_checkpoint_written_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8 * L,
                                   rope_parameters={"rope_type": "yarn", "factor": 8.0, "rope_theta": 500000.0,
                                                    "original_max_position_embeddings": L})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = Llama.from_pretrained(tmp_path)
    assert ours.config.rope.method == "yarn" and ours.config.rope.theta == 500000.0
    idx = torch.randint(0, 97, (1, 6 * L))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0, atol=1e-4)


# ---- chunked loss -----------------------------------------------------------------------------------

def test_chunked_loss_equals_full_cross_entropy(monkeypatch):
    m = tiny("yarn", 4.0, vocab=300).train()
    # 300-word vocabulary: force chunks of 256 rows, so 3 chunks for 2 x 300 tokens
    idx, tgt = torch.randint(0, 300, (2, 300)), torch.randint(0, 300, (2, 300))
    tgt[0, :17] = -100
    loss = m(idx, tgt)
    loss.backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref = F.cross_entropy(m(idx).flatten(0, 1), tgt.flatten(), ignore_index=-100)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6)
    s = m(idx, tgt, reduction="sum")
    assert s.item() == pytest.approx(ref.item() * (tgt != -100).sum().item(), rel=1e-5)


def test_chunked_loss_never_holds_full_logits():
    # with 4096 rows x 16384 vocabulary the full fp32 logits are 256 MiB; the chunks are 4096 rows only
    # when vocab <= 16384, so use a vocabulary that makes chunks of 4096 rows and check the peak
    m = tiny("none", vocab=16384)
    calls = []  # the rows of each vocabulary projection
    m.lm_head.register_forward_pre_hook(lambda module, args: calls.append(args[0].size(0)))
    with torch.no_grad():
        m(torch.randint(0, 16384, (1, 9000)), torch.randint(0, 16384, (1, 9000)))
    assert max(calls) * 16384 <= 1 << 26 and sum(calls) == 9000 and len(calls) == 3


def test_activation_checkpointing_modes_give_the_same_loss_and_gradients():
    m = tiny("yarn", 4.0).train()
    idx = torch.randint(0, 97, (2, 70))
    results, counts = {}, {}
    for mode in model_mod.CHECKPOINTING:
        m.set_activation_checkpointing(mode)
        m.zero_grad()
        with OpCounter() as ops:
            loss = m(idx[:, :-1], idx[:, 1:])
            loss.backward()
        results[mode] = (loss.detach(), [p.grad.clone() for p in m.parameters()])
        counts[mode] = ops.counts
    for mode in ("full", "selective"):
        torch.testing.assert_close(results[mode][0], results["none"][0], rtol=0, atol=0)
        for a, b in zip(results[mode][1], results["none"][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # what each mode recomputes in backward: full runs attention twice per layer, selective keeps its
    # output (the CPU flash kernel's) and redoes only the cheap rest, such as the projections
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert counts["none"][attention] == counts["selective"][attention] == 2  # 2 layers, once each
    assert counts["full"][attention] == 4
    assert counts["none"]["mm"] < counts["selective"]["mm"] == counts["full"]["mm"]
    with pytest.raises(ValueError, match="selective"):
        m.set_activation_checkpointing("some")


# ---- KV cache: cached decoding equals a full forward pass -------------------------------------------

def decode_and_compare(m, prompt_len, steps, growth, chunk=None):
    """Greedy decode with the cache; at every step compare the new logits with a full forward pass
    over the whole sequence so far (no cache) with the same RoPE length."""
    torch.manual_seed(1)
    seq = torch.randint(0, 97, (2, prompt_len))
    m.setup_cache(batch_size=2, max_len=prompt_len + steps + 1, dynamic_growth=growth, chunk_size=chunk or 4096)
    with torch.no_grad():
        logits = m.prefill(seq, chunk_size=chunk)
        worst = 0.0
        for t in range(steps):
            rope_len = m.cache.rope_len if m.config.rope.is_dynamic and seq.size(1) > L else seq.size(1)
            full = logits_for_length(m, seq, rope_len)[:, -1:]
            worst = max(worst, (full - logits).abs().max().item())
            assert torch.equal(full.argmax(-1), logits.argmax(-1))
            nxt = logits.argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            logits = m(nxt, pos=seq.size(1) - 1, last_only=True)
    m.cache = None
    return worst


@pytest.mark.parametrize("method", ["none", "yarn", "llama3"])
def test_cached_decoding_equals_full_forward_static(method):
    kw = {"low_freq_factor": 1.0, "high_freq_factor": 4.0} if method == "llama3" else {}
    assert decode_and_compare(tiny(method, 4.0 if method != "none" else 1.0, **kw), 20, 40, 1.25, chunk=7) < 1e-4


@pytest.mark.parametrize("method", ["dynamic-ntk", "dynamic-yarn"])
@pytest.mark.parametrize("growth", [1.0, 1.25])
def test_cached_decoding_equals_full_forward_dynamic(method, growth):
    # the prompt (20) is below L (32), decoding crosses L and goes to 2.5 L
    m = tiny(method, 1.0 if method == "dynamic-yarn" else 2.0, layers=3)
    assert decode_and_compare(m, 20, 60, growth) < 1e-4


def test_cached_decoding_equals_full_forward_longrope():
    # longrope switches from its short to its long factors once the text passes L: the prefix is recomputed
    for growth in (1.0, 1.25):
        assert decode_and_compare(tiny("longrope", 8.0, layers=3, **LONGROPE), 20, 30, growth) < 1e-4
    m = tiny("longrope", 8.0, **LONGROPE)
    m.setup_cache(1, 100, dynamic_growth=1.0)
    with torch.no_grad():
        m.prefill(torch.randint(0, 97, (1, L)))
        assert m.cache.rope_len == L
        m(torch.tensor([[5]]), pos=L)
        assert m.cache.rope_len == 100  # any length past L: the prefix is recomputed once, not at every step


def test_dynamic_exact_mode_matches_the_true_dynamic_forward():
    # growth 1: every step uses s from the exact current length, like a from-scratch forward pass
    m = tiny("dynamic-yarn", 1.0, layers=3)
    m.setup_cache(1, 80, dynamic_growth=1.0)
    seq = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        m.prefill(seq)
        assert m.cache.rope_len == 40
        nxt = torch.tensor([[5]])
        got = m(nxt, pos=40, last_only=True)
        want = m(torch.cat([seq, nxt], 1))[:, -1:]  # default rope_len = its own length, 41
    assert m.cache.rope_len == 41
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_stale_cache_would_be_wrong():
    # the test above is not vacuous: without recomputing the prefix, the dynamic scale change matters
    m = tiny("dynamic-yarn", 1.0, layers=3)
    seq = torch.randint(0, 97, (1, 60))
    with torch.no_grad():
        a = m(seq)[:, -1]
        b = logits_for_length(m, seq, 2 * 60)[:, -1]
    assert (a - b).abs().max().item() > 1e-3


def test_chunked_prefill_equals_one_shot_and_cache_errors():
    m = tiny("yarn", 4.0)
    seq = torch.randint(0, 97, (1, 100))
    m.setup_cache(1, 128)
    with torch.no_grad():
        chunked = m.prefill(seq, chunk_size=16)
        torch.testing.assert_close(chunked, m(seq)[:, -1:], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="does not fit"):
            m(torch.zeros(1, 40, dtype=torch.long), pos=100)
    assert m.cache_bytes() == 2 * 2 * 128 * 2 * 16 * 4  # layers x (k, v) x len x kv heads x D x fp32
    m.cache = None
    with pytest.raises(RuntimeError):
        m(seq, pos=0)
