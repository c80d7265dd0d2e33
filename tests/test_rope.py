"""rope.py against the formulas of ../shared/yarn-notes.md and, where installed, Hugging Face transformers.

    python -m pytest tests/test_rope.py -q
"""

import itertools
import math

import pytest
import torch

from rope import METHODS, RopeConfig, apply_rope, by_parts_gamma, inv_freq_and_attention_factor, rope_cos_sin

HEAD_DIMS, BASES = (64, 128), (1e4, 5e5)
FACTORS, LENGTHS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0), (2048, 4096, 8192)
GRID = list(itertools.product(HEAD_DIMS, BASES, FACTORS, LENGTHS))


def plain(D, b):
    # written from the formula, independently of rope.py: theta_d = b^(-2d/D)
    return torch.tensor([b ** (-2 * d / D) for d in range(D // 2)], dtype=torch.float64)


# ---- transformers parity (float32, bit-for-bit where the arithmetic is the same) --------------------

def hf_inv_freq(D, b, L, scaling, seq_len=None, **top):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = {"rope_theta": b, **(scaling or {"rope_type": "default"})}
    cfg = transformers.LlamaConfig(hidden_size=D * 4, num_attention_heads=4, head_dim=D,
                                   max_position_embeddings=L, rope_parameters=params, **top)
    kind = params["rope_type"]
    if kind == "default":
        return transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq_len)


def ours(D, b, L, scaling, seq_len=None, **top):
    hf_config = {"hidden_size": D * 4, "num_attention_heads": 4, "head_dim": D,
                 "max_position_embeddings": L, "rope_theta": b, "rope_scaling": scaling, **top}
    return inv_freq_and_attention_factor(RopeConfig.from_hf(hf_config), seq_len)


def assert_same(a, b):
    (fa, sa), (fb, sb) = a, b
    assert fa.dtype == fb.dtype == torch.float32 and fa.shape == fb.shape
    torch.testing.assert_close(fa, fb, rtol=1.2e-7, atol=0)  # float32 precision, relative
    assert sa == pytest.approx(sb, rel=1e-12)


YARN_VARIANTS = [
    {},
    {"truncate": False},
    {"attention_factor": 0.9},
    {"mscale": 0.707, "mscale_all_dim": 0.707},
    {"mscale": 1.0, "mscale_all_dim": 0.5},
    {"beta_fast": 16, "beta_slow": 2},
]


@pytest.mark.parametrize("D,b,s,L", GRID)
def test_parity_with_transformers(D, b, s, L):
    assert_same(ours(D, b, L, None), hf_inv_freq(D, b, L, None))
    assert_same(ours(D, b, L, {"type": "linear", "factor": s}), hf_inv_freq(D, b, L, {"rope_type": "linear", "factor": s}))
    for extra in YARN_VARIANTS:
        sc = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L, **extra}
        assert_same(ours(D, b, int(s * L), sc), hf_inv_freq(D, b, int(s * L), sc))
    sc = {"rope_type": "llama3", "factor": s, "original_max_position_embeddings": L,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert_same(ours(D, b, int(s * L), sc), hf_inv_freq(D, b, int(s * L), sc))
    for seq_len in (L // 2, L, L + 1, 3 * L, int(s * L)):
        sc = {"rope_type": "dynamic", "factor": s}
        assert_same(ours(D, b, L, sc, seq_len), hf_inv_freq(D, b, L, sc, seq_len))


def longrope_factors(D, s, seed):
    """Per-pair divisors shaped like Phi-3's: short ones near 1, long ones rising towards about s."""
    g = torch.Generator().manual_seed(seed)
    short = (1 + 0.5 * torch.rand(D // 2, generator=g, dtype=torch.float64)).tolist()
    noise = 1 + 0.1 * torch.rand(D // 2, generator=g, dtype=torch.float64)
    return short, (torch.linspace(1, s, D // 2, dtype=torch.float64) * noise).tolist()


@pytest.mark.parametrize("D,b,s,L", GRID)
def test_longrope_parity_with_transformers(D, b, s, L):
    short, long = longrope_factors(D, s, seed=D + int(s) + L)
    base = {"rope_type": "longrope", "short_factor": short, "long_factor": long}
    variants = [  # (rope_scaling, top-level config.json keys)
        ({**base, "original_max_position_embeddings": L}, {}),            # s from max_position_embeddings / L
        ({**base, "original_max_position_embeddings": L, "factor": s}, {}),
        ({**base, "original_max_position_embeddings": L, "attention_factor": 1.3}, {}),
        (base, {"original_max_position_embeddings": L}),                    # Phi-3: L at the top level
        ({**base, "short_factor": [1] * (D // 2), "original_max_position_embeddings": L}, {}),  # integers
    ]
    for sc, top in variants:
        for seq_len in (None, L // 2, L, L + 1, int(s * L)):  # short up to L, long past it
            assert_same(ours(D, b, int(s * L), sc, seq_len, **top), hf_inv_freq(D, b, int(s * L), sc, seq_len, **top))


def test_parity_of_cos_sin_with_transformers_rotary_module():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    sc = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048, "rope_theta": 1e4}
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                                   max_position_embeddings=32768, rope_parameters=sc)
    pos = torch.tensor([[0, 1, 7, 2047, 2048, 4095, 32767, 131071]])
    x = torch.randn(1, 8, 64)
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(x, pos)
    inv, a = inv_freq_and_attention_factor(RopeConfig.from_hf(cfg.to_dict()))
    cos, sin = rope_cos_sin(inv, pos, a)
    assert torch.equal(torch.cat([cos, cos], -1), hf_cos) and torch.equal(torch.cat([sin, sin], -1), hf_sin)
    q, k = torch.randn(2, 1, 3, 8, 64).unbind(0)
    hq, hk = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    oq, ok = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(oq, hq, rtol=0, atol=1e-6)
    torch.testing.assert_close(ok, hk, rtol=0, atol=1e-6)


# ---- formulas of the notes, for every method (no transformers needed) -------------------------------

def cfg_of(method, D=128, b=1e4, s=8.0, L=4096, **kw):
    if method == "longrope":  # divisors of its own: 1 for l <= L (plain RoPE), 1 .. s past L
        kw = {"short_factor": [1.0] * (D // 2), "long_factor": torch.linspace(1, s, D // 2).tolist(), **kw}
    return RopeConfig(method=method, theta=b, head_dim=D, factor=s, original_max_position_embeddings=L, **kw)


@pytest.mark.parametrize("D,b,s,L", GRID[::7])
def test_formulas_from_the_notes(D, b, s, L):
    theta = plain(D, b)
    f = lambda m, **kw: inv_freq_and_attention_factor(cfg_of(m, D, b, s, L, **kw))[0].double()
    rtol = 2e-6
    torch.testing.assert_close(f("none"), theta, rtol=rtol, atol=0)
    torch.testing.assert_close(f("linear"), theta / s, rtol=rtol, atol=0)
    torch.testing.assert_close(f("ntk"), plain(D, b * s ** (D / (D - 2))), rtol=rtol, atol=0)
    # NTK-aware leaves the highest frequency alone and slows the lowest by exactly s
    assert f("ntk")[0] == 1.0 and f("ntk")[-1].item() == pytest.approx(theta[-1].item() / s, rel=1e-5)
    # by-parts: gamma from the ratio r = L / lambda in pair-index space, as the notes define it
    low = max(math.floor(D * math.log(L / (2 * math.pi * 32)) / (2 * math.log(b))), 0)
    high = min(math.ceil(D * math.log(L / (2 * math.pi * 1)) / (2 * math.log(b))), D - 1)
    ramp = ((torch.arange(D // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    torch.testing.assert_close(f("ntk-by-parts"), ramp * theta / s + (1 - ramp) * theta, rtol=rtol, atol=0)
    # llama3 from wavelengths
    lam = 2 * math.pi / theta
    g = ((L / lam - 1) / (4 - 1)).clamp(0, 1)
    torch.testing.assert_close(f("llama3"), (1 - g) * theta / s + g * theta, rtol=rtol, atol=0)


def test_longrope_from_the_formula():
    D, b, s, L = 64, 1e4, 16.0, 4096
    short, long = longrope_factors(D, s, seed=0)
    cfg = cfg_of("longrope", D, b, s, L, short_factor=short, long_factor=long)
    a = math.sqrt(1 + math.log(s) / math.log(L))
    for l, divisors in ((None, short), (1, short), (L, short), (L + 1, long), (64 * L, long)):
        inv, got_a = inv_freq_and_attention_factor(cfg, l)
        torch.testing.assert_close(inv.double(), plain(D, b) / torch.tensor(divisors, dtype=torch.float64),
                                   rtol=2e-6, atol=0)
        assert got_a == pytest.approx(a, rel=1e-12)
    assert inv_freq_and_attention_factor(cfg.replace(factor=1.0))[1] == 1.0
    assert inv_freq_and_attention_factor(cfg.replace(attention_factor=0.7), L + 1)[1] == 0.7


def test_correction_ranges_from_the_notes():
    # D=128, b=10000: L=4096 -> (20, 46); 2048 -> (16, 41); 8192 -> (25, 50)
    for L, (low, high) in {4096: (20, 46), 2048: (16, 41), 8192: (25, 50)}.items():
        keep = by_parts_gamma(cfg_of("yarn", L=L))
        assert keep[: low + 1].eq(1).all() and keep[low + 1].lt(1)
        assert keep[high:].eq(0).all() and keep[high - 1].gt(0)


def test_yarn_attention_factor_values_from_the_notes():
    for s, a in {2: 1.0693, 8: 1.2079, 16: 1.2773, 32: 1.3466}.items():
        assert inv_freq_and_attention_factor(cfg_of("yarn", s=s))[1] == pytest.approx(a, abs=1e-4)
        assert inv_freq_and_attention_factor(cfg_of("ntk-by-parts", s=s))[1] == 1.0


@pytest.mark.parametrize("method", METHODS)
def test_factor_one_is_plain_rope(method):
    ref = inv_freq_and_attention_factor(cfg_of("none"))
    got = inv_freq_and_attention_factor(cfg_of(method, s=1.0), seq_len=4096)  # l <= L for the dynamic ones
    assert torch.equal(got[0], ref[0]) and got[1] == 1.0


@pytest.mark.parametrize("method,static", [("dynamic-ntk", "ntk"), ("dynamic-yarn", "yarn")])
def test_dynamic_methods(method, static):
    L = 4096
    cfg = cfg_of(method, s=1.0, L=L)  # s = 1: the paper's dynamic scaling, scale = l / L
    for l in (1, 100, L - 1, L):
        assert torch.equal(inv_freq_and_attention_factor(cfg, l)[0], inv_freq_and_attention_factor(cfg_of("none"))[0])
        assert inv_freq_and_attention_factor(cfg, l)[1] == 1.0
    for l in (L + 1, 3 * L, 5 * L + 17, 32 * L):
        got, want = inv_freq_and_attention_factor(cfg, l), inv_freq_and_attention_factor(cfg_of(static, s=l / L, L=L))
        assert torch.equal(got[0], want[0]) and got[1] == want[1]
    if method == "dynamic-yarn":
        assert inv_freq_and_attention_factor(cfg, 32 * L)[1] == pytest.approx(0.1 * math.log(32) + 1)


def test_by_parts_equals_yarn_without_temperature_and_keeps_high_frequencies():
    for s in FACTORS:
        y, a = inv_freq_and_attention_factor(cfg_of("yarn", s=s))
        p, one = inv_freq_and_attention_factor(cfg_of("ntk-by-parts", s=s))
        assert torch.equal(y, p) and one == 1.0 and a > 1.0
        # pairs with more than beta_fast turns within L are untouched, the slowest is divided by s
        theta = inv_freq_and_attention_factor(cfg_of("none"))[0]
        turns = 4096 * theta / (2 * math.pi)
        assert torch.equal(y[turns > 32], theta[turns > 32])
        assert y[-1].item() == pytest.approx(theta[-1].item() / s, rel=1e-6)


def test_apply_rope_is_a_rotation_by_relative_position():
    torch.manual_seed(0)
    inv, a = inv_freq_and_attention_factor(cfg_of("yarn", D=64, s=4))
    q, k = torch.randn(2, 1, 1, 1, 64).unbind(0)
    def score(m, n):
        cq, sq = rope_cos_sin(inv, torch.tensor([m]), a)
        ck, sk = rope_cos_sin(inv, torch.tensor([n]), a)
        return (apply_rope(q, q, cq, sq)[0] * apply_rope(k, k, ck, sk)[1]).sum().item()
    # q.k depends on m - n only, scaled by a^2 (the attention factor multiplies cos and sin)
    assert score(10, 3) == pytest.approx(score(1007, 1000), rel=1e-4)
    assert score(5, 5) == pytest.approx(a * a * (q * k).sum().item(), rel=1e-5)
    # bf16 inputs come back bf16, rotated in fp32
    cq, sq = rope_cos_sin(inv, torch.arange(3), a)
    out = apply_rope(torch.randn(1, 2, 3, 64, dtype=torch.bfloat16), torch.randn(1, 2, 3, 64), cq, sq)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.float32


# ---- config.json in and out -------------------------------------------------------------------------

BASE_HF = {"hidden_size": 512, "num_attention_heads": 4, "max_position_embeddings": 4096, "rope_theta": 10000.0}


@pytest.mark.parametrize("method", METHODS)
def test_to_hf_and_back(method):
    extra = {"attention_factor": 1.1} if method == "yarn" else {}
    cfg = cfg_of(method, s=8.0, **extra)
    out = cfg.to_hf()
    hf = {**BASE_HF, **out}
    back = RopeConfig.from_hf(hf)
    # what another tool will compute from the file is what we computed
    assert torch.equal(inv_freq_and_attention_factor(back)[0], inv_freq_and_attention_factor(cfg)[0]) or method == "ntk"
    if method == "ntk":  # baked into the base: plain RoPE at b' = b * s^(D/(D-2))
        assert back.method == "none" and back.theta == pytest.approx(1e4 * 8 ** (128 / 126))
        torch.testing.assert_close(inv_freq_and_attention_factor(back)[0], inv_freq_and_attention_factor(cfg)[0],
                                   rtol=1e-6, atol=0)
    expected_max = {"none": 4096, "linear": 4096, "dynamic-ntk": 4096}.get(method, 8 * 4096)
    assert out["max_position_embeddings"] == expected_max
    if method not in ("ntk", "none"):
        assert back.method == method


def test_longrope_from_a_phi3_config_and_back():
    short, long = longrope_factors(96, 32.0, seed=3)
    phi3 = {"hidden_size": 3072, "num_attention_heads": 32, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
            "rope_scaling": {"type": "su", "short_factor": short, "long_factor": long}}  # "su": its early name
    cfg = RopeConfig.from_hf(phi3)
    assert (cfg.method, cfg.factor, cfg.original_max_position_embeddings, cfg.head_dim) == ("longrope", 32.0, 4096, 96)
    assert cfg.short_factor == tuple(short) and cfg.long_factor == tuple(long)
    out = cfg.to_hf()
    assert out["max_position_embeddings"] == 131072 and out["rope_scaling"]["rope_type"] == "longrope"
    assert RopeConfig.from_hf({**phi3, **out}) == cfg


def test_from_hf_forms():
    v4 = {**BASE_HF, "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 4096}}
    v5 = {**BASE_HF, "rope_parameters": {"rope_type": "yarn", "factor": 16.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 4096}}
    v4b = {**BASE_HF, "rope_scaling": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}}
    assert RopeConfig.from_hf(v4) == RopeConfig.from_hf(v5) == RopeConfig.from_hf(v4b)
    assert RopeConfig.from_hf(v5).head_dim == 128 and RopeConfig.from_hf({**BASE_HF, "head_dim": 64}).head_dim == 64
    assert RopeConfig.from_hf(BASE_HF).method == "none"
    assert RopeConfig.from_hf({**BASE_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}).theta == 5e5
    # an override replaces the file's scaling, our method names allowed
    o = RopeConfig.from_hf(v4, rope_scaling={"rope_type": "dynamic-yarn", "factor": 4})
    assert o.method == "dynamic-yarn" and o.factor == 4
    assert RopeConfig.from_hf(v4, rope_scaling=None).method == "none"


@pytest.mark.parametrize("bad", [
    {"rope_type": "longrope", "factor": 2.0},
    {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 63, "long_factor": [1.0] * 64},
    {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 64, "long_factor": [1.0] * 63 + [0.0]},
    {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 64, "long_factor": [1.0] * 63 + ["2"]},
    {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 64, "long_factor": [1.0] * 63 + [math.inf]},
    {"rope_type": "longrope", "factor": 2.0, "short_factor": "1" * 64, "long_factor": [1.0] * 64},
    {"rope_type": "banana", "factor": 2.0},
    {"rope_type": "linear", "factor": 0.5},
    {"rope_type": "linear"},
    {"rope_type": "dynamic"},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": "big"},
    {"rope_type": "yarn", "factor": 2.0, "truncate": True, "beta_fast": "x"} ,
])
def test_malformed_scaling_is_a_value_error(bad):
    with pytest.raises(ValueError):
        cfg = RopeConfig.from_hf({**BASE_HF, "rope_scaling": bad})
        inv_freq_and_attention_factor(cfg)
