"""
Rotary position embeddings (RoPE) and every way of stretching them to a longer context.

What this file teaches: RoPE scaling, one method at a time, in the order the methods appeared (as in
section 3 of the YaRN paper, arXiv 2309.00071), then Llama 3.1's and LongRoPE's. Read it top to bottom;
the translation from and to Hugging Face config.json files is at the bottom, out of the way.

    from rope import RopeConfig, inv_freq_and_attention_factor, rope_cos_sin, apply_rope
    cfg = RopeConfig(method="yarn", theta=10000.0, head_dim=128, factor=32,
                     original_max_position_embeddings=4096)
    inv_freq, a = inv_freq_and_attention_factor(cfg)       # (D/2,) fp32, attention factor
    cos, sin = rope_cos_sin(inv_freq, torch.arange(T), a)  # (T, D/2) fp32 each
    q, k = apply_rope(q, k, cos, sin)                      # q, k: (B, H, T, D)

The one idea: position m rotates the pair d of a query/key by the angle m * theta_d, with
theta_d = b^(-2d/D). Attention then only sees m - n, the distance between tokens. A model trained on
L positions has seen angles up to L * theta_d; every method below is a new set of frequencies
theta'_d (and maybe an attention factor a) that keeps the angles at longer contexts close to the ones
the model knows. So each method is one function, from the config (and the current length l, which
only the dynamic methods read) to exactly two things:

    (inverse frequencies theta'_d as an fp32 tensor of D/2, attention factor a)

and the table METHODS maps each method's name to its function. `a` multiplies both cos and sin, so
attention logits q.k are scaled by a^2 (YaRN's "temperature"), as transformers and vLLM apply it.

The paper's symbols, and ours (RopeConfig field = config.json key, and the command-line flags):

    paper       here                                meaning
    b           theta (rope_theta)                  the RoPE base
    |D|, D      head_dim                            rotary dims of one head: pairs d = 0 .. D/2-1
    theta_d     inv_freq                            b^(-2d/D), the angle per position of pair d
    lambda_d    wavelen                             2 pi / theta_d, positions per full turn of pair d
    L           original_max_position_embeddings    the context the model was trained on
    s           factor                              L'/L, how many times longer the new context is
                                                    (flags: --rope-factor, and train.py's --yarn-scale)
    L'          s * L (max_position_embeddings)     the new context
    r(d)        L / wavelen                         how many full turns pair d makes within L
    alpha       beta_slow                           by-parts: fewer turns than this: interpolate (1)
    beta        beta_fast                           by-parts: more turns than this: keep (32)
    gamma(r)    by_parts_gamma                      1 keeps theta_d, 0 interpolates it to theta_d / s
    sqrt(1/t)   a (attention_factor)                YaRN's temperature t: logits are scaled by a^2 = 1/t
    l           seq_len                             the current total length (dynamic methods)
    f_d         short_factor, long_factor           LongRoPE's searched per-pair divisors of theta_d
                                                    (that paper's lambda_i, not our wavelength)

"factor" is always s and "attention factor" always a (the only "scale" is the flag --yarn-scale, s).
Not to be confused: llama3's low_freq_factor/high_freq_factor and LongRoPE's per-pair factors.

Conventions worth knowing:
- Pairing is split-half ("rotate_half"): dims d and d + D/2 form a pair. That is the layout of
  Hugging Face checkpoints. Meta's original weights and GGUF pair (2d, 2d+1) instead; the two differ by
  a fixed permutation of the q/k projection rows, so a HF checkpoint needs nothing here.
- Tables are built and applied in fp32 (bf16 cannot even represent position 257 exactly).
- Where transformers has the same method, the arithmetic below is done in the same order, so the
  results match it to the last bit in fp32 (tests/test_rope.py checks this over a grid).

Only torch and the standard library are imported: copy this file anywhere.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch


@dataclass
class RopeConfig:
    method: str = "none"          # one of METHODS (the table below the methods)
    theta: float = 10000.0        # b, the base (rope_theta)
    head_dim: int = 128           # D, the rotary dims of one head
    factor: float = 1.0           # s = L'/L, how many times longer the new context is
    original_max_position_embeddings: int = 4096  # L, the context the model was trained on
    beta_fast: float = 32.0       # by-parts beta: pairs turning more often than this within L are kept
    beta_slow: float = 1.0        # by-parts alpha: pairs turning less often than this are interpolated
    attention_factor: float | None = None  # a, when given: replaces YaRN's computed 0.1 ln(s) + 1
    mscale: float | None = None   # DeepSeek-style YaRN: a = (0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1)
    mscale_all_dim: float | None = None
    truncate: bool = True         # YaRN: round the correction range to whole pairs (transformers' default)
    low_freq_factor: float = 1.0  # llama3: wavelengths above L/low_freq_factor are interpolated
    high_freq_factor: float = 4.0  # llama3: wavelengths below L/high_freq_factor are kept
    short_factor: tuple | None = None  # longrope: D/2 divisors of theta_d for l <= L
    long_factor: tuple | None = None   # longrope: D/2 divisors of theta_d for l > L

    def __post_init__(self):
        check_rope(self)  # the checks live at the bottom, with the config.json translation

    @property
    def is_dynamic(self):
        """Whether the frequencies depend on the current length l (then pass it as seq_len)."""
        return self.method in DYNAMIC_METHODS

    @property
    def context_length(self):
        """s * L: how far the method is meant to reach (L for plain RoPE)."""
        return int(self.factor * self.original_max_position_embeddings)

    def replace(self, **changes):
        return RopeConfig(**{**asdict(self), **changes})

    @classmethod
    def from_hf(cls, config, rope_scaling=...):
        """The RopeConfig of a Hugging Face config.json dict: see rope_from_hf at the bottom."""
        return rope_from_hf(config, rope_scaling)

    def to_hf(self):
        """{"rope_theta", "rope_scaling", "max_position_embeddings"} for config.json: see rope_to_hf."""
        return rope_to_hf(self)


# Every method below has the same signature: (cfg, seq_len=None) -> (inv_freq, a). seq_len is the total
# length l of the current sequence; only the dynamic methods read it (None means l <= L).

# ---- 1. plain RoPE (RoFormer, Su et al. 2021) -------------------------------------------------------

def rope_inv_freq(theta, head_dim):
    """theta_d = b^(-2d/D), d = 0 .. D/2-1."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta ** exponents)


