"""
A Llama (and Mistral-family) decoder in one file, that loads and saves Hugging Face checkpoints.

    from model import Llama
    model = Llama.from_pretrained("path/to/Llama-2-7b-hf", dtype=torch.bfloat16, device="cuda",
                                  rope_scaling={"rope_type": "yarn", "factor": 32.0})
    loss = model(idx, targets)                 # mean next-token loss, chunked over the vocabulary
    model.setup_cache(batch_size=1, max_len=131072)
    logits = model(prompt, pos=0, last_only=True)   # prefill, then one token at a time with pos=t
    model.save_pretrained("out/llama-yarn")    # config.json + model.safetensors (sharded if large)

What this file teaches: the Llama decoder, read bottom-up: config, RMSNorm, attention, MLP, block, the
model (forward, chunked loss, activation checkpointing, generation with a KV cache that keeps dynamic
RoPE exact), loading and saving. Then the attention function, whose two CPU fast paths are kept out of
the way, and the KV cache. Module names are the Hugging Face ones (model.layers.0.self_attn.q_proj, ...),
so a checkpoint is a plain load_state_dict; the files themselves are checkpoint.py's business, and
rotary embeddings, with every way to scale them, rope.py's.
"""

import math
import os
import sys
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from checkpoint import CheckpointError, check_tensors, read_config, read_tensors, save
from rope import RopeConfig, apply_rope, check_int, check_number, inv_freq_and_attention_factor, rope_cos_sin

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096            # C
    intermediate_size: int = 11008     # SwiGLU hidden width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32      # H
    num_key_value_heads: int = 32      # KV heads; H % KV == 0, fewer means grouped-query attention
    head_dim: int | None = None        # D; defaults to C // H
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    model_type: str = "llama"
    rope: RopeConfig = field(default_factory=RopeConfig)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads"):
            check_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size < self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is smaller than num_attention_heads "
                                 f"{self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_int("head_dim", self.head_dim)
        if not check_number("rms_norm_eps", self.rms_norm_eps) > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):  # eos may list several ids (Llama 3.1 instruct)
            ids = getattr(self, name)
            for i in ids if isinstance(ids, list) and name == "eos_token_id" else [ids]:
                if i is not None:
                    check_int(name, i, low=0)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope.head_dim != self.head_dim:
            self.rope = self.rope.replace(head_dim=self.head_dim)

    @property
    def context_length(self):
        """How far the RoPE method is meant to reach: s * L (L for plain RoPE)."""
        return int(self.rope.factor * self.rope.original_max_position_embeddings)

    @classmethod
    def from_pretrained(cls, path, rope_scaling=...):
        """The config of the checkpoint directory `path`, from its config.json alone (no weights read)."""
        return cls.from_hf(read_config(path), rope_scaling, where=os.path.join(path, "config.json"))

    @classmethod
    def from_hf(cls, hf, rope_scaling=..., where="config.json"):
        """The config of a Hugging Face config.json dict; every value is checked for its type and range,
        and a bad one is a CheckpointError naming `where` (the file) and the key."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"{where}: unsupported model_type {model_type!r}: this is a Llama/Mistral-family "
                                  f"model implementation ({', '.join(SUPPORTED_MODEL_TYPES)})")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: unsupported hidden_act {hf['hidden_act']!r} (Llama uses silu)")
        try:
            for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
                hf[key]  # the shape of the model: never guess it
            names = [n for n in cls.__dataclass_fields__ if n not in ("rope", "model_type", "head_dim")]
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

    def to_hf(self, dtype=torch.float32):
        out = {"architectures": ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
               "model_type": self.model_type, "hidden_act": "silu",
               "torch_dtype": str(dtype).removeprefix("torch.")}
        out.update({n: getattr(self, n) for n in self.__dataclass_fields__ if n not in ("rope", "model_type")})
        out.update(self.rope.to_hf())  # rope_theta, rope_scaling, max_position_embeddings
        return out


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 (as the Llama reference does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same results), faster for one row of input on a multi-core CPU: the
    shape of every projection while decoding a token. A matrix-vector product runs on one core there
    (~15 GB/s of weights); cut into row blocks as one batched product, each core streams its share
    (~28 GB/s on 2 cores), and decoding is bound by reading the weights."""

    def forward(self, x):
        if (torch.compiler.is_compiling() or x.numel() != self.in_features or x.device.type != "cpu"
                or x.dtype != torch.float32 or self.bias is not None or torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        n = torch.get_num_threads()
        if n == 1 or self.out_features % n:
            return F.linear(x, self.weight)
        w = self.weight.view(n, -1, self.in_features)                                   # (n, N/n, C)
        y = torch.bmm(x.reshape(1, 1, -1).expand(n, 1, -1), w.transpose(1, 2))           # (n, 1, N/n)
        return y.view(*x.shape[:-1], self.out_features)


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        H, KV, D, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.n_head, self.n_kv_head, self.head_dim = H, KV, D
        self.layer = layer  # which layer of the KV cache is ours
        self.q_proj = Linear(C, H * D, bias=cfg.attention_bias)
        self.k_proj = Linear(C, KV * D, bias=cfg.attention_bias)
        self.v_proj = Linear(C, KV * D, bias=cfg.attention_bias)
        self.o_proj = Linear(H * D, C, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, cache=None, pos=0, filled=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, k, cos, sin)  # cos/sin carry YaRN's attention factor: logits scale by a^2
        if cache is not None:
            k, v = cache.update(self.layer, pos, k, v, filled)  # (B, KV, S, D): the prefix and these T
        y = attention(q, k, v, filled)                                                 # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D) -> (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(C, I, bias=cfg.mlp_bias)
        self.up_proj = Linear(C, I, bias=cfg.mlp_bias)
        self.down_proj = Linear(I, C, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Activation checkpointing: what a block keeps from forward for backward.
#   none       everything autograd saves: fastest, and at long context far more memory than a GPU has
#   full       only the block's input; backward first runs the whole block again (+1 forward, ~+33%)
#   selective  the block's input and the attention outputs (with their logsumexp); the rest is redone.
# At 64k tokens attention is the costliest part of a block: for Llama 2 7B, 2 * T^2 * C = 35 TFLOP per
# layer against 26 TFLOP for all its matmuls, and it is the cheapest to keep: its output is one (T, C)
# bf16 tensor (0.5 GiB), where the matmul outputs take 5 GiB per layer (q, k, v, o: 4 x 0.5; gate, up:
# 2 x 1.3; down 0.5). So selective keeps 57% of the work for 0.5 GiB, and redoes the cheap rest. Memory
# of the paper's recipe (7B, T = 65536, 8 GPUs, FSDP2, bf16 compute), per GPU: sharded fp32 weights,
# gradients and AdamW 13.5 GiB; block inputs 32 x 0.5 = 16 GiB; one block redone in backward ~10 GiB;
# loss and gathered weights ~3 GiB. Full ~43 GiB, selective +16 GiB = ~59 GiB: both fit an 80 GiB GPU,
# none (~12 GiB per layer, ~400 GiB) does not. An estimate: no GPU has measured it yet.
CHECKPOINTING = ("none", "full", "selective")
ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)}


