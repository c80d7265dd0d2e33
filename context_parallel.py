"""
Context parallelism: one sequence split over N ranks, for sequences whose activations outgrow one GPU
(Llama 3 8B at 1M tokens: its 32 block inputs alone, all that full checkpointing keeps, are 256 GiB;
split over 8 ranks, 32 GiB each).
Read it after train.py, which calls it in three places: setup() once, enable() on the model, and
inputs_and_targets() on each batch.

    # a million tokens on 8 GPUs: one sequence per step over all 8 (world 8 = 1 data-parallel x --cp 8)
    torchrun --nproc_per_node 8 train.py --init Meta-Llama-3-8B --data data/long --yarn-scale 128 \\
        --original-ctx 8192 --seq-len 1048576 --batch-size 8 --cp 8 --out out/llama3-1m
    # 16 GPUs, --cp 4: 4 data-parallel groups of 4; the sequences of a step are spread over the groups
    torchrun --nnodes 2 --nproc_per_node 8 ... train.py ... --cp 4

How a sequence is split. Cut its T tokens into 2N chunks of c = T / 2N; rank r of a group keeps chunks
r and 2N-1-r (Llama 3's scheme). Under a causal mask chunk i attends to i+1 chunks, so rank r does
(r+1) + (2N-r) = 2N+1 chunk-pairs of attention: the same on every rank. (Contiguous pieces would give
the last rank 2N-1 times the work of the first, and every other rank would wait for it at each layer.)

Why the answer is exact. Everything in a block but attention works token by token: the norms, the
projections, the MLP, and RoPE, given each token's global position (positions() below; a dynamic method
scales for the whole T, not for this rank's T/N). Attention needs every earlier key and value: each layer
all-gathers K and V over the group, then each of the rank's two query chunks attends to the keys up to its
own end, a causal mask aligned to the bottom-right corner. These are the dot products, softmaxes and
sums of one process, added in another order: in fp32 the losses agree to ~1e-7 relative, not bit for
bit (tests/test_context_parallel.py).
The loss and its gradient: see inputs_and_targets().

Why all-gather, and not a ring (ring attention) or Ulysses (all-to-all over heads). It is the simplest
exact choice: one collective, then the plain fused kernel, with no online-softmax merging of partial
results (ring) and no limit of N to the KV head count (Ulysses). It moves K and V at their KV heads, 8 for
Llama 3 8B against 32 query heads: per layer 2 x T x KV x D x b bytes, 4 GiB at 1M tokens in bf16,
gathered while the layer runs (and again in backward under activation checkpointing), and the gradient
reduce-scattered back in fp32 (twice those bytes): at NVLink's ~400 GB/s some 10 and 20 ms (an estimate),
against seconds of attention at that length. Llama 3 was trained at 128k this way (its paper: all-gather K
and V, then local attention). That 4 GiB, and in backward its gradient (bf16, and fp32 for the sum), is
the memory --cp adds per GPU.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


@dataclass
class ContextParallel:
    group: object    # the process group of the N ranks that share each sequence
    rank: int        # r: this rank's place in the group
    size: int        # N
    seq_len: int     # T: the whole sequence's length

    def __post_init__(self):
        # the causal masks of the two query chunks (attention() below), made once here: a CausalBias is a
        # tensor subclass, and making one under selective checkpointing's dispatch mode fails (torch 2.13)
        c = self.seq_len // (2 * self.size)
        self.masks = [causal_lower_right(c, (i + 1) * c) for i in self.chunks()]

    def chunks(self):
        """The two chunks (of the 2N) this rank holds: r and 2N-1-r."""
        return self.rank, 2 * self.size - 1 - self.rank


def setup(n, seq_len, env):
    """The context-parallel group of this rank, or None for --cp 1. Ranks are laid out data-parallel x
    context-parallel: ranks g*N .. g*N+N-1 share one sequence (data-parallel rank g = rank // N). Neighbouring
    ranks sit on one node, so the per-layer all-gather stays on NVLink; FSDP2 still shards over the world."""
    if n == 1:
        return None
    group, _ = dist.new_subgroups(group_size=n)  # every rank takes part in making every group
    return ContextParallel(group, env.rank % n, n, seq_len)


def enable(model, cp):
    """Make `model` (a Llama, FSDP-wrapped or not) take each sequence as this rank's part of it."""
    model.context_parallel = cp  # Llama._hidden: RoPE at global positions, scaled for the whole T
    for block in model.model.layers:
        block.self_attn.context_parallel = cp  # Attention.forward: attention() below


# ---- the data: each rank keeps its two chunks -------------------------------------------------------

def split(x, cp, dim=1):
    """This rank's part of x (..., T, ...) along `dim`: its two chunks, 2c = T/N long."""
    pieces = x.chunk(2 * cp.size, dim)
    return torch.cat([pieces[i] for i in cp.chunks()], dim)


def positions(cp, device):
    """The global positions of this rank's tokens, (T/N,): what RoPE rotates them by."""
    return split(torch.arange(cp.seq_len, device=device), cp, dim=0)


def inputs_and_targets(blocks, cp):
    """blocks (B, T+1) token ids -> this rank's inputs and targets, (B, T/N) each (all of them without CP).

    The loss. Each rank scores its own T/N tokens: its loss l_r is the mean over them. The sequence's loss
    is the mean over all T tokens, (1/N) sum_r l_r, since every rank holds as many. Backward of l_r reaches
    the other ranks' tokens through their keys and values (gather_kv's backward sums those gradients back
    to the rank that owns them), so after backward the ranks' gradients add up to the gradient of sum_r l_r,
    N times the sequence's. FSDP averages gradients over the whole world, dp x N ranks: it divides by that N
    too, so the gradient is exactly the single process's, and no scaling is needed. (Scaling l_r by N, or
    averaging in gather_kv's backward, would each be off by N; summing the logged loss over the group is the
    known bug that reports N times the loss.) train.py's logged loss is the mean over all ranks: the same."""
    x, y = blocks[:, :-1], blocks[:, 1:]
    return (x, y) if cp is None else (split(x, cp), split(y, cp))


# ---- attention over the gathered keys and values ----------------------------------------------------

class GatherKV(torch.autograd.Function):
    """Forward: every rank's x stacked, (N, ...). Backward: each rank's slice of the gradient, summed
    over the ranks (a reduce-scatter, the all-gather's exact dual: each rank's keys were read by the queries
    of every rank), in fp32 as FSDP reduces gradients: N bf16 partial sums would round N times. torch 2.13's
    gloo has reduce_scatter as NCCL does, so CPU and GPU take one path."""

    @staticmethod
    def forward(ctx, x, group, n):  # x (B, KV, 2c, D)
        ctx.group = group
        out = x.new_empty((n, *x.shape))                                  # (N, B, KV, 2c, D)
        dist.all_gather_single(out.view(-1, *x.shape[1:]), x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (N, B, KV, 2c, D): for every rank's keys, from this rank's queries
        mine = grad.new_empty(grad.shape[1:], dtype=torch.float32)        # (B, KV, 2c, D)
        dist.reduce_scatter_single(mine, grad.float().contiguous().view(-1, *grad.shape[2:]), group=ctx.group)
        return mine.to(grad.dtype), None, None


def gather_kv(x, cp):
    """x (B, KV, 2c, D) of this rank's chunks -> (B, KV, T, D) of the whole sequence, in order."""
    parts = GatherKV.apply(x, cp.group, cp.size)       # (N, B, KV, 2c, D): rank j holds chunks j, 2N-1-j
    c = x.size(2) // 2
    first = parts[:, :, :, :c].unbind(0)               # chunks 0 .. N-1, each (B, KV, c, D)
    second = parts[:, :, :, c:].flip(0).unbind(0)      # chunks N .. 2N-1
    return torch.cat(first + second, dim=2)


def attention(q, k, v, cp):
    """Causal attention of this rank's queries q (B, H, 2c, D) over the whole sequence: k and v (B, KV, 2c, D)
    of its chunks are gathered first. Chunk i's queries read the (i+1)c keys up to their own end, the
    causal mask aligned to the bottom-right corner (on CUDA the flash kernel, whose causal mask is)."""
    k, v = gather_kv(k, cp), gather_kv(v, cp)          # (B, KV, T, D)
    c, gqa = q.size(2) // 2, q.size(1) != k.size(1)
    out = []
    for j, (i, mask) in enumerate(zip(cp.chunks(), cp.masks)):
        end = (i + 1) * c
        out.append(F.scaled_dot_product_attention(q[:, :, j * c:(j + 1) * c], k[:, :, :end], v[:, :, :end],
                                                  attn_mask=mask, enable_gqa=gqa))
    return torch.cat(out, dim=2)                       # (B, H, 2c, D)
