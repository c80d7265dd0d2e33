"""
A Llama-family decoder in one file (Llama 2 and 3, Mistral, Qwen2/2.5, Qwen3), that loads and saves Hugging
Face checkpoints.

    from model import Llama
    model = Llama.from_pretrained("path/to/Llama-2-7b-hf", dtype=torch.bfloat16, device="cuda",
                                  rope_scaling={"rope_type": "yarn", "factor": 32.0})
    loss = model(idx, targets)                 # mean next-token loss, chunked over the vocabulary
    model.setup_cache(batch_size=1, max_len=131072)
    logits = model(prompt, pos=0, last_only=True)   # prefill, then one token at a time with pos=t
    model.save_pretrained("out/llama-yarn")    # config.json + model.safetensors (sharded if large)

What this file teaches: the Llama decoder, read bottom-up: config, RMSNorm, attention, MLP, block, the
model (forward, chunked loss, activation checkpointing, generation with a KV cache that keeps dynamic
RoPE exact), loading and saving; then the KV cache. Module names are the Hugging Face ones
(model.layers.0.self_attn.q_proj, ...), so a checkpoint is a plain load_state_dict. Beside it: rope.py,
context_parallel.py (--cp); in support/: hf_config.py (config.json, families), checkpoint.py (the files),
fastpaths.py (chunked loss, CPU paths), memory.py (tiled MLP, checkpoints in host memory).
"""

import math
import os
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from context_parallel import attention as cp_attention, positions as cp_positions
from rope import RopeConfig, apply_rope, inv_freq_and_attention_factor, rope_cos_sin
from support import checkpoint as hf_files, fastpaths, hf_config, memory  # the guards and savers beside the lesson

Linear = fastpaths.Linear  # nn.Linear, with a faster path for one row on a CPU


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
    attention_bias: bool = False       # biases on q, k, v and o
    mlp_bias: bool = False
    qkv_bias: bool = False             # biases on q, k, v only (Qwen2)
    qk_norm: bool = False              # an RMSNorm over each head of q and k, before RoPE (Qwen3)
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    model_type: str = "llama"
    rope: RopeConfig = field(default_factory=RopeConfig)

    def __post_init__(self):
        hf_config.check_config(self)  # support/hf_config.py: every value's type and range (a config.json is user input)
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.rope.head_dim != self.head_dim:
            self.rope = self.rope.replace(head_dim=self.head_dim)

    @property
    def context_length(self):
        """How far the RoPE method is meant to reach: s * L (L for plain RoPE)."""
        return self.rope.context_length

    @classmethod
    def from_pretrained(cls, path, rope_scaling=...):
        """The config of the checkpoint directory `path`, from its config.json alone (no weights read)."""
        return cls.from_hf(hf_files.read_config(path), rope_scaling, where=os.path.join(path, "config.json"))

    @classmethod
    def from_hf(cls, hf, rope_scaling=..., where="config.json"):
        """The config of a Hugging Face config.json dict, every value checked (support/hf_config.py); a bad one is
        a CheckpointError naming `where` (the file) and the key."""
        return hf_config.config_from_hf(cls, hf, rope_scaling, where)

    def to_hf(self, dtype=torch.float32):
        return hf_config.config_to_hf(self, dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 (as the Llama reference does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        H, KV, D, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.n_head, self.n_kv_head, self.head_dim = H, KV, D
        self.layer = layer  # which layer of the KV cache is ours
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = Linear(C, H * D, bias=qkv_bias)
        self.k_proj = Linear(C, KV * D, bias=qkv_bias)
        self.v_proj = Linear(C, KV * D, bias=qkv_bias)
        self.o_proj = Linear(H * D, C, bias=cfg.attention_bias)
        # Qwen3: each head of q and k normalised (one weight of D shared by all heads) before RoPE
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.context_parallel = None  # context_parallel.py's enable(): x is this rank's part; k, v are gathered

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)     # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, KV, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or KV, T, D)
        q, k = apply_rope(q, k, cos, sin)  # cos/sin carry YaRN's attention factor: logits scale by a^2
        mask = None
        if cache is not None:  # (B, KV, S, D): the prefix and these T (mask: see KVCache.update)
            k, v, mask = cache.update(self.layer, pos, k, v)
        y = attention(q, k, v, mask) if self.context_parallel is None else cp_attention(q, k, v, self.context_parallel)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D) -> (B, T, C)