def keep_attention(ctx, op, *args, **kwargs):
    """The selective policy: save what the fused attention kernels return, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.checkpointing = "none"  # one of CHECKPOINTING; only while gradients are recorded

    def forward(self, x, cos, sin, cache=None, pos=0, filled=None):
        # the checkpoint is inside forward, so that torch.compile of a block (and FSDP2's hooks around
        # it) sees it: compiled, the selective policy becomes part of the graph
        if self.checkpointing == "none" or cache is not None or not torch.is_grad_enabled():
            return self._forward(x, cos, sin, cache, pos, filled)
        if self.checkpointing == "full":
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        policy = partial(create_selective_checkpoint_contexts, keep_attention)  # a partial made here: what dynamo takes
        return checkpoint(self._forward, x, cos, sin, use_reentrant=False, context_fn=policy)

    def _forward(self, x, cos, sin, cache=None, pos=0, filled=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos, filled)
        return x + self.mlp(self.post_attention_layernorm(x))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (h @ W^T) over chunks of rows, its gradient computed in the same pass:
    d loss / d logits = softmax - onehot is known as soon as a chunk's logits are, so each chunk is
    dropped at once. The (N, V) fp32 logits never exist, and unlike checkpointing the chunks, backward
    recomputes nothing (one vocabulary projection and two log-softmax passes fewer per step)."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows):  # h (N, C), weight (V, C), targets (N,) with -100 = skip
        # every matmul in the compute dtype (bf16 under autocast: fp32 operands would run the dW product,
        # as large as the vocabulary projection itself, at the fp32 rate); dW is summed over chunks in fp32
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        hc, wc = h.to(dtype), weight.to(dtype)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.size(0), rows):
            hs, ts = hc[s:s + rows], targets[s:s + rows]
            logp = F.linear(hs, wc).float().log_softmax(-1)  # (rows, V)
            total += F.nll_loss(logp, ts, ignore_index=-100, reduction="sum")
            grad = logp.exp_()                                    # softmax ...
            scored = (ts != -100).nonzero().squeeze(1)
            grad[scored, ts[scored]] -= 1                         # ... minus the one-hot target
            grad[ts == -100] = 0
            grad = grad.to(dtype)
            if dh is not None:
                dh[s:s + rows] = grad @ wc                        # (rows, C)
            if dw is not None:
                dw += grad.t() @ hs                               # (V, C)
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):  # the loss was a plain sum: scale the gradients found in forward
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * grad_total.to(dh.dtype),
                None if dw is None else dw * grad_total.to(dw.dtype), None, None)


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cache = None                    # set up by setup_cache()
        self._rope_tables = {}               # (rope_len, device) -> (inv_freq, attention factor)

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """Weights for training from scratch (weights of a checkpoint are loaded instead)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def set_activation_checkpointing(self, mode):
        """none, full or selective (see CHECKPOINTING above): what each block keeps for backward."""
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation checkpointing must be one of {', '.join(CHECKPOINTING)}, got {mode!r}")
        for block in self.model.layers:
            block.checkpointing = mode

    # ---- rotary tables ----------------------------------------------------------------------------

    def set_rope(self, rope):
        """Switch to another RoPE method without reloading: the rope is not a weight, only the tables
        below. The KV cache goes too: its keys were rotated under the old method."""
        self.config.rope = rope.replace(head_dim=self.config.head_dim)
        self._rope_tables.clear()
        self.cache = None

    def rope_tables(self, rope_len, device):
        """(inv_freq, a) for a sequence of total length rope_len; only dynamic methods depend on it."""
        key = (rope_len if self.config.rope.is_dynamic else None, str(device))
        if key not in self._rope_tables:
            if len(self._rope_tables) > 64:
                self._rope_tables.clear()
            inv_freq, a = inv_freq_and_attention_factor(self.config.rope, rope_len)
            self._rope_tables[key] = (inv_freq.to(device), a)
        return self._rope_tables[key]

    # ---- forward ----------------------------------------------------------------------------------

    def forward(self, idx, targets=None, pos=None, last_only=False, reduction="mean"):
        """idx (B, T) token ids. Without `pos`: a plain causal pass over positions 0..T-1 (training,
        evaluation). With `pos`: tokens at positions pos..pos+T-1 of the KV cache (generation).
        Returns logits (B, T, V) fp32 (last_only: (B, 1, V)), or the loss if targets (B, T) are given
        (-100 marks positions not to score; `reduction` "mean" or "sum")."""
        B, T = idx.shape
        if pos is None:  # dynamic methods scale for the sequence's own length
            h = self._hidden(idx, 0, T)
        else:
            h = self._hidden_cached(idx, pos)
        if targets is not None:
            return self.chunked_loss(h, targets, reduction)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h).float()

    def _hidden(self, idx, pos, rope_len, cache=None):
        """The final normed hidden states (B, T, C) of tokens at positions pos.., under the RoPE tables of
        a text `rope_len` long (dynamic methods), writing keys and values to `cache` if given."""
        T = idx.size(1)
        inv_freq, a = self.rope_tables(rope_len, idx.device)
        positions = torch.arange(pos, pos + T, device=idx.device)
        cos, sin = rope_cos_sin(inv_freq, positions, a)  # (T, D/2) fp32
        x = self.model.embed_tokens(idx)  # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, pos)
        return self.model.norm(x)

    def chunked_loss(self, h, targets, reduction="mean"):
        """Cross-entropy without ever holding the (B*T, V) fp32 logits: the vocabulary projection runs
        over chunks of rows; with gradients, ChunkedCrossEntropy finds them in the same pass."""
        h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        rows = max(256, (1 << 26) // self.config.vocab_size)  # ~256 MiB of fp32 logits per chunk
        weight = self.lm_head.weight
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = ChunkedCrossEntropy.apply(h, weight, targets, rows)
        else:
            total = h.new_zeros((), dtype=torch.float32)
            for s in range(0, h.size(0), rows):
                total = total + self._ce_sum(h[s:s + rows], targets[s:s + rows])
        if reduction == "sum":
            return total
        return total / (targets != -100).sum().clamp(min=1)

    def _ce_sum(self, h, targets):
        return F.cross_entropy(self.lm_head(h).float(), targets, ignore_index=-100, reduction="sum")

    # ---- KV cache for generation ------------------------------------------------------------------

    def setup_cache(self, batch_size, max_len, dtype=None, device=None, dynamic_growth=1.25, chunk_size=4096):
        """Allocate the KV cache once for `max_len` positions (in the weights' dtype by default).

        Static methods cache rotated keys, as usual. Dynamic methods (dynamic-ntk, dynamic-yarn, longrope) rescale
        RoPE with the total length, and with more than one layer even un-rotated keys would go stale: the
        keys of layer 2 depend on layer 1's attention, which depended on the old scale. So the cache
        records the length its scale was computed for (`rope_len`); when the text outgrows it, the
        prefix is recomputed under the new scale (transformers #25104 is the bug this avoids). The new
        rope_len grows geometrically by `dynamic_growth` from L, so recomputation costs a bounded
        multiple of one prefill; dynamic_growth=1 rescales at every token and makes each step equal a
        full forward pass exactly (at quadratic cost)."""
        p = next(self.parameters())
        self.cache = KVCache(self.config, batch_size, max_len, dtype or p.dtype, device or p.device,
                             dynamic_growth, chunk_size)
        self._set_rope_len(self.config.rope.original_max_position_embeddings)
        return self.cache

    def _set_rope_len(self, rope_len):
        self.cache.rope_len = rope_len
        inv_freq, a = self.rope_tables(rope_len, self.cache.inv_freq.device)
        self.cache.inv_freq.copy_(inv_freq)
        self.cache.attention_factor.fill_(a)

    def cache_bytes(self):
        return self.cache.nbytes() if self.cache else 0

    def dynamic_rope_len(self, length):
        """The length a dynamic method scales for once the text is `length` tokens long."""
        L, growth, max_len = self.config.rope.original_max_position_embeddings, self.cache.growth, self.cache.max_len
        if length <= L:
            return L  # every l <= L is plain RoPE (longrope: its short factors)
        if self.config.rope.method == "longrope":
            return max_len  # past L its tables no longer change: one recomputation, not one per step
        if growth <= 1:
            return length
        n = L
        while n < length:
            n = math.ceil(n * growth)
        return min(n, max_len)

    def _hidden_cached(self, idx, pos):
        self._write_tokens(idx, pos)
        return self._hidden(idx, pos, self.cache.rope_len, self.cache)

    def _write_tokens(self, idx, pos):
        """Record tokens pos.. in the cache; a dynamic method whose scale moves recomputes the prefix."""
        if self.cache is None:
            raise RuntimeError("call setup_cache() before decoding with pos=")
        end = pos + idx.size(1)
        if end > self.cache.max_len:
            raise ValueError(f"sequence of {end} tokens does not fit the KV cache of {self.cache.max_len}")
        self.cache.tokens[:, pos:end] = idx
        if self.config.rope.is_dynamic:
            need = self.dynamic_rope_len(end)
            if need != self.cache.rope_len:
                self._set_rope_len(need)
                for s in range(0, pos, self.cache.chunk):  # recompute the prefix under the new scale
                    self._hidden(self.cache.tokens[:, s:min(s + self.cache.chunk, pos)], s, need, self.cache)

    def decode_step(self, idx, pos):
        """Logits (B, 1, V) of one token per sequence, idx (B, 1), at position pos, a (1,) long tensor.
        Every shape is the same at every step: attention reads the whole preallocated cache with the
        positions past pos masked out, the RoPE angle comes from buffers. So torch.compile captures it
        once (with mode="reduce-overhead", one CUDA graph instead of hundreds of kernel launches, as in
        gpt-fast). Call it through decode(), which keeps the cache's tokens and dynamic scale up to date."""
        c = self.cache
        cos, sin = rope_cos_sin(c.inv_freq, pos, c.attention_factor)  # (1, D/2)
        filled = torch.arange(c.max_len, device=pos.device) <= pos      # (S,)
        x = self.model.embed_tokens(idx)  # (B, 1, C)
        for layer in self.model.layers:
            x = layer(x, cos, sin, c, pos, filled)
        return self.lm_head(self.model.norm(x)).float()

    @torch.no_grad()
    def decode(self, idx, pos, step=None):
        """model(idx, pos=pos, last_only=True) for one token (idx (B, 1), pos an int), by decode_step, or
        `step`: the same compiled (compile_decode)."""
        self._write_tokens(idx, pos)
        return (step or self.decode_step)(idx, torch.tensor([pos], device=idx.device))

    def compile_decode(self):
        """decode_step compiled as one graph: a CUDA graph on a GPU, inductor's fused kernels on a CPU."""
        cuda = next(self.parameters()).device.type == "cuda"
        return torch.compile(self.decode_step, mode="reduce-overhead" if cuda else None, fullgraph=True)

    @torch.no_grad()
    def prefill(self, idx, chunk_size=None):
        """Run a prompt (B, P) into an empty cache in chunks (activation memory bounded by the chunk,
        not the prompt) and return the logits of its last position (B, 1, V)."""
        chunk = chunk_size or self.cache.chunk
        if self.config.rope.is_dynamic:  # pick the scale for the whole prompt up front: no recompute
            self._set_rope_len(self.dynamic_rope_len(idx.size(1)))
        for s in range(0, idx.size(1), chunk):
            logits = self(idx[:, s:s + chunk], pos=s, last_only=True)
        return logits

    # ---- loading and saving Hugging Face checkpoints ----------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, rope_scaling=...):
        """Load config.json + model.safetensors (or shards with model.safetensors.index.json).
        The model is built on the meta device and each tensor is read straight into its place
        (load_state_dict(assign=True)), so the weights are never held twice. dtype None keeps the
        stored dtype. rope_scaling (a Hugging Face-style dict, None for plain RoPE) overrides the file's."""
        cfg = LlamaConfig.from_pretrained(path, rope_scaling)
        with torch.device("meta"):
            model = cls(cfg)
        tensors = read_tensors(path, model.shapes(), cfg.tie_word_embeddings, device or "cpu")
        model.load_state_dict({name: t.to(dtype) if dtype else t for name, t in tensors}, strict=False, assign=True)
        if cfg.tie_word_embeddings:  # assign=True replaced the embedding: point the head at it again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def shapes(self):
        """{name: shape} of every tensor of a checkpoint of this model: what config.json implies."""
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    @classmethod
    def check_checkpoint(cls, cfg, path):
        """The names and shapes of the weights at `path` against `cfg`, from the file headers alone:
        a mismatch is found before any memory is allocated. Raises CheckpointError."""
        with torch.device("meta"):
            model = cls(cfg)
        check_tensors(path, model.shapes(), cfg.tie_word_embeddings)

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30, extra_files=()):
        """Write config.json and safetensors ({"format": "pt"} metadata), sharded above
        max_shard_bytes, and copies of `extra_files` (the tokenizer), into a temporary directory that is
        then renamed onto `path`: a crash never leaves a half-written checkpoint, and an existing one is
        only replaced by a complete one."""
        cfg = self.config
        if cfg.rope.method == "dynamic-yarn":
            print("note: dynamic-yarn has no rope type in transformers, vLLM or llama.cpp; config.json "
                  f"declares static yarn at factor {cfg.rope.factor} (with our 'dynamic' marker), "
                  "which those tools will use", file=sys.stderr)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        dtype = next(iter(state.values())).dtype
        return save(path, state, cfg.to_hf(dtype), max_shard_bytes, extra_files)


