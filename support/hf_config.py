"""
config.json <-> LlamaConfig: what a Hugging Face config says about the model's shape, which model
families model.py can run, and every value checked for its type and range where it is read (a
config.json is user input). model.py's LlamaConfig calls these; rope.py translates the RoPE keys.

    cfg = LlamaConfig.from_pretrained("Llama-2-7b-hf")   # config_from_hf, via checkpoint.read_config
    json.dump(cfg.to_hf(torch.bfloat16), f)               # config_to_hf
"""

import sys
from dataclasses import fields, replace

import torch

from support.checkpoint import CheckpointError
from support.jsonfile import read_json
from support.publish import write_json
from rope import RopeConfig, check_int, check_number

# The families model.py runs, and what each changes in Llama's decoder. `defaults` are transformers'
# own for keys a config.json leaves out (a missing key means what transformers would make of it).
FAMILIES = {
    "llama":   dict(architecture="LlamaForCausalLM", defaults=dict(rms_norm_eps=1e-6)),
    "mistral": dict(architecture="MistralForCausalLM",  # Llama's decoder, with an optional sliding window
                    defaults=dict(rms_norm_eps=1e-6, num_key_value_heads=8, sliding_window=4096)),
    "qwen2":   dict(architecture="Qwen2ForCausalLM",  # biases on q, k, v (never on o)
                    defaults=dict(rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None), qkv_bias=True),
    "qwen3":   dict(architecture="Qwen3ForCausalLM",  # an RMSNorm over each head of q and k, before RoPE
                    defaults=dict(rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, head_dim=128), qk_norm=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# Families we refuse, and why: one line instead of weights that load into the wrong shapes, or logits that
# are silently wrong.
UNSUPPORTED = {
    "gemma": "embeddings scaled by sqrt(hidden_size), RMSNorm as (1 + weight), a GeLU MLP",
    "gemma2": "Gemma's embeddings and norms, plus logit soft-capping and extra norms around each block",
    "gemma3": "Gemma's embeddings and norms, plus soft-capping, q/k norms and local/global attention layers",
    "gemma3_text": "Gemma's embeddings and norms, plus soft-capping, q/k norms and local/global attention layers",
    "phi3": "fused qkv_proj and gate_up_proj projections",
    "qwen2_moe": "a mixture of experts (with a shared expert) in place of the MLP",
    "qwen3_moe": "a mixture of experts in place of the MLP",
    "mixtral": "a mixture of experts in place of the MLP",
    "deepseek_v2": "multi-head latent attention (MLA) and a mixture of experts",
    "deepseek_v3": "multi-head latent attention (MLA) and a mixture of experts",
}


def check_config(cfg):
    """LlamaConfig's values: integers that are integers, a positive eps, booleans that are booleans,
    heads that divide. Raises ValueError naming the field."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads"):
        check_int(name, getattr(cfg, name))
    if cfg.head_dim is None and cfg.hidden_size < cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is smaller than num_attention_heads {cfg.num_attention_heads}")
    if cfg.head_dim is not None:
        check_int("head_dim", cfg.head_dim)
    if not check_number("rms_norm_eps", cfg.rms_norm_eps) > 0:
        raise ValueError(f"rms_norm_eps must be > 0, got {cfg.rms_norm_eps}")
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias", "qk_norm"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("bos_token_id", "eos_token_id"):  # eos may list several ids (Llama 3.1 instruct)
        ids = getattr(cfg, name)
        for i in ids if isinstance(ids, list) and name == "eos_token_id" else [ids]:
            if i is not None:
                check_int(name, i, low=0)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def config_from_hf(cls, hf, rope_scaling=..., where="config.json"):
    """The `cls` (LlamaConfig) of a Hugging Face config.json dict. A bad value is a CheckpointError
    naming `where` (the file) and the key; rope_scaling overrides the file's (see rope.rope_from_hf)."""
    model_type = hf.get("model_type", "llama")
    if model_type in UNSUPPORTED:
        raise CheckpointError(f"{where}: unsupported model_type {model_type!r}: {UNSUPPORTED[model_type]}, which "
                              f"model.py does not implement (it runs {', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{where}: unsupported model_type {model_type!r}: this is a Llama-family model "
                              f"implementation ({', '.join(SUPPORTED_MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: unsupported hidden_act {hf['hidden_act']!r} (Llama uses silu)")
    family = FAMILIES[model_type]
    hf = {**family["defaults"], **hf}
    try:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            hf[key]  # the shape of the model: never guess it
        names = [f.name for f in fields(cls) if f.name not in ("rope", "model_type", "head_dim", "qkv_bias", "qk_norm")
                 and not (model_type == "qwen2" and f.name in ("attention_bias", "mlp_bias"))]  # fixed in Qwen2
        kw = {n: hf[n] for n in names if n in hf}
        if hf.get("num_key_value_heads") is None:
            kw["num_key_value_heads"] = hf["num_attention_heads"]
        cfg = cls(**kw, head_dim=hf.get("head_dim"), model_type=model_type,  # the shape, checked first
                  qkv_bias=family.get("qkv_bias", False), qk_norm=family.get("qk_norm", False))
        cfg = replace(cfg, rope=RopeConfig.from_hf(hf, rope_scaling))
        window = sliding_window(hf)
        if window is not None and check_int("sliding_window", window) < hf.get("max_position_embeddings", 0):
            print(f"warning: sliding_window={window} is ignored: attention here is full causal", file=sys.stderr)
        return cfg
    except KeyError as e:
        raise CheckpointError(f"{where} is missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def sliding_window(hf):
    """The attention window a config.json asks for, as transformers reads it: Qwen's only counts with
    use_sliding_window (and then from layer max_window_layers on); None is full attention."""
    if "use_sliding_window" in hf and hf["use_sliding_window"] is not True:
        return None
    return hf.get("sliding_window")


def export_note(cfg):
    """What a user must know of an export of `cfg` (printed by Llama.save_pretrained)."""
    if cfg.rope.method == "dynamic-yarn":
        print(f"note: dynamic-yarn has no rope type in transformers, vLLM or llama.cpp; config.json declares static "
              f"yarn at factor {cfg.rope.factor} (with our 'dynamic' marker), which those tools will use", file=sys.stderr)


def config_to_hf(cfg, dtype=torch.float32):
    """The config.json dict of `cfg`, for weights stored in `dtype`. Attention here is full: the export
    says so (sliding_window null), since Mistral's transformers class reads a missing key as a 4096 window."""
    out = {"architectures": [FAMILIES[cfg.model_type]["architecture"]], "model_type": cfg.model_type,
           "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch.")}
    skip = ("rope", "model_type", "qkv_bias", "qk_norm") + (("attention_bias", "mlp_bias") if cfg.model_type == "qwen2" else ())
    out.update({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in skip})
    if cfg.model_type != "llama":
        out["sliding_window"] = None
    if cfg.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    out.update(cfg.rope.to_hf())  # rope_theta, rope_scaling, max_position_embeddings
    return out


# ---- L, the context a new RoPE method scales from ---------------------------------------------------------

# Checkpoints whose max_position_embeddings is not the context they were pretrained at (their model cards
# say so), and the model card's L.
KNOWN_CONTEXTS = [
    (lambda hf: hf.get("model_type") == "qwen3" and hf.get("max_position_embeddings") == 40960, 32768,
     "Qwen3 was pretrained at 32768 tokens (its config's 40960 leaves room for 8192 generated ones)"),
    (lambda hf: hf.get("model_type") == "qwen2" and hf.get("max_position_embeddings") == 131072, 32768,
     "Qwen2 and Qwen2.5 were pretrained at 32768 tokens (their base configs say 131072)"),
    (lambda hf: hf.get("model_type") == "mistral" and hf.get("sliding_window") == 4096
     and hf.get("max_position_embeddings") == 32768, 8192,
     "Mistral 7B v0.1 was trained at 8192 tokens (with a 4096-token window; its config says 32768)"),
]


def export_note(cfg):
    """A note on stderr when the exported config.json cannot say what the model was trained with."""
    if cfg.rope.method == "dynamic-yarn":
        print(f"note: dynamic-yarn has no rope type in transformers, vLLM or llama.cpp; config.json declares static "
              f"yarn at factor {cfg.rope.factor} (with our 'dynamic' marker), which those tools will use", file=sys.stderr)


def pretraining_context(hf, rope):
    """(L, note) for a checkpoint (config.json dict `hf`, its RopeConfig `rope`) whose RoPE a new method is
    to replace: L is the context it was pretrained at. A config whose RoPE is scaled says L itself
    (original_max_position_embeddings) and the note is None; otherwise the note is the one line that says
    which L is taken and why: a model card's, or max_position_embeddings for want of any other."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.method != "none" or "original_max_position_embeddings" in hf or \
            (isinstance(scaling, dict) and "original_max_position_embeddings" in scaling):
        return rope.original_max_position_embeddings, None
    mpe = rope.original_max_position_embeddings  # rope_from_hf's L for plain RoPE: max_position_embeddings
    for match, L, why in KNOWN_CONTEXTS:
        if match(hf):
            return L, f"note: L = {L}: {why}; --original-ctx overrides"
    return mpe, (f"note: L = {mpe}, the max_position_embeddings of config.json, which names no other pretraining "
                 "context; --original-ctx overrides")


def original_context(hf, base, method, original_ctx=None):
    """(L, notes): the context a command's --rope METHOD scales from, on the checkpoint whose config.json is `hf`
    and own RoPE is `base`: --original-ctx if given; the checkpoint's own L for --rope model; else the context
    it was pretrained at (pretraining_context), with the line that says so when config.json
    does not."""
    if original_ctx:
        return original_ctx, []
    if method == "model":
        return base.original_max_position_embeddings, []
    L, note = pretraining_context(hf, base)
    return L, [note] if note else []


def replaced_scaling_note(old, new):
    """One line when a checkpoint that is already RoPE-scaled (Llama 3.1's llama3, a YaRN model) is given
    another method: config.json holds one, so the new one takes the old one's place over the same L."""
    if old.method == "none" or new.method in ("none", old.method):
        return None
    return (f"note: {new.method} s={new.factor:g} over L={new.original_max_position_embeddings} replaces this "
            f"checkpoint's {old.method} s={old.factor:g} (config.json holds one method): the new frequencies reach "
            f"{new.context_length} tokens, and the fine-tune adapts the model to them")


def widen_tokenizer_config(path, context):
    """tokenizer_config.json's model_max_length caps the context in vLLM (and in transformers' warnings): a
    checkpoint extended to `context` tokens says so there too, where the file says less."""
    try:
        cfg = read_json(path)
    except (OSError, ValueError):  # none, or one transformers will complain about itself: left as it came
        return
    if isinstance(cfg.get("model_max_length"), int) and cfg["model_max_length"] < context:
        write_json(path, {**cfg, "model_max_length": context})