def attention(q, k, v, mask=None):
    """Causal attention of the T queries q (B, H, T, D), the last T of the S positions in k and v
    (B, KV, S, D); each group of H/KV query heads reads one K/V head (no copies). `mask` (S,): the cache
    positions to attend to, when k and v are a whole preallocated cache (decode_step). The fused kernel
    (flash on CUDA) does the work; support/fastpaths.py takes the masked decode step (any device) and, on a CPU, one
    query or a prefill chunk after a cached prefix, which run faster there."""
    T, S, gqa = q.size(2), k.size(2), q.size(1) != k.size(1)
    if mask is not None or (q.device.type == "cpu" and (T == 1 or S > T)):
        return fastpaths.cache_attention(q, k, v, mask)
    if T == 1:      # one new token sees every cached one
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if S > T:       # a chunk after a prefix: causal, aligned to the bottom-right corner
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(C, I, bias=cfg.mlp_bias)
        self.up_proj = Linear(C, I, bias=cfg.mlp_bias)
        self.down_proj = Linear(I, C, bias=cfg.mlp_bias)
        self.tile = 0  # > 0: in training, `tile` positions at a time, each tile recomputed in backward (memory.py)

    def forward(self, x):
        return memory.tiled_mlp(self.swiglu, x, self.tile, self.parameters()) if self.tile else self.swiglu(x)

    def swiglu(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Activation checkpointing: what a block keeps from forward for backward.
#   none       everything autograd saves: fastest, and at long context far more memory than a GPU has
#   full       only the block's input; backward first runs the whole block again (+1 forward, ~+33%)
#   selective  the block's input and the attention outputs (with their logsumexp); the rest is redone.
# At 64k tokens attention is the costliest part of a block: for Llama 2 7B, 2 * T^2 * C = 35 TFLOP per
# layer against 26 TFLOP for all its matmuls, and it is the cheapest to keep: its output is one (T, C)
# bf16 tensor (0.5 GiB), where the matmul outputs take 5 GiB per layer (q, k, v, o: 4 x 0.5; gate, up: 2 x 1.3;
# down 0.5). So selective keeps 57% of the work for 0.5 GiB. A run's memory: support/plan.py (--dry-run).
CHECKPOINTING = ("none", "full", "selective")


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.checkpointing = "none"  # one of CHECKPOINTING; only while gradients are recorded

    def forward(self, x, cos, sin, cache=None, pos=0):
        # the checkpoint is inside forward, so that torch.compile of a block (and FSDP2's hooks around
        # it) sees it: compiled, the selective policy becomes part of the graph
        if self.checkpointing == "none" or cache is not None or not torch.is_grad_enabled():
            return self._forward(x, cos, sin, cache, pos)
        if self.checkpointing == "full":
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        policy = partial(create_selective_checkpoint_contexts, memory.keep_attention)  # made here: what dynamo takes
        return checkpoint(self._forward, x, cos, sin, use_reentrant=False, context_fn=policy)

    def _forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        self.offload = False                 # block inputs in host memory (set_activation_checkpointing)
        self._rope_tables = {}               # (rope_len, device) -> (inv_freq, attention factor)
        self.context_parallel = None         # context_parallel.py's enable(): idx is this rank's part of a sequence

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

    def set_activation_checkpointing(self, mode, tile_mlp=False, offload=False):
        """none, full or selective (see CHECKPOINTING above): what each block keeps for backward; and two trades
        of time for memory (support/memory.py): the MLP over tiles of C positions, each recomputed in backward
        (+1 MLP forward), and, under full checkpointing, each block's kept input in host memory."""
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation checkpointing must be one of {', '.join(CHECKPOINTING)}, got {mode!r}")
        for block in self.model.layers:
            block.checkpointing, block.mlp.tile = mode, self.config.hidden_size if tile_mlp else 0
        self.offload = offload and mode == "full"

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
        if pos is None:
            h = self._hidden(idx, 0)
        else:
            self._write_tokens(idx, pos)
            h = self._hidden(idx, pos, self.cache)
        if targets is not None:  # in chunks of rows: the (B*T, V) fp32 logits never exist (support/fastpaths.py)
            return fastpaths.chunked_cross_entropy(h, targets, self.lm_head, reduction)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h).float()

    def _hidden(self, idx, pos, cache=None):
        """The final normed hidden states (B, T, C) of tokens at positions pos.. (an int, or a (1,) tensor:
        decode_step). Without a cache, dynamic methods scale for the sequence's own length; with one, the
        keys and values go into it, under the RoPE tables it holds (those of the text it was scaled for)."""
        T, cp = idx.size(1), self.context_parallel  # with cp: RoPE at the global positions, scaled for the whole T
        if cache is None:
            inv_freq, a = self.rope_tables(T if cp is None else cp.seq_len, idx.device)
        else:
            inv_freq, a = cache.inv_freq, cache.attention_factor
        positions = pos + torch.arange(T, device=idx.device) if cp is None else cp_positions(cp, idx.device)
        cos, sin = rope_cos_sin(inv_freq, positions, a)  # (T, D/2) fp32
        x = self.model.embed_tokens(idx)  # (B, T, C)
        for layer in self.model.layers:  # self.offload: what a block keeps for backward waits in host memory
            with memory.saved_on_host(self.offload, x):
                x = layer(x, cos, sin, cache, pos)
        return self.model.norm(x)

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
                    self._hidden(self.cache.tokens[:, s:min(s + self.cache.chunk, pos)], s, self.cache)

    def decode_step(self, idx, pos):
        """Logits (B, 1, V) of one token per sequence, idx (B, 1), at position pos, a (1,) long tensor: the same
        shapes at every step (the cache hands attention all its positions, those past pos masked), so
        torch.compile captures it once (on a GPU one CUDA graph, as in gpt-fast). Call it through decode(),
        which keeps the cache's tokens and dynamic scale up to date."""
        return self.lm_head(self._hidden(idx, pos, self.cache)).float()

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
    def from_pretrained(cls, path, dtype=None, device=None, rope_scaling=..., config=None):
        """Load config.json (or take `config`, read already) and the safetensors weights, built on the meta
        device with each tensor read straight into its place (load_state_dict(assign=True)): never held twice.
        dtype None keeps the stored dtype; rope_scaling (a Hugging Face-style dict) overrides the file's."""
        cfg = config or LlamaConfig.from_pretrained(path, rope_scaling)
        with torch.device("meta"):
            model = cls(cfg)
        tensors = hf_files.read_tensors(path, model.shapes(), cfg.tie_word_embeddings, device or "cpu")
        model.load_state_dict({name: t.to(dtype) if dtype else t for name, t in tensors}, strict=False, assign=True)
        if cfg.tie_word_embeddings:  # assign=True replaced the embedding: point the head at it again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def shapes(self):
        """{name: shape} of every tensor of a checkpoint of this model: what config.json implies."""
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30, extra_files=()):
        """config.json, the weights as safetensors (sharded above max_shard_bytes) and `extra_files` (the
        tokenizer), staged aside and swapped in whole (support/checkpoint.py): a crash never half-writes one."""
        cfg = self.config
        hf_config.export_note(cfg)  # what other tools will make of this method
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        dtype = next(iter(state.values())).dtype
        return hf_files.save(path, state, cfg.to_hf(dtype), max_shard_bytes, extra_files)