# ---- attention, and its two CPU fast paths ----------------------------------------------------------

def attention(q, k, v, filled=None):
    """Causal attention of the T queries q (B, H, T, D), the last T of the S positions in k and v
    (B, KV, S, D); with `filled` (S,), decode_step's single query against the whole preallocated cache,
    attending only where filled. Each group of H/KV query heads reads one K/V head (no copies).
    The fused kernel (flash on CUDA) does the work, except for two shapes that are faster otherwise on a
    CPU: one query (decoding) and a chunk of queries after a cached prefix (prefill)."""
    T, S, gqa = q.size(2), k.size(2), q.size(1) != k.size(1)
    cpu = q.device.type == "cpu"
    if filled is not None or (T == 1 and cpu):
        return decode_attention(q, k, v, filled)
    if T == 1:      # one new token sees every cached one
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if S > T and cpu:
        return chunk_attention(q, k, v)
    if S > T:       # a chunk after a prefix: causal, aligned to the bottom-right corner
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def decode_attention(q, k, v, filled=None):
    """One new query per head against the whole cache, as two batched matmuls. The G = H/KV query
    heads sharing a K/V head are G rows of one product, so each cached K/V is read once and never
    copied. On CPU this is 1.3-1.5x faster than the flash kernel, built for long query blocks.
    filled (S,): which cache positions to attend to (decode_step); None: all of k and v."""
    B, H, _, D = q.shape
    qg = q.view(B, k.size(1), H // k.size(1), D)                      # (B, KV, G, D)
    att = (qg @ k.transpose(-1, -2)).float() * D ** -0.5              # (B, KV, G, S), softmax in fp32
    if filled is not None:
        att = att.masked_fill(~filled, float("-inf"))
    return (att.softmax(-1).to(v.dtype) @ v).view(B, H, 1, D)         # (B, KV, G, D) -> (B, H, 1, D)


def chunk_attention(q, k, v, rows=512):
    """A chunk of T queries after S - T cached positions, on CPU. There the bottom-right causal mask is
    materialised, T x S floats, and the flash kernel skips no masked block. Taking the queries `rows`
    at a time, each slice reads the keys up to its own last position only: the mask shrinks to rows x S,
    and the work thrown away to a rows x rows triangle per slice (prefill: 1.1-1.4x faster)."""
    pos, gqa = k.size(2) - q.size(2), q.size(1) != k.size(1)
    y = torch.empty_like(q)  # (B, H, T, D)
    for s in range(0, q.size(2), rows):
        e = min(s + rows, q.size(2))
        y[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :pos + e], v[:, :, :pos + e],
                                                      attn_mask=causal_lower_right(e - s, pos + e), enable_gqa=gqa)
    return y


