"""
What model.py calls for memory and speed, kept beside the lesson rather than in it: the chunked
cross-entropy (the (N, V) logits never exist), and the shapes a CPU runs faster than the fused kernel
does (a projection of one row, one query over a KV cache, a prefill chunk after a cached prefix).
Each gives the same results as the plain PyTorch it replaces; tests/test_model.py and
tests/test_bench.py check that, and bench/bench.py measures the speed.

    from support.fastpaths import Linear, cache_attention, chunked_cross_entropy
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def chunked_cross_entropy(h, targets, lm_head, reduction="mean"):
    """Cross-entropy of lm_head(h) without ever holding the (B*T, V) fp32 logits: the vocabulary projection
    runs over chunks of rows; with gradients, ChunkedCrossEntropy finds them in the same pass.
    h (B, T, C), targets (B, T) with -100 = not scored; reduction "mean" or "sum"."""
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    rows = max(256, (1 << 26) // lm_head.out_features)  # ~256 MiB of fp32 logits per chunk
    if torch.is_grad_enabled() and (h.requires_grad or lm_head.weight.requires_grad):
        total = ChunkedCrossEntropy.apply(h, lm_head.weight, targets, rows)
    else:
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.size(0), rows):
            total = total + F.cross_entropy(lm_head(h[s:s + rows]).float(), targets[s:s + rows], ignore_index=-100,
                                            reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != -100).sum().clamp(min=1)


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


def cache_attention(q, k, v, mask=None):
    """Attention of the T queries q (B, H, T, D) that follow the S - T earlier positions of k and v
    (B, KV, S, D), for the shapes model.attention() sends here: one query (decoding; `mask` (S,) marks
    the positions to attend to when k and v are a whole preallocated cache), or, on a CPU, a chunk of
    queries after a cached prefix (prefill)."""
    if mask is not None or q.size(2) == 1:
        return decode_attention(q, k, v, mask)
    return chunk_attention(q, k, v)


def decode_attention(q, k, v, mask=None):
    """One new query per head against the whole cache, as two batched matmuls. The G = H/KV query
    heads sharing a K/V head are G rows of one product, so each cached K/V is read once and never
    copied. On CPU this is 1.3-1.5x faster than the flash kernel, built for long query blocks.
    mask (S,): which cache positions to attend to (the fixed-shape decode step); None: all of k and v."""
    B, H, _, D = q.shape
    qg = q.view(B, k.size(1), H // k.size(1), D)                      # (B, KV, G, D)
    att = (qg @ k.transpose(-1, -2)).float() * D ** -0.5              # (B, KV, G, S), softmax in fp32
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
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
