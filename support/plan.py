"""
What a training run will cost, worked out before it runs, from the model's config alone: memory per GPU
by part, host memory per node, tokens, disk, and time at a stated MFU, with what each memory switch adds.
`train.py --dry-run` prints it and exits (exit code 2 when it does not fit, with the cheapest switches or
--seq-len that would); every real run prints it first, and on CUDA refuses to start a run that cannot fit
(--no-fit-check runs it anyway).

    p = Plan(mcfg, seq_len=131072, mode="full", batch_size=64, steps=400, micro_batch=1, gpus=8,
             memory=80 * 2**30, peak_flops=989e12, cp=2, tile_mlp=True)
    print(p.text())            # the plan, for the user
    p.fits, p.hint()           # whether it fits, and what would

The memory model counts what each part of a step holds at its peak (the first block's backward, when
every layer's kept activations are still there), in bytes, with b the compute dtype's size (2 for bf16),
T the tokens of one forward pass (--micro-batch x --seq-len), Tl = T/cp those of one GPU under context
parallelism, and P the parameter count:
  sharded state (FSDP2 over N GPUs)   fp32 weights 4P/N, fp32 gradients 4P/N, AdamW moments 8P/N; on the host
                                      with --cpu-offload (and 2 blocks' fp32 shards on their way through)
  gathered weights                    b * (2 blocks: the one running, the one prefetched; + embeddings and head)
  kept activations                    per layer: none keeps what autograd saves (activation_bytes below,
                                      checked against autograd's own saved tensors in tests/test_plan.py),
                                      full the block's input (b Tl C), selective the input and the
                                      attention outputs (b Tl H D + fp32 log-sum-exp); a tiled MLP keeps
                                      none of its intermediates; --offload-checkpoints moves full's to the
                                      host (pinned), 2 left on the GPU (one going out, one coming back)
  one block in backward               its activations again (recomputed, unless none) and its gradients;
                                      tiled, the MLP's for one tile of C positions (+ fp32 weight-gradient sums)
  loss                                the chunked cross-entropy: dW of the head in fp32 (4 V C), dh, one chunk
  attention workspace                 flash attention's backward: fp32 dq accumulator, dq, dk, dv (dk, dv
                                      over all T keys under --cp, and the all-gathered K and V, 2 b T KV D)
Host memory per node counts the ranks of one node (8 GPUs, or fewer): --cpu-offload's state, the pinned
checkpoints, and the export (rank 0 gathers the fp32 weights). It is an estimate: no allocator slack or
fragmentation is modelled, which is why a plan fits only within 90% of the memory.
"""

from dataclasses import dataclass, replace


# dense bf16 peak of each GPU (datasheet, without sparsity), found by a substring of its name
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
GIB = 2**30
FITS = 0.9  # a plan fits when its estimate is at most this share of the GPU's memory
PCIE_BYTES_PER_S = 25e9  # host <-> GPU, one direction, as measured on PCIe 4.0 x16 (5.0 doubles it): for estimates


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


def activation_bytes(mcfg, T, b, tile_mlp=False):
    """Bytes autograd saves for backward in one block over T tokens (batch 1), b the compute dtype's size:
    each RMSNorm its fp32 input, rstd, and two b-sized tensors (the normed x, and x * weight, the next
    matmul's input); q, k, v after RoPE and the attention output and its log-sum-exp (SDPA), the output
    again in (T, H*D) for o_proj; the MLP's gate, silu(gate), up and their product, none of which a tiled
    MLP keeps (its input, x * weight, is the norm's). Qwen3's q/k norms add their fp32 input and normed
    output. (In fp32 the casts are no copies, and the count is the same.)"""
    C, I, H, KV, D = (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_attention_heads,
                      mcfg.num_key_value_heads, mcfg.head_dim)
    norms = 2 * (4 * T * C + 4 * T + 2 * b * T * C)
    attention = b * T * D * (H + 2 * KV) + 2 * b * T * H * D + 4 * H * T
    qk_norm = ((4 + b) * T * D + 4 * T) * (H + KV) if mcfg.qk_norm else 0
    return norms + attention + qk_norm + (0 if tile_mlp else 4 * b * T * I)