def plain_rope(cfg, seq_len=None):
    return rope_inv_freq(cfg.theta, cfg.head_dim), 1.0


# ---- 2. Position Interpolation (Chen et al. 2023) ---------------------------------------------------

def position_interpolation(cfg, seq_len=None):
    """theta'_d = theta_d / s: squeeze s*L positions into the L the model knows.
    Every pair slows down, so nearby tokens become hard to tell apart: hence fine-tuning."""
    return rope_inv_freq(cfg.theta, cfg.head_dim) / cfg.factor, 1.0


# ---- 3. "NTK-aware" interpolation (bloc97, 2023) ----------------------------------------------------

def ntk_base(theta, head_dim, s):
    """b' = b * s^(D/(D-2)): the base change that slows the lowest frequency by exactly s while
    leaving the highest (d = 0) untouched, spreading the interpolation over the pairs."""
    return theta * s ** (head_dim / (head_dim - 2))


def ntk_aware(cfg, seq_len=None):
    """Plain RoPE at the base b'. Without fine-tuning, s must be set above the target L'/L to hold up."""
    return rope_inv_freq(ntk_base(cfg.theta, cfg.head_dim, cfg.factor), cfg.head_dim), 1.0


# ---- 4. Dynamic NTK (emozilla, 2023) ----------------------------------------------------------------

def dynamic_ntk(cfg, seq_len=None):
    """NTK-aware with the factor re-chosen from the current length l, transformers' formula:
    s_l = s*l/L - (s-1) for l > L, else 1 (plain RoPE). With s = 1 this is the paper's s_l = l/L."""
    s, L = cfg.factor, cfg.original_max_position_embeddings
    s_l = 1.0 if seq_len is None or seq_len <= L else (s * seq_len / L) - (s - 1)
    return ntk_aware(cfg.replace(factor=s_l))


# ---- 5. NTK-by-parts (bloc97, 2023; YaRN paper eq. 17-18) -------------------------------------------

