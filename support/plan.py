"""
What a training run will cost, worked out before it runs, from the model's config alone: memory per GPU
by part, tokens, disk, and time at a stated MFU. `train.py --dry-run` prints it and exits (exit code 2,
with a --seq-len or --activation-checkpointing that would fit, when it does not fit); every real run
prints it first, and on CUDA refuses to start a run that cannot fit (--no-fit-check runs it anyway).

    p = Plan(mcfg, seq_len=65536, mode="full", batch_size=64, steps=400, micro_batch=1, gpus=8,
             memory=80 * 2**30, peak_flops=989e12)
    print(p.text())            # the plan, for the user
    p.fits, p.hint()           # whether it fits, and what would

The memory model counts what each part of a step holds at its peak (the first block's backward, when
every layer's kept activations are still there), in bytes, with b the compute dtype's size (2 for bf16),
T the tokens of one forward pass (--micro-batch x --seq-len) and P the parameter count:
  sharded state (FSDP2 over N GPUs)   fp32 weights 4P/N, fp32 gradients 4P/N, AdamW moments 8P/N
  gathered weights                    b * (2 blocks: the one running, the one prefetched; + embeddings and head)
  kept activations                    per layer: none keeps what autograd saves (activation_bytes below,
                                      checked against autograd's own saved tensors in tests/test_plan.py),
                                      full the block's input (b T C), selective the input and the
                                      attention outputs (b T H D + fp32 log-sum-exp)
  one block in backward               its activations again (recomputed, unless none) and its gradients
  loss                                the chunked cross-entropy: dW of the head in fp32 (4 V C), dh, one chunk
  attention workspace                 flash attention's backward: fp32 dq accumulator, dq, dk, dv
It is an estimate: no allocator slack or fragmentation is modelled, which is why a plan fits only within
90% of the GPU's memory.
"""

from dataclasses import dataclass, replace


# dense bf16 peak of each GPU (datasheet, without sparsity), found by a substring of its name
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
GIB = 2**30
FITS = 0.9  # a plan fits when its estimate is at most this share of the GPU's memory


