"""
How close are rope.py and model.py to Hugging Face transformers? Prints the worst differences.

    python bench/parity.py            # needs transformers (pip install -r requirements-dev.txt)

1. inv_freq and attention factor of every method transformers also has, over the grid of the tests:
   head dims 64/128, bases 1e4/5e5, factors 2..64, original lengths 2048..8192 (and the yarn keys;
   longrope with random per-pair factors, at a length within L and one past it).
2. Logits of a small random GQA model saved by us and loaded by transformers' LlamaForCausalLM, fp32.
3. Logits of each family's checkpoint as transformers writes it (Qwen2, Qwen3, Mistral; every weight,
   bias and norm random), loaded by us, with its own RoPE and with a YaRN override, fp32.
"""

import itertools
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from model import Llama, LlamaConfig  # noqa: E402
from rope import RopeConfig, inv_freq_and_attention_factor  # noqa: E402


def hf_rope(D, b, max_pos, params, seq_len=None):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(hidden_size=4 * D, num_attention_heads=4, head_dim=D,
                                   max_position_embeddings=max_pos, rope_parameters={"rope_theta": b, **params})
    if params["rope_type"] == "default":
        return transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=seq_len)


def longrope_factors(D, s, seed):
    g = torch.Generator().manual_seed(seed)
    short = 1 + 0.5 * torch.rand(D // 2, generator=g, dtype=torch.float64)
    noise = 1 + 0.1 * torch.rand(D // 2, generator=g, dtype=torch.float64)
    long = torch.linspace(1, s, D // 2, dtype=torch.float64) * noise
    return {"short_factor": short.tolist(), "long_factor": long.tolist()}


def rope_parity():
    worst = {}
    for D, b, s, L in itertools.product((64, 128), (1e4, 5e5), (2, 4, 8, 16, 32, 64), (2048, 4096, 8192)):
        s = float(s)
        cases = {
            "default": ({"rope_type": "default"}, L, None),
            "linear": ({"rope_type": "linear", "factor": s}, L, None),
            "dynamic": ({"rope_type": "dynamic", "factor": s}, L, 3 * L),
            "llama3": ({"rope_type": "llama3", "factor": s, "original_max_position_embeddings": L,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0}, int(s * L), None),
        }
        for extra in ({}, {"truncate": False}, {"attention_factor": 0.9}, {"mscale": 0.707, "mscale_all_dim": 1.0}):
            name = "yarn" + "".join(f" {k}" for k in extra)
            cases[name] = ({"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L, **extra},
                           int(s * L), None)
        lr = {"rope_type": "longrope", "original_max_position_embeddings": L, **longrope_factors(D, s, D + int(s) + L)}
        cases["longrope short"] = (lr, int(s * L), L)
        cases["longrope long"] = (lr, int(s * L), L + 1)
        for name, (params, max_pos, seq_len) in cases.items():
            hf_inv, hf_a = hf_rope(D, b, max_pos, params, seq_len)
            ours = RopeConfig.from_hf({"hidden_size": 4 * D, "num_attention_heads": 4, "head_dim": D,
                                       "max_position_embeddings": max_pos, "rope_theta": b}, rope_scaling=params)
            inv, a = inv_freq_and_attention_factor(ours, seq_len)
            abs_d = (inv - hf_inv).abs().max().item()
            rel_d = ((inv - hf_inv).abs() / hf_inv.abs()).max().item()
            w = worst.setdefault(name, [0.0, 0.0, 0.0, 0])
            w[0], w[1], w[2], w[3] = max(w[0], abs_d), max(w[1], rel_d), max(w[2], abs(a - hf_a)), w[3] + 1
    print("| method | configs | max abs diff inv_freq | max rel diff inv_freq | max diff attention factor |")
    print("|---|---|---|---|---|")
    for name, (a, r, f, n) in worst.items():
        print(f"| {name} | {n} | {a:.3g} | {r:.3g} | {f:.3g} |")


def logits_parity():
    import transformers
    print("\n| rope | kv heads | tied | max abs diff logits | max rel diff (vs max logit) |")
    print("|---|---|---|---|---|")
    for (method, s), kv, tied in itertools.product([("none", 1.0), ("linear", 4.0), ("yarn", 4.0), ("yarn", 16.0),
                                                    ("llama3", 8.0), ("dynamic-ntk", 4.0), ("longrope", 16.0)],
                                                   (8, 2), (False, True)):
        torch.manual_seed(0)
        kw = longrope_factors(64, s, 0) if method == "longrope" else {}
        rope = RopeConfig(method=method, factor=s, head_dim=64, original_max_position_embeddings=256, **kw)
        cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=kv, tie_word_embeddings=tied, rope=rope)
        m = Llama(cfg)
        m.init_weights()
        with tempfile.TemporaryDirectory() as d:
            m.save_pretrained(d)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        idx = torch.randint(0, 1000, (1, 1024))
        with torch.no_grad():
            ours, theirs = m.eval()(idx), hf(idx).logits
        diff = (ours - theirs).abs().max().item()
        print(f"| {method} s={s:g} | {kv} | {tied} | {diff:.3g} | {diff / theirs.abs().max().item():.3g} |")


def family_parity():
    import transformers
    print("\n| family | rope | max abs diff logits | max rel diff (vs max logit) |")
    print("|---|---|---|---|")
    classes = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}
    for family, cls in classes.items():
        extra = {"head_dim": 128} if family == "qwen3" else {}  # Qwen3: head_dim 2x hidden / heads, as Qwen3-0.6B
        cfg = cls(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6, **extra)
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            for rope, scaling in (("own (plain, theta 1e6)", ...), ("yarn s=4 (override)", yarn)):
                m = Llama.from_pretrained(d, rope_scaling=scaling)
                cfg = transformers.AutoConfig.from_pretrained(d)
                if scaling is not ...:
                    cfg.rope_parameters = {"rope_theta": 1e6, **yarn}
                theirs = transformers.AutoModelForCausalLM.from_pretrained(d, config=cfg, dtype=torch.float32).eval()
                idx = torch.randint(0, 1000, (1, 1024))
                with torch.no_grad():
                    a, b = m(idx), theirs(idx).logits
                diff = (a - b).abs().max().item()
                print(f"| {family} | {rope} | {diff:.3g} | {diff / b.abs().max().item():.3g} |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    rope_parity()
    logits_parity()
    family_parity()