def kept_bytes(mcfg, T, b, mode, tile_mlp=False):
    """What one layer keeps from forward until its backward, under an activation checkpointing mode."""
    if mode == "none":
        return activation_bytes(mcfg, T, b, tile_mlp)
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
    cp: int = 1                  # context parallelism: each sequence split over cp GPUs (T/cp tokens each)
    tile_mlp: bool = False       # the MLP over tiles of C positions, recomputed in backward
    offload: bool = False        # full checkpointing's kept block inputs in host memory
    cpu_offload: bool = False    # FSDP2's CPUOffloadPolicy: fp32 weights, gradients and AdamW in host memory
    host_memory: float | None = None  # bytes of host memory per node; None when unknown
    gpus_per_node: int = 8

    def __post_init__(self):
        self.params, P_block, P_root = param_counts(self.mcfg)
        m, b, P, N, L = self.mcfg, 2 if self.bf16 else 4, self.params, self.gpus, self.mcfg.num_hidden_layers
        T = self.micro_batch * self.seq_len  # the tokens of one forward pass: every activation is linear in them
        Tl = T // self.cp                    # those of one GPU: context parallelism splits the sequence
        gpu = self.device == "GPU"
        C, V, I = m.hidden_size, m.vocab_size, m.intermediate_size
        H, KV, D = m.num_attention_heads, m.num_key_value_heads, m.head_dim
        self.host_state, self.offloaded = self.cpu_offload and gpu, self.offload and self.mode == "full" and gpu
        kept = L * kept_bytes(m, Tl, b, self.mode, self.tile_mlp)
        self.parts = {} if self.host_state else {
            "weights (fp32, sharded)": 4 * P / N,
            "gradients (fp32, sharded)": 4 * P / N,
            "AdamW moments (fp32, sharded)": 8 * P / N}
        self.parts |= {
            f"gathered weights ({'bf16' if b == 2 else 'fp32'}: 2 blocks, embeddings, head"
            f"{'; shards' * self.host_state})":
                self.gathered_bytes(b, P_block, P_root),
            f"activations kept for backward ({self.mode}{'; 2 on the GPU' if self.offloaded else ''})":
                2 * b * Tl * C if self.offloaded else kept,
            "one block in backward (recomputed + gradients)": self.block_backward_bytes(Tl, b, P_block),
            "loss (fp32 head gradient, dh, one chunk)":
                4 * V * C + 2 * b * Tl * C + max(256, (1 << 26) // V) * V * (4 + b) + b * V * C,
            "attention workspace (backward)": 4 * Tl * H * D + b * D * (Tl * H + 2 * T * KV),  # dq fp32; dq, dk, dv
        }
        if self.cp > 1:  # each GPU attends its T/cp queries to all T keys: one layer's K and V gathered
            self.parts["K and V of one layer, all-gathered (--cp)"] = 2 * b * T * KV * D
        ranks = min(N, self.gpus_per_node) if gpu else 0
        self.host_parts = {k: v for k, v in {
            "fp32 weights, gradients, AdamW (--cpu-offload)": ranks * 16 * P / N if self.host_state else 0,
            "kept activations, pinned (--offload-checkpoints)": ranks * kept if self.offloaded else 0,
            "the export on rank 0 (fp32 weights gathered, a copy)": (4 + self.export_itemsize) * P if gpu else 0,
        }.items() if v}
        self.tokens_per_step = self.batch_size * self.seq_len
        self.flops_per_token = flops_per_token(m, P, self.seq_len)
        self.step_seconds = (self.flops_per_token * self.tokens_per_step / (self.gpus * self.peak_flops * self.mfu)
                             if self.peak_flops else None)
        self.checkpoint_bytes = 12 * P  # fp32 weights and both AdamW moments, over all the ranks' files
        self.export_bytes = self.export_itemsize * P

    def gathered_bytes(self, b, P_block, P_root):
        """The compute-dtype weights FSDP2 gathers (2 blocks: the one running, the one prefetched; and the
        root), or autocast's bf16 copy of all weights without FSDP; with --cpu-offload also the fp32 shards
        of 2 blocks copied to the GPU to be gathered, and their gradients' shards on their way out."""
        if not (self.device == "GPU" or self.gpus > 1):
            return b * self.params if b == 2 else 0
        return b * (2 * P_block + P_root) + (16 * P_block / self.gpus if self.host_state else 0)

    def block_backward_bytes(self, T, b, P_block):
        """One block in backward: its activations recomputed (unless none kept them all), the MLP's
        intermediate gradients (tiled: one tile's intermediates and gradients, the fp32 sums of the MLP's
        weight gradients, dx), and the block's weight gradients in fp32 before they are reduce-scattered."""
        m = self.mcfg
        C, I = m.hidden_size, m.intermediate_size
        recompute = 0 if self.mode == "none" else activation_bytes(m, T, b, self.tile_mlp)
        if self.mode == "selective":  # what selective kept is not recomputed
            recompute -= kept_bytes(m, T, b, "selective") - b * T * C
        tile = min(C, T)
        mlp = 7 * b * tile * I + 4 * 3 * C * I + b * T * C if self.tile_mlp else 3 * b * T * I
        return recompute + mlp + 4 * P_block

    @property
    def total(self):
        return sum(self.parts.values())

    @property
    def host_total(self):
        return sum(self.host_parts.values())

    @property
    def fits(self):
        return ((self.memory is None or self.total <= FITS * self.memory)
                and (self.host_memory is None or self.host_total <= FITS * self.host_memory))

    def switches(self):
        """The memory switches in force, as train.py's flags."""
        return [flag for flag, on in (("--tile-mlp", self.tile_mlp), (f"--cp {self.cp}", self.cp > 1),
                                      ("--offload-checkpoints", self.offload and self.mode == "full"),
                                      ("--cpu-offload", self.host_state)) if on]

    def text(self):
        """The plan, as the lines a user reads before committing a cluster to it."""
        r = self.mcfg.rope
        where = f"{self.gpus} {self.device}{'s' if self.gpus > 1 else ''}"
        lines = [f"plan: {self.params / 1e9:.2f}B parameters, {r.method} s={r.factor:g} over L="
                 f"{r.original_max_position_embeddings}, {self.seq_len}-token sequences, activation checkpointing "
                 f"{self.mode}{''.join(', ' + s for s in self.switches())}, {where}",
                 f"  memory per {self.device} (estimate{'' if self.memory is None else f'; it has {self.memory / GIB:.0f} GiB'}):"]
        parts = {(k if self.gpus > 1 else k.replace(", sharded", "")): v for k, v in self.parts.items()}  # one: whole
        lines += self.table(parts, self.total, self.memory)
        if self.host_parts:
            known = '' if self.host_memory is None else f'; it has {self.host_memory / GIB:.0f} GiB'
            ranks = min(self.gpus, self.gpus_per_node)
            lines.append(f"  host memory per node ({ranks} GPU{'s' if ranks > 1 else ''} a node; estimate{known}):")
            lines += self.table(self.host_parts, self.host_total, self.host_memory)
        lines.append(f"  tokens: {count(self.tokens_per_step)} per step ({self.batch_size} x {self.seq_len}), "
                     f"{count(self.steps * self.tokens_per_step)} in {self.steps} steps")
        if self.step_seconds:
            hours = self.step_seconds * self.steps / 3600
            lines.append(f"  time at {self.mfu:.0%} MFU of {self.peak_flops / 1e12:.0f} TFLOP/s per GPU: "
                         f"{self.step_seconds:.1f} s per step, {hours:.1f} h in all")
        lines += self.costs()
        lines.append(f"  disk: {count(self.checkpoint_bytes)}B per resumable checkpoint, "
                     f"{count(self.export_bytes)}B for the export")
        return "\n".join(lines)

    @staticmethod
    def table(parts, total, memory):
        lines = [f"    {name:<58}{size / GIB:8.2f} GiB" for name, size in parts.items()]
        verdict = "" if memory is None else (f"  fits ({FITS:.0%} of {memory / GIB:.0f} GiB)" if total <= FITS * memory
                                             else f"  does NOT fit ({FITS:.0%} of {memory / GIB:.0f} GiB)")
        return lines + [f"    {'total':<58}{total / GIB:8.2f} GiB{verdict}"]

    def costs(self):
        """What the switches add to a step, estimated: work recomputed, bytes over PCIe."""
        m, b, N = self.mcfg, 2 if self.bf16 else 4, self.gpus
        micro_steps = max(1, self.batch_size * self.cp // (N * self.micro_batch))
        notes = []
        if self.tile_mlp:  # one more MLP forward per layer and token: 3 matmuls of C x I
            extra = 6 * m.hidden_size * m.intermediate_size * m.num_hidden_layers / self.flops_per_token
            notes.append(f"tiled MLP +{extra:.1%} FLOPs (one more MLP forward)")
        if self.offloaded:
            moved = m.num_hidden_layers * b * self.micro_batch * self.seq_len // self.cp * m.hidden_size * micro_steps
            notes.append(f"offloaded checkpoints {count(moved)}B each way per GPU per step "
                         f"({moved / PCIE_BYTES_PER_S:.1f} s at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s, beside the compute)")
        if self.host_state:  # fp32 shards in twice (forward, backward) and gradients out, every micro-step
            moved = 12 * self.params / N * micro_steps
            notes.append(f"--cpu-offload {count(moved)}B over PCIe per GPU per step "
                         f"({moved / PCIE_BYTES_PER_S:.1f} s at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s) and AdamW's step "
                         f"on the host ({count(self.params / N)} parameters per GPU)")
        return [f"  extra time (estimates): {'; '.join(notes)}"] if notes else []

    def hint(self):
        """What would fit, when this does not: the switches in a fixed order of cost (full checkpointing,
        the tiled MLP, --cp 2, 4, ... up to the GPUs, offloaded checkpoints, CPU offload) added one at a time
        until the plan fits, then each left out again if it fits without it (the dearest first); with all
        of them and still too big, shorter sequences (halved), the switches again as few as fit."""
        ladder = self.ladder()
        for i in range(len(ladder)):
            if replace(self, **ladder[i]).fits:
                return self.say(self.fewest(ladder[i]))
        T = self.seq_len
        while T > 64:
            T = max(64, T // 2 // 64 * 64)
            shorter = replace(self, seq_len=T, **{**ladder[-1], "cp": self.largest_cp(T)})
            if shorter.fits:
                return self.say(self.fewest({**ladder[-1], "cp": shorter.cp, "seq_len": T}))
        return "not even 64-token sequences fit: more GPUs (FSDP shards the weights and AdamW over them)"

    def ladder(self):
        """The cumulative switch settings, cheapest first (one GPU per sequence before several; a copy over
        PCIe beside the compute before the optimizer's step on the host)."""
        steps, now = [], {}
        for change in ([dict(mode="full"), dict(tile_mlp=True)]
                       + [dict(cp=c) for c in (2, 4, 8, 16, 32, 64) if self.cp < c <= self.largest_cp(self.seq_len)]
                       + ([dict(offload=True), dict(cpu_offload=True)] if self.device == "GPU" else [])):
            now = {**now, **change}
            steps.append(now)
        return steps

    def largest_cp(self, seq_len):
        """The most GPUs one sequence can be split over: a power of two dividing the GPUs and the batch's
        share, each GPU keeping a multiple of 64 tokens."""
        cp = 1
        while (self.device == "GPU" and self.gpus % (2 * cp) == 0 and seq_len % (2 * cp * 64) == 0
               and cp < max(self.cp, 64)):
            cp *= 2
        return max(cp, self.cp)

    def fewest(self, settings):
        """`settings` (which fit) with each switch turned back to this plan's own where it still fits,
        the dearest first; --cp down to the smallest that fits."""
        for key in ("cpu_offload", "offload", "cp", "tile_mlp", "mode"):
            if key not in settings:
                continue
            if key == "cp":
                while settings["cp"] > self.cp and replace(self, **{**settings, "cp": settings["cp"] // 2}).fits:
                    settings = {**settings, "cp": settings["cp"] // 2}
            elif replace(self, **{**settings, key: getattr(self, key)}).fits:
                settings = {**settings, key: getattr(self, key)}
        return settings

    def say(self, settings):
        """The flags of `settings` that differ from this plan's, and the memory they need."""
        p = replace(self, **settings)
        flags = [f"--seq-len {p.seq_len}" if p.seq_len != self.seq_len else ""]
        flags.append(f"--activation-checkpointing {p.mode}" if p.mode != self.mode else "")
        flags += [f for f in p.switches() if f not in self.switches()]
        host = f", {p.host_total / GIB:.0f} GiB of host memory per node" if p.host_parts and p.host_total > (
            self.host_total if self.host_parts else 0) and (p.host_state or p.offloaded) else ""
        return f"{' '.join(f for f in flags if f)} fits ({p.total / GIB:.1f} GiB{host})"