def peak_flops(device_name):
    """The datasheet's dense bf16 FLOP/s of a GPU named so, or None."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def flops_per_token(mcfg, n_params, seq_len):
    """6 flops per weight per token for the matmuls of forward and backward (the embedding lookup is not
    one), plus attention; recomputation is not counted (PaLM's convention, the one MFU uses)."""
    n_matmul = n_params - (0 if mcfg.tie_word_embeddings else mcfg.vocab_size * mcfg.hidden_size)
    return 6 * n_matmul + 12 * mcfg.num_hidden_layers * mcfg.num_attention_heads * mcfg.head_dim * seq_len


def param_counts(mcfg):
    """(all parameters, one block's, the embeddings' and head's): from the config, no model built."""
    C, I, H, KV, D = (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_attention_heads,
                      mcfg.num_key_value_heads, mcfg.head_dim)
    qkv_bias = mcfg.attention_bias or mcfg.qkv_bias
    attn = C * H * D + 2 * C * KV * D + H * D * C + (qkv_bias * (H + 2 * KV) * D) + mcfg.attention_bias * C
    mlp = 3 * C * I + mcfg.mlp_bias * (2 * I + C)
    block = attn + mlp + 2 * C + (2 * D if mcfg.qk_norm else 0)
    root = mcfg.vocab_size * C * (1 if mcfg.tie_word_embeddings else 2) + C
    return block * mcfg.num_hidden_layers + root, block, root


def activation_bytes(mcfg, T, b):
    """Bytes autograd saves for backward in one block over T tokens (batch 1), b the compute dtype's size:
    each RMSNorm its fp32 input, rstd, and two b-sized tensors (the normed x, and x * weight, the next
    matmul's input); q, k, v after RoPE and the attention output and its log-sum-exp (SDPA), the output
    again in (T, H*D) for o_proj; the MLP's gate, silu(gate), up and their product. Qwen3's q/k norms add
    their fp32 input and normed output. (In fp32 the casts are no copies, and the count is the same.)"""
    C, I, H, KV, D = (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_attention_heads,
                      mcfg.num_key_value_heads, mcfg.head_dim)
    norms = 2 * (4 * T * C + 4 * T + 2 * b * T * C)
    attention = b * T * D * (H + 2 * KV) + 2 * b * T * H * D + 4 * H * T
    qk_norm = ((4 + b) * T * D + 4 * T) * (H + KV) if mcfg.qk_norm else 0
    return norms + attention + qk_norm + 4 * b * T * I


def kept_bytes(mcfg, T, b, mode):
    """What one layer keeps from forward until its backward, under an activation checkpointing mode."""
    if mode == "none":
        return activation_bytes(mcfg, T, b)
    kept = b * T * mcfg.hidden_size  # the block's input
    if mode == "selective":  # and what the fused attention kernel returned: its output and log-sum-exp
        kept += b * T * mcfg.num_attention_heads * mcfg.head_dim + 4 * mcfg.num_attention_heads * T
    return kept


def count(n):
    """1.68G, 4.19M, 12.3k, 512: three significant digits."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


@dataclass
class Plan:
    """A run's knobs (given) and what they cost (worked out in __post_init__)."""
    mcfg: object
    seq_len: int
    mode: str                    # activation checkpointing: none, full, selective
    batch_size: int              # sequences per step, all GPUs together
    steps: int
    micro_batch: int             # sequences in one forward pass: what the activations are held for
    gpus: int
    memory: float | None         # bytes per GPU (a CPU: the machine's); None when unknown
    bf16: bool = True            # the compute dtype (fp32 master weights either way)
    peak_flops: float | None = None
    mfu: float = 0.4
    device: str = "GPU"          # "CPU": one process without FSDP, or gloo processes with it
    export_itemsize: int = 2     # bytes per weight of the exported checkpoint

    def __post_init__(self):
        self.params, P_block, P_root = param_counts(self.mcfg)
        m, b, P = self.mcfg, 2 if self.bf16 else 4, self.params
        T = self.micro_batch * self.seq_len  # the tokens of one forward pass: every activation is linear in them
        fsdp = self.device == "GPU" or self.gpus > 1
        C, V, I = m.hidden_size, m.vocab_size, m.intermediate_size
        H, KV, D = m.num_attention_heads, m.num_key_value_heads, m.head_dim
        rows = max(256, (1 << 26) // V)  # fastpaths.chunked_cross_entropy's chunk
        recompute = activation_bytes(m, T, b) - (kept_bytes(m, T, b, "selective") - b * T * C
                                                 if self.mode == "selective" else 0)
        self.parts = {
            "weights (fp32, sharded)": 4 * P / self.gpus,
            "gradients (fp32, sharded)": 4 * P / self.gpus,
            "AdamW moments (fp32, sharded)": 8 * P / self.gpus,
            f"gathered weights ({'bf16' if b == 2 else 'fp32'}: 2 blocks, embeddings, head)":
                b * (2 * P_block + P_root) if fsdp else (b * P if b == 2 else 0),
            f"activations kept for backward ({self.mode})": m.num_hidden_layers * kept_bytes(m, T, b, self.mode),
            "one block in backward (recomputed + gradients)":
                (recompute if self.mode != "none" else 0) + 3 * b * T * I + 4 * P_block,
            "loss (fp32 head gradient, dh, one chunk)": 4 * V * C + 2 * b * T * C + rows * V * (4 + b) + b * V * C,
            "attention workspace (backward)": 4 * T * H * D + b * T * D * (H + 2 * KV),
        }
        self.tokens_per_step = self.batch_size * self.seq_len
        self.flops_per_token = flops_per_token(m, P, self.seq_len)
        self.step_seconds = (self.flops_per_token * self.tokens_per_step / (self.gpus * self.peak_flops * self.mfu)
                             if self.peak_flops else None)
        self.checkpoint_bytes = 12 * P  # fp32 weights and both AdamW moments, over all the ranks' files
        self.export_bytes = self.export_itemsize * P

    @property
    def total(self):
        return sum(self.parts.values())

    @property
    def fits(self):
        return self.memory is None or self.total <= FITS * self.memory

    def text(self):
        """The plan, as the lines a user reads before committing a cluster to it."""
        r = self.mcfg.rope
        where = f"{self.gpus} {self.device}{'s' if self.gpus > 1 else ''}"
        lines = [f"plan: {self.params / 1e9:.2f}B parameters, {r.method} s={r.factor:g} over L="
                 f"{r.original_max_position_embeddings}, {self.seq_len}-token sequences, activation checkpointing "
                 f"{self.mode}, {where}",
                 f"  memory per {self.device} (estimate{'' if self.memory is None else f'; it has {self.memory / GIB:.0f} GiB'}):"]
        lines += [f"    {name if self.gpus > 1 else name.replace(', sharded', ''):<52}{size / GIB:8.2f} GiB"  # one: whole
                  for name, size in self.parts.items()]
        verdict = "" if self.memory is None else (
            f"  fits ({FITS:.0%} of {self.memory / GIB:.0f} GiB)" if self.fits
            else f"  does NOT fit ({FITS:.0%} of {self.memory / GIB:.0f} GiB)")
        lines.append(f"    {'total':<52}{self.total / GIB:8.2f} GiB{verdict}")
        lines.append(f"  tokens: {count(self.tokens_per_step)} per step ({self.batch_size} x {self.seq_len}), "
                     f"{count(self.steps * self.tokens_per_step)} in {self.steps} steps")
        if self.step_seconds:
            hours = self.step_seconds * self.steps / 3600
            lines.append(f"  time at {self.mfu:.0%} MFU of {self.peak_flops / 1e12:.0f} TFLOP/s per GPU: "
                         f"{self.step_seconds:.1f} s per step, {hours:.1f} h in all")
        lines.append(f"  disk: {count(self.checkpoint_bytes)}B per resumable checkpoint, "
                     f"{count(self.export_bytes)}B for the export")
        return "\n".join(lines)

    def hint(self):
        """What would fit, when this does not: full checkpointing, then shorter sequences (halved)."""
        if self.mode != "full" and replace(self, mode="full").fits:
            return f"--activation-checkpointing full fits ({replace(self, mode='full').total / GIB:.1f} GiB)"
        T = self.seq_len
        while T > 64:
            T = max(64, T // 2 // 64 * 64)
            shorter = replace(self, seq_len=T, mode="full")
            if shorter.fits:
                return f"--seq-len {T} with --activation-checkpointing full fits ({shorter.total / GIB:.1f} GiB)"
        return "not even 64-token sequences fit: more GPUs (FSDP shards the weights and AdamW over them)"
