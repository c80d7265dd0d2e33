"""
What model.py calls to trade time for memory at long context, kept beside the lesson: the selective
checkpointing policy, the MLP over tiles of the sequence, and the block inputs kept in host memory.
Each gives the gradients of the plain model (tests/test_memory.py checks them against it; tests/test_plan.py
checks what they keep against plan.py's formulas).

    from support import memory
    y = memory.tiled_mlp(mlp.swiglu, x, tile, mlp.parameters())  # (B, T, C): tile by tile, recomputed in backward
    with memory.saved_on_host(True, x):  # what a block saves of x's positions waits in host memory
        y = block(x, cos, sin)

Where the memory goes at long context (Llama-3.1-8B, bf16, per token): a block's input 8 KiB (what full
checkpointing keeps, per layer), its MLP's intermediates 112 KiB (gate, silu(gate), up, their product: 4 x
14336 x 2 bytes), the rest of the block 92 KiB. So the MLP is more than half of what a block holds in its
backward, and tiling it leaves one tile's share; offloading moves the 8 KiB x 32 layers to the host.
"""

import weakref
from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy

# ---- selective checkpointing: keep what the fused attention kernels return -----------------------------

ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)}


def keep_attention(ctx, op, *args, **kwargs):
    """The selective policy: save what the fused attention kernels return, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


# ---- the tiled MLP ------------------------------------------------------------------------------------

def tiled_mlp(fn, x, tile, params):
    """fn(x) for x (B, T, C), `tile` positions at a time; fn is the MLP (position-wise, so tiles are
    independent) and `params` its parameters. Only x is kept for backward: each tile's intermediates
    (B, tile, I) exist for one tile at a time, in forward and again in backward (ALST's TiledMLP). Without
    gradients, or for a sequence of one tile, it is fn(x)."""
    if not (torch.is_grad_enabled() and x.size(1) > tile):
        return fn(x)
    return TiledMLP.apply(fn, tile, x, *params)


class TiledMLP(torch.autograd.Function):
    """The MLP over tiles of the sequence, each tile recomputed in backward: its gradient is that of the
    plain MLP, the parameters' summed over the tiles in fp32 (the plain MLP sums over positions inside one
    matmul: equal up to the order of the sum)."""

    @staticmethod
    def forward(ctx, fn, tile, x, *params):
        ctx.fn, ctx.tile, ctx.autocast = fn, tile, autocast_state(x.device.type)
        ctx.save_for_backward(x, *params)
        out = None
        for s in range(0, x.size(1), tile):
            y = fn(x[:, s:s + tile])                     # (B, tile, C)
            if out is None:
                out = y.new_empty(x.shape[:2] + y.shape[2:])
            out[:, s:s + tile] = y
        return out

    @staticmethod
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        need = ctx.needs_input_grad[2:]
        dx = torch.empty_like(x) if need[0] else None
        sums = [torch.zeros_like(p, dtype=torch.float32) if n else None for p, n in zip(params, need[1:])]
        for s in range(0, x.size(1), ctx.tile):
            with torch.enable_grad(), torch.autocast(x.device.type, **ctx.autocast):
                xt = x[:, s:s + ctx.tile].detach().requires_grad_(need[0])
                y = ctx.fn(xt)                           # this tile's intermediates, again
            wrt = [t for t, n in zip([xt, *params], need) if n]
            grads = iter(torch.autograd.grad(y, wrt, dy[:, s:s + ctx.tile]))
            if need[0]:
                dx[:, s:s + ctx.tile] = next(grads)
            for acc in sums:
                if acc is not None:
                    acc += next(grads)
        return (None, None, dx, *(None if a is None else a.to(p.dtype) for a, p in zip(sums, params)))


def autocast_state(device_type):
    """The autocast in force, to recompute under the same in backward (which runs outside it)."""
    return dict(enabled=torch.is_autocast_enabled(device_type), dtype=torch.get_autocast_dtype(device_type))


# ---- checkpoints offloaded to host memory -------------------------------------------------------------

_side_stream = {}  # device -> the CUDA stream the copies to and from the host run on, beside the compute
_last = {}         # device -> the activation moved out last (a weak reference): the one before the next


class Offloaded:
    """An activation in host memory: the device it goes back to, and the one moved out before it (the next
    to come back: backward runs the blocks in reverse), whose copy in starts when this one is unpacked."""
    __slots__ = ("device", "host", "before", "back", "ready", "__weakref__")

    def __init__(self, device, host):
        self.device, self.host, self.back, self.ready = device, host, None, None
        self.before = _last.get(device)
        _last[device] = weakref.ref(self)


@contextmanager
def saved_on_host(enabled, x):
    """While a checkpointed block runs its forward on x (B, T, C): the activations autograd saves for its
    backward (tensors of x's B x T positions) go to host memory, and come back when the backward unpacks
    them; weights and the RoPE tables stay. Under full checkpointing that is the block's input alone
    (torch's non-reentrant checkpoint saves its inputs as saved tensors, which these hooks see). On CUDA
    the host buffer is pinned and the copies run on a side stream, beside the compute: out during the next
    blocks' forward, in during the backward of the block after (one block ahead). On a CPU it is a copy
    into a second buffer, unpacked as it is (nothing saved: the same path, for the tests)."""
    if not (enabled and torch.is_grad_enabled()):
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(partial(to_host, x.shape[:2]), from_host):
        yield


def to_host(positions, t):
    """The pack hook: an activation's data in a host buffer (an Offloaded); anything else as it is."""
    if isinstance(t, torch.nn.Parameter) or t.dim() < 2 or t.shape[:2] != positions:
        return t
    cuda = t.device.type == "cuda"
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
    if not cuda:
        return Offloaded(t.device, host.copy_(t))
    stream = _side_stream.setdefault(t.device, torch.cuda.Stream(t.device))
    stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # the allocator reuses t's memory only once the copy is done
    return Offloaded(t.device, host)


def from_host(packed):
    """The unpack hook, in the block's backward: the saved tensor on its device again (copied in already,
    or now), and the copy in of the one before it started."""
    if not isinstance(packed, Offloaded):
        return packed
    if packed.device.type != "cuda":
        return packed.host
    if packed.back is None:
        copy_in(packed)
    current = torch.cuda.current_stream(packed.device)
    current.wait_event(packed.ready)
    t, packed.back = packed.back, None
    t.record_stream(current)  # made on the side stream, used on this one
    before = packed.before() if packed.before else None
    if before is not None and before.back is None:
        copy_in(before)
    return t


def copy_in(packed):
    """Start the copy of a saved activation back to its device, on the side stream (after its copy out)."""
    stream = _side_stream[packed.device]
    with torch.cuda.stream(stream):
        packed.back = packed.host.to(packed.device, non_blocking=True)
        packed.ready = stream.record_event()
