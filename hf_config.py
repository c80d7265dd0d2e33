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

from checkpoint import CheckpointError
from rope import RopeConfig, check_int, check_number

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


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
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
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
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: unsupported model_type {model_type!r}: this is a Llama/Mistral-family "
                              f"model implementation ({', '.join(SUPPORTED_MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: unsupported hidden_act {hf['hidden_act']!r} (Llama uses silu)")
    try:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            hf[key]  # the shape of the model: never guess it
        names = [f.name for f in fields(cls) if f.name not in ("rope", "model_type", "head_dim")]
        kw = {n: hf[n] for n in names if n in hf}
        if hf.get("num_key_value_heads") is None:
            kw["num_key_value_heads"] = hf["num_attention_heads"]
        cfg = cls(**kw, head_dim=hf.get("head_dim"), model_type=model_type)  # the shape, checked first
        cfg = replace(cfg, rope=RopeConfig.from_hf(hf, rope_scaling))
        window = hf.get("sliding_window")
        if window is not None and check_int("sliding_window", window) < hf.get("max_position_embeddings", 0):
            print(f"warning: sliding_window={window} is ignored: attention here is full causal", file=sys.stderr)
        return cfg
    except KeyError as e:
        raise CheckpointError(f"{where} is missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_to_hf(cfg, dtype=torch.float32):
    """The config.json dict of `cfg`, for weights stored in `dtype`."""
    out = {"architectures": ["MistralForCausalLM" if cfg.model_type == "mistral" else "LlamaForCausalLM"],
           "model_type": cfg.model_type, "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch.")}
    out.update({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("rope", "model_type")})
    out.update(cfg.rope.to_hf())  # rope_theta, rope_scaling, max_position_embeddings
    return out