def correction_dim(num_rotations, head_dim, theta, L):
    """The (fractional) pair index d whose wavelength lambda_d = 2*pi*b^(2d/D) fits `num_rotations`
    times into L, i.e. solve r(d) = L / lambda_d for d:  d(r) = D * ln(L / (2*pi*r)) / (2 ln b)."""
    return (head_dim * math.log(L / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))


def by_parts_gamma(cfg):
    """gamma_d of the paper: 1 for pairs left alone (more than beta turns within L: high frequencies,
    local order), 0 for pairs interpolated by 1/s (fewer than alpha turns: they never saw a full turn,
    so extrapolating them is unsafe), and a linear ramp between, in pair-index space as the reference
    computes it (so the ramp runs over d(beta) .. d(alpha), rounded outwards when cfg.truncate)."""
    D = cfg.head_dim
    low = correction_dim(cfg.beta_fast, D, cfg.theta, cfg.original_max_position_embeddings)
    high = correction_dim(cfg.beta_slow, D, cfg.theta, cfg.original_max_position_embeddings)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # avoid 0/0 for a one-pair ramp
    ramp = torch.clamp((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    return 1 - ramp


def by_parts_inv_freq(cfg, s):
    """theta'_d = (1 - gamma_d) * theta_d / s + gamma_d * theta_d  (paper eq. 18), computed as
    1/(s * b^(2d/D)) rather than theta_d / s: that is how the reference does it. At s = 1 it is plain
    RoPE, returned as such: the blend would round differently in the last bit."""
    if s == 1.0:
        return rope_inv_freq(cfg.theta, cfg.head_dim)
    pos_freqs = cfg.theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (s * pos_freqs)
    gamma = by_parts_gamma(cfg)
    return interpolated * (1 - gamma) + extrapolated * gamma


def ntk_by_parts(cfg, seq_len=None):
    return by_parts_inv_freq(cfg, cfg.factor), 1.0


# ---- 6. YaRN = NTK-by-parts + attention temperature (paper eq. 20-22) -------------------------------

def yarn_attention_factor(s, m=1.0):
    """a = sqrt(1/t) = 0.1 * m * ln(s) + 1 (paper eq. 22 with m = 1): softmax gets sharper as the
    context grows, to undo the entropy rise that interpolation causes. (transformers: get_mscale.)"""
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0


def yarn(cfg, seq_len=None):
    """By-parts frequencies, and a from s unless config.json gives it: `attention_factor` itself, or
    DeepSeek's ratio of two m's (transformers uses the ratio only when both keys are set)."""
    s = cfg.factor
    if cfg.attention_factor is not None:
        a = cfg.attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        a = float(yarn_attention_factor(s, cfg.mscale) / yarn_attention_factor(s, cfg.mscale_all_dim))
    else:
        a = yarn_attention_factor(s)
    return by_parts_inv_freq(cfg, s), a


# ---- 7. Dynamic YaRN (YaRN paper: its "Dynamic Scaling" applied to YaRN) ----------------------------

def dynamic_yarn(cfg, seq_len=None):
    """YaRN with s = max(1, l/L) from the current length l, for the frequencies and a both.
    Needs no fine-tuning; tools have no rope type for it (see rope_to_hf)."""
    s = 1.0 if seq_len is None else max(1.0, seq_len / cfg.original_max_position_embeddings)
    return yarn(cfg.replace(factor=s))


# ---- 8. Llama 3.1 (Meta, 2024): by-parts in wavelength space ----------------------------------------

def llama3(cfg, seq_len=None):
    """Wavelengths below L/high_freq_factor keep theta_d, above L/low_freq_factor get theta_d/s,
    and in between theta'_d = (1-g) theta_d/s + g theta_d with g = (L/lambda_d - low) / (high - low)."""
    s, L = cfg.factor, cfg.original_max_position_embeddings
    inv_freq = rope_inv_freq(cfg.theta, cfg.head_dim)
    if s == 1.0:  # no stretch: plain RoPE (the blend below would round differently in the last bit)
        return inv_freq, 1.0
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = L / cfg.low_freq_factor, L / cfg.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s, inv_freq)
    # The smoothing is transformers' formula, which is Meta's reference one. Read naively it differs in
    # two ways that change no value but must stay for bit parity: it blends `scaled`, not theta_d
    # (equal wherever the blend is used: the middle band was not divided), and it evaluates
    # ((1-g) * scaled) / s, not (1-g) * (scaled / s). Both band edges belong to the middle band.
    g = (L / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - g) * scaled / s + g * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


# ---- 9. LongRoPE (Ding et al. 2024; Phi-3) ----------------------------------------------------------

def longrope(cfg, seq_len=None):
    """theta'_d = theta_d / f_d, with one divisor per pair found by search rather than by a formula:
    `long_factor` once the text is longer than L (l > L), `short_factor` up to L. a = sqrt(1 + ln s / ln L)
    for s > 1 (Phi-3's rule), unless config.json gives attention_factor. As transformers does it:
    the choice follows l = the largest position + 1 of the current forward, and a does not depend on l."""
    s, L = cfg.factor, cfg.original_max_position_embeddings
    divisors = cfg.long_factor if seq_len and seq_len > L else cfg.short_factor
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
    inv_freq = 1.0 / (torch.tensor(divisors, dtype=torch.float32) * cfg.theta ** exponents)
    if cfg.attention_factor is not None:
        return inv_freq, cfg.attention_factor
    return inv_freq, 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(L))