# ---- the KV cache -----------------------------------------------------------------------------------

class KVCache(nn.Module):
    """What generation keeps between forward passes (Llama.setup_cache explains the dynamic methods):
    keys (already rotated) and values of every layer for positions 0 .. max_len-1, allocated once; the
    token ids, to recompute the prefix when a dynamic scale moves; and the RoPE state they were computed
    under. An nn.Module for its buffers: torch.compile treats those as fixed addresses, as a CUDA graph
    needs (gpt-fast does the same)."""

    def __init__(self, cfg, batch_size, max_len, dtype, device, growth, chunk):
        super().__init__()
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)  # (N, B, KV, S, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("tokens", torch.zeros(batch_size, max_len, dtype=torch.long, device=device),
                             persistent=False)
        # decode_step's RoPE state, rewritten in place when a dynamic scale moves (Llama._set_rope_len)
        self.register_buffer("inv_freq", torch.zeros(cfg.head_dim // 2, device=device), persistent=False)
        self.register_buffer("attention_factor", torch.ones((), device=device), persistent=False)
        self.max_len, self.growth, self.chunk = max_len, growth, chunk
        self.rope_len = cfg.rope.original_max_position_embeddings  # the text length the RoPE scale is for

    def update(self, layer, pos, k, v, filled=None):
        """Store k, v (B, KV, T, D) of positions pos..pos+T-1; return the keys and values to attend to:
        (B, KV, pos+T, D), only what is filled, or with `filled` (decode_step: pos a (1,) tensor, the
        same operation at every step) the whole cache."""
        if filled is not None:
            self.k[layer].index_copy_(2, pos, k)
            self.v[layer].index_copy_(2, pos, v)
            return self.k[layer], self.v[layer]
        end = pos + k.size(2)
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def nbytes(self):
        return (self.k.numel() + self.v.numel()) * self.k.element_size()