# ---- the KV cache -----------------------------------------------------------------------------------

class KVCache(nn.Module):
    """What generation keeps between forward passes (Llama.setup_cache explains the dynamic methods): rotated
    keys and values of every layer for positions 0 .. max_len-1, allocated once; the token ids, to recompute
    the prefix when a dynamic scale moves; the RoPE state they were computed under. An nn.Module for its
    buffers: torch.compile treats those as fixed addresses, as a CUDA graph needs (gpt-fast does the same).
    update() has two shapes, by the type of `pos`. An int (prefill, eager decoding): attention reads the
    pos + T positions written so far. A (1,) tensor (decode_step): attention reads all max_len positions,
    those past pos masked, the same shapes every step, so one CUDA graph replays each token."""

    def __init__(self, cfg, batch_size, max_len, dtype, device, growth, chunk):
        super().__init__()
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)  # (N, B, KV, S, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("tokens", torch.zeros(batch_size, max_len, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("positions", torch.arange(max_len, device=device), persistent=False)
        # the RoPE state of the cached keys, rewritten in place when a dynamic scale moves (Llama._set_rope_len)
        self.register_buffer("inv_freq", torch.zeros(cfg.head_dim // 2, device=device), persistent=False)
        self.register_buffer("attention_factor", torch.ones((), device=device), persistent=False)
        self.max_len, self.growth, self.chunk = max_len, growth, chunk
        self.rope_len = cfg.rope.original_max_position_embeddings  # the text length the RoPE scale is for

    def update(self, layer, pos, k, v):
        """Store k, v (B, KV, T, D) of positions pos..pos+T-1; return (keys, values, mask) to attend to:
        with an int pos, the (B, KV, pos+T, D) written so far and no mask; with a (1,) tensor pos (T = 1),
        the whole cache and the (max_len,) mask of the positions up to pos."""
        if isinstance(pos, torch.Tensor):
            self.k[layer].index_copy_(2, pos, k)
            self.v[layer].index_copy_(2, pos, v)
            return self.k[layer], self.v[layer], self.positions <= pos
        end = pos + k.size(2)
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], None

    def nbytes(self):
        return (self.k.numel() + self.v.numel()) * self.k.element_size()
