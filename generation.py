"""
Decoding as gpt-fast does it: a KV cache set up once, one chunked prefill of the prompt, then one token
per step, each drawn from the logits by sample_token (greedy, temperature, top-k, nucleus).

    model.setup_cache(1, 4096)            # optional: generate sets one up for the prompt + the new tokens
    new, timing = generate(model, prompt_ids, 200, temperature=0.8, top_k=200, eos_id=tok.eos_id)
    print(tok.decode(new), timing.summary(), sep="\n")

sample.py streams it to a terminal; eval.py's passkey test (data/passkey.py) decodes greedily with it.
greedy_batch decodes several prompts of one length at once, greedily (eval.py ruler, data/ruler.py).
What guards it: generate refuses a prompt longer than the cache and stops where the cache ends;
check_sampling, at the bottom, turns bad sampling flags into a UserError for the commands.
"""

import time
from dataclasses import dataclass

import torch

from support.common import UserError


def sample_token(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """One token id from fp32 logits (V,): argmax at temperature 0, else a draw from the softmax at
    that temperature, restricted to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return int(logits.argmax())
    # in float64, the largest at 0: a tiny temperature (1e-300: 0 in fp32) overflows nothing, and samples the argmax
    logits = (logits.double() - logits.max()) / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        probs, order = torch.softmax(logits, -1).sort(descending=True)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches p
        logits = logits.index_fill(0, order[outside], float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, generator=None,
             on_token=None, eos_id=None, chunk_size=None, decode_step=None, vocab=None):
    """Prefill prompt_ids (a list of ints) into the KV cache in chunks, then sample one token at a time.
    Uses the cache set up by model.setup_cache (one is made for prompt + max_new_tokens if there is none);
    generation stops early at eos_id or when the cache is full. on_token(token, logits) is called for each
    new token with the fp32 logits (V,) it was drawn from. decode_step: model.compile_decode()'s, to
    decode through the fixed-shape step (default: the eager path). vocab: the tokenizer's size, when the
    model has more rows (Qwen2.5 7B: 152,064 for 151,665 tokens): padding is never drawn, and on_token sees
    the logits of real tokens only. Returns (new token ids, Timing)."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, P)
    P = idx.size(1)
    if model.cache is None:
        model.setup_cache(1, P + max_new_tokens)
    if P > model.cache.max_len:
        raise ValueError(f"the prompt has {P} tokens, more than the {model.cache.max_len} the KV cache holds")
    max_new_tokens = min(max_new_tokens, model.cache.max_len - P + 1)  # the last new token is never fed back
    sync(device)
    t0 = time.perf_counter()
    logits = model.prefill(idx, chunk_size)[0, -1]  # (V,)
    out = []
    for i in range(max_new_tokens):
        logits = logits[:vocab]
        token = sample_token(logits, temperature, top_k, top_p, generator)  # .item(): waits for the GPU
        if i == 0:
            t1 = time.perf_counter()
        out.append(token)
        if on_token is not None:
            on_token(token, logits)
        if token == eos_id or i == max_new_tokens - 1:
            break
        token_ids = torch.tensor([[token]], device=device)
        if decode_step is None:
            logits = model(token_ids, pos=P + i, last_only=True)[0, -1]
        else:  # clone: a CUDA graph writes its next output over this one
            logits = model.decode(token_ids, P + i, decode_step)[0, -1].clone()
    sync(device)
    t2 = time.perf_counter()
    if not out:
        t1 = t2
    return out, Timing(P, t1 - t0, len(out), t2 - t1)


@torch.no_grad()
def greedy_batch(model, prompts, max_new_tokens, finished=None, vocab=None, chunk_size=None):
    """Greedy decoding of B prompts of the same length P together: one batched prefill, then one token per
    step for all B. A sequence is done when finished(its new tokens) says so (or after max_new_tokens); the
    batch ends when all are. Uses the cache there if it holds B rows of P + max_new_tokens, else sets one up.
    Returns each sequence's new tokens, the one that finished it included."""
    device = next(model.parameters()).device
    idx = torch.tensor(prompts, dtype=torch.long, device=device)  # (B, P)
    B, P = idx.shape
    if model.cache is None or model.cache.tokens.size(0) != B or model.cache.max_len < P + max_new_tokens:
        model.cache = None  # free the old one first: two at once may not fit
        model.setup_cache(B, P + max_new_tokens)
    logits = model.prefill(idx, chunk_size)[:, -1, :vocab]  # (B, V)
    out, live = [[] for _ in range(B)], [True] * B
    for i in range(max_new_tokens):
        tokens = logits.argmax(-1)  # (B,); the first of equal maxima, as sample_token and transformers take
        for b, t in enumerate(tokens.tolist()):
            if live[b]:
                out[b].append(t)
                live[b] = not (finished and finished(out[b]))
        if not any(live) or i == max_new_tokens - 1:
            break
        logits = model(tokens[:, None], pos=P + i, last_only=True)[:, -1, :vocab]
    return out


@dataclass
class Timing:
    prompt_tokens: int
    prefill_s: float   # until the first new token: the prompt's forward passes + one sample
    new_tokens: int
    decode_s: float    # the rest: one forward pass per further token

    def summary(self):
        prefill = f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.2f}s " \
                  f"({self.prompt_tokens / max(self.prefill_s, 1e-9):.1f} tok/s)"
        if self.new_tokens < 2:
            return prefill
        return prefill + f"; decode {self.new_tokens - 1} tokens in {self.decode_s:.2f}s " \
                         f"({(self.new_tokens - 1) / max(self.decode_s, 1e-9):.1f} tok/s)"


def sync(device):
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


# ---- the flags' checks --------------------------------------------------------------------------------

def check_sampling(temperature, top_k, top_p):
    if not temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