# ---- the table: a method's name -> (cfg, seq_len) -> (inverse frequencies, attention factor) --------

METHODS = {"none": plain_rope, "linear": position_interpolation, "ntk": ntk_aware, "dynamic-ntk": dynamic_ntk,
           "ntk-by-parts": ntk_by_parts, "yarn": yarn, "dynamic-yarn": dynamic_yarn, "llama3": llama3,
           "longrope": longrope}
DYNAMIC_METHODS = ("dynamic-ntk", "dynamic-yarn", "longrope")  # the ones that read seq_len


def inv_freq_and_attention_factor(cfg, seq_len=None):
    """The whole method as (theta'_d fp32 tensor of D/2, attention factor a). `seq_len` is the total
    length l of the current sequence; only the dynamic methods look at it (None means l <= L)."""
    return METHODS[cfg.method](cfg, seq_len)


# ---- turning frequencies into rotations -------------------------------------------------------------

def rope_cos_sin(inv_freq, positions, attention_factor=1.0):
    """cos/sin of the angles m * theta'_d for explicit positions m, times the attention factor a.
    positions (..., T) -> cos, sin (..., T, D/2), all fp32. Positions are cast to fp32, exact below 2^24."""
    angles = positions[..., None].float() * inv_freq.float()  # (..., T, D/2)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(q, k, cos, sin):
    """Rotate each split-half pair (x1, x2) = (x[..d], x[d + D/2..]) by its angle:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), i.e. x * cos + rotate_half(x) * sin.
    q, k: (B, H, T, D) any dtype; cos, sin: (T, D/2) or (B, T, D/2) fp32. Math in fp32, cast back."""
    if cos.dim() == 3:  # per-batch positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# ---- checks, and Hugging Face config.json <-> RopeConfig --------------------------------------------

def check_int(name, value, low=1):
    """`value` if it is a real integer (not a bool, a float or a string) >= low, else a ValueError
    that names it: config files and flags are checked where they are read."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def check_number(name, value):
    """`value` if it is a finite real number (an int or a float, not a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


MAX_POSITIONS = 2**24  # positions are fp32 here: exact integers up to 2^24, and no further


def check_bounds(cfg):
    """A finite s can still overflow what is computed from it (s*L, NTK's base): the bounds, and why."""
    if cfg.factor > MAX_POSITIONS:
        raise ValueError(f"RoPE scaling factor must be at most 2^24 = {MAX_POSITIONS:,}, got {cfg.factor:g}: positions "
                         "are fp32, at most 2^24 of them, so a larger s squeezes every text we can run into less "
                         "than one original position")
    if cfg.method == "ntk" and (cfg.head_dim <= 2 or not math.isfinite(ntk_base(cfg.theta, cfg.head_dim, cfg.factor))):
        raise ValueError(f"NTK's base b*s^(D/(D-2)) for rope_theta {cfg.theta:g}, factor {cfg.factor:g} and head_dim "
                         f"{cfg.head_dim} is not a finite number")


def check_rope(cfg):
    """RopeConfig's checks: one ValueError naming the field."""
    for f in ("theta", "factor", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
        check_number(f"RoPE {f}", getattr(cfg, f))
    if cfg.method not in METHODS:
        raise ValueError(f"unknown RoPE method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if check_int("RoPE head_dim", cfg.head_dim) % 2:
        raise ValueError(f"RoPE head_dim must be a positive even number, got {cfg.head_dim}")
    if not cfg.theta > 1:  # ln(b) divides in the by-parts ramp; b <= 1 has no frequencies to speak of
        raise ValueError(f"rope_theta must be a finite number > 1, got {cfg.theta}")
    if not cfg.factor >= 1:
        raise ValueError(f"RoPE scaling factor must be >= 1 (and finite), got {cfg.factor}")
    check_int("original_max_position_embeddings", cfg.original_max_position_embeddings)
    check_bounds(cfg)
    for f in ("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
        if not getattr(cfg, f) > 0:
            raise ValueError(f"RoPE {f} must be > 0, got {getattr(cfg, f)}")
    for f in ("attention_factor", "mscale", "mscale_all_dim"):
        if getattr(cfg, f) is not None and not check_number(f"RoPE {f}", getattr(cfg, f)) > 0:
            raise ValueError(f"RoPE {f} must be > 0, got {getattr(cfg, f)}")
    if not isinstance(cfg.truncate, bool):
        raise ValueError(f"RoPE truncate must be true or false, got {cfg.truncate!r}")
    if cfg.method == "llama3" and not cfg.high_freq_factor > cfg.low_freq_factor:
        raise ValueError("llama3 RoPE needs high_freq_factor > low_freq_factor")
    for f in ("short_factor", "long_factor"):
        v = getattr(cfg, f)
        if v is None and cfg.method == "longrope":
            raise ValueError(f"longrope RoPE needs {f}, a list of head_dim/2 = {cfg.head_dim // 2} numbers")
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or len(v) != cfg.head_dim // 2:
            raise ValueError(f"RoPE {f} must be a list of head_dim/2 = {cfg.head_dim // 2} numbers, got "
                             f"{len(v) if isinstance(v, (list, tuple)) else repr(v)}")
        for i, x in enumerate(v):
            if not check_number(f"RoPE {f}[{i}]", x) > 0:
                raise ValueError(f"RoPE {f}[{i}] must be > 0, got {x}")
        setattr(cfg, f, tuple(v))  # immutable, and equal however it was given


# Hugging Face "rope_type" names <-> ours. ntk-by-parts is written as yarn with attention_factor 1;
# static ntk has no type of its own (its base change is baked into rope_theta on save).
_FROM_HF_TYPE = {"default": "none", "none": "none", "linear": "linear", "dynamic": "dynamic-ntk",
                 "yarn": "yarn", "llama3": "llama3", "longrope": "longrope", "su": "longrope"}  # su: early Phi-3


def rope_from_hf(config, rope_scaling=...):
    """Read a Hugging Face config.json dict, in the 4.x form (`rope_theta` + `rope_scaling` with
    `type` or `rope_type`) or the 5.x form (`rope_parameters`, theta inside). Pass `rope_scaling`
    (a HF-style dict, our method names allowed; None for plain RoPE) to override the file's."""
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError("rope_parameters in config.json must be a dict")
    theta = check_number("rope_theta", params.get("rope_theta", config.get("rope_theta", 10000.0)))
    file_scaling = config.get("rope_scaling") or params
    scaling = file_scaling if rope_scaling is ... else (rope_scaling or {})
    if not isinstance(scaling, dict):
        raise ValueError("rope_scaling must be a dict or null")
    if scaling.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported (Llama rotates every dim)")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    max_pos = check_int("max_position_embeddings", config.get("max_position_embeddings", 4096))

    kind = scaling.get("rope_type", scaling.get("type", "default"))
    method = _FROM_HF_TYPE.get(kind, kind)
    if method not in METHODS:
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: "
                         f"{', '.join(sorted(set(_FROM_HF_TYPE) | set(METHODS)))}")
    if method == "yarn" and scaling.get("dynamic"):  # our marker, see rope_to_hf
        method = "dynamic-yarn"
    elif method == "yarn" and scaling.get("attention_factor") == 1.0 and not scaling.get("mscale"):
        method = "ntk-by-parts"  # YaRN without its temperature is exactly NTK-by-parts
    # L: an override's own value first, then the file's (a top-level key first, as transformers
    # does for Phi-3); without any, max_position_embeddings *is* the original length (linear, dynamic).
    key = "original_max_position_embeddings"
    L = ((scaling.get(key) if scaling is not file_scaling else None) or config.get(key)
         or (file_scaling or {}).get(key) or max_pos)
    check_int(key, L)
    factor = scaling.get("factor")
    if factor is not None:
        check_number("rope_scaling factor", factor)
    if method == "none":
        factor = 1.0
    elif factor is None:
        if method == "yarn" and "original_max_position_embeddings" in scaling or method == "longrope":
            factor = max_pos / L  # transformers' rule for yarn and longrope (Phi-3) configs without a factor
        else:
            raise ValueError(f"rope_scaling of type {kind!r} needs a 'factor'")
    required = {"llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "longrope": ("short_factor", "long_factor")}
    missing = [k for k in required.get(method, ()) if k not in scaling]
    if missing:
        raise ValueError(f"{method} rope_scaling is missing {', '.join(missing)}")
    optional = {f.name: scaling[f.name] for f in fields(RopeConfig)
                if f.name in scaling and scaling[f.name] is not None
                and f.name not in ("method", "theta", "head_dim", "factor", "original_max_position_embeddings")}
    # transformers treats beta_fast/beta_slow of 0 or None as "use the default"
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        if key in optional and not optional[key]:
            optional[key] = default
    try:
        return RopeConfig(method=method, theta=float(theta), head_dim=int(head_dim), factor=float(factor),
                          original_max_position_embeddings=int(L), **optional)
    except TypeError as e:
        raise ValueError(f"malformed rope_scaling {scaling!r}: {e}") from None


def rope_to_hf(cfg):
    """The config.json keys for this method in the transformers 4.x form, read by transformers,
    vLLM and llama.cpp's converter: {"rope_theta", "rope_scaling", "max_position_embeddings"}."""
    s, L = cfg.factor, cfg.original_max_position_embeddings
    out = {"rope_theta": cfg.theta, "rope_scaling": None, "max_position_embeddings": L}
    if cfg.method == "none" or s == 1.0 and cfg.method not in ("dynamic-yarn", "longrope"):
        return out
    if cfg.method == "linear":     # vLLM multiplies max_position_embeddings by the factor itself
        out["rope_scaling"] = {"rope_type": "linear", "factor": s}
    elif cfg.method == "dynamic-ntk":
        out["rope_scaling"] = {"rope_type": "dynamic", "factor": s}
    elif cfg.method == "ntk":      # no type anywhere: the new base says it all
        out["rope_theta"] = ntk_base(cfg.theta, cfg.head_dim, s)
        out["max_position_embeddings"] = int(s * L)
    elif cfg.method == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s, "original_max_position_embeddings": L,
                               "low_freq_factor": cfg.low_freq_factor, "high_freq_factor": cfg.high_freq_factor}
        out["max_position_embeddings"] = int(s * L)
        out["original_max_position_embeddings"] = L  # llama.cpp's converter reads L here only (else: 8192)
    elif cfg.method == "longrope":  # vLLM and llama.cpp take s from max_position_embeddings / L
        out["rope_scaling"] = {"rope_type": "longrope", "factor": s, "original_max_position_embeddings": L,
                               "short_factor": list(cfg.short_factor), "long_factor": list(cfg.long_factor)}
        if cfg.attention_factor is not None:
            out["rope_scaling"]["attention_factor"] = cfg.attention_factor
        out["max_position_embeddings"] = int(s * L)
    else:  # yarn, ntk-by-parts (= yarn with a = 1), dynamic-yarn (saved as static yarn + our marker)
        rs = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L}
        if cfg.beta_fast != 32.0 or cfg.beta_slow != 1.0:
            rs.update(beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow)
        if not cfg.truncate:
            rs["truncate"] = False
        if cfg.method == "ntk-by-parts":
            rs["attention_factor"] = 1.0
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(cfg, key) is not None:
                rs[key] = getattr(cfg, key)
        if cfg.method == "dynamic-yarn":
            rs["dynamic"] = True
        out["rope_scaling"] = rs
        out["max_position_embeddings"] = int(s * L)
    return out
