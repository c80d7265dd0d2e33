"""
Generate text from a checkpoint, with a KV cache sized for the whole context up front.

    python sample.py --model out/llama-yarn --ctx 131072 --prompt "Once upon a time"
    python sample.py --model out/llama-yarn --ctx 65536 --prompt-file book.txt --max-new-tokens 200 --top-p 0.95
    # any RoPE method on any checkpoint, without training: Dynamic-YaRN on a model trained at 4k
    python sample.py --model Llama-2-7b-hf --ctx 16384 --rope dynamic-yarn --prompt-file long.txt
    python sample.py --model Llama-2-7b-hf --ctx 32768 --rope yarn --rope-factor 8 --prompt-file long.txt
    # on a GPU: decode with one CUDA graph per token instead of hundreds of kernel launches
    python sample.py --model out/llama-yarn --ctx 131072 --prompt-file book.txt --compile

Memory is the weights + the KV cache + a constant. The cache (2 * layers * kv_heads * head_dim * ctx
values, in the weights' dtype: bf16 on CUDA) is allocated once and its size printed first. The prompt is
prefilled --prefill-chunk tokens at a time, so activations are bounded by the chunk, not the prompt;
then one token per step. Attention never forms a (T, T) matrix (flash attention on CUDA). On CPU, a
chunk that follows a prefix builds its causal mask as a (chunk, position) boolean matrix, which is why the
CPU default chunk is smaller.

The model's own rope_scaling applies unless --rope names another method (see rope.py for all of
them); dynamic methods stay exact as the text grows (model.setup_cache explains how).
The continuation streams to stdout; the cache size, notes and speed go to stderr.
Python: generation.generate(model, prompt_ids, max_new_tokens, ...) returns the new token ids and their
timing.

What this file teaches: a command whose main() reads as its steps: parse, check, load, run. The decoding
itself, as gpt-fast does it (a cache set up once, one chunked prefill, then one token per step), is
generation.py's; what this file adds is the memory it takes, checked before anything is allocated, and
text streamed as it is generated.
"""

import os
import resource
import sys
import time

import torch

from generation import check_sampling, generate, sync
from model import Llama, LlamaConfig
from support.checkpoint import read_config
from support.common import (MAX_POSITIONS, ArgumentParser, UserError, add_engine_flags, add_rope_flags, attention_kernels,
                            check_seed, describe, note, one_line_errors, pick_device, pick_dtype, reading, rope_config,
                            yarn_scale)
from support.hf_config import original_context, replaced_scaling_note


BYTES_PER_TOKEN = 64  # far above any tokenizer's average (about 4 characters a token for English)


# ---- streaming the text -------------------------------------------------------------------------------

class Streamer:
    """on_token callback that prints text as it is generated. Decoding tokens one by one would lose
    spaces (sentencepiece drops a leading one) and split multi-byte characters, so the whole
    continuation is decoded after a few prompt tokens of context, and only the new characters printed."""

    def __init__(self, tokenizer, prompt_ids, file=None):
        self.tok, self.file = tokenizer, file or sys.stdout
        self.context = [i for i in prompt_ids[-4:] if i != tokenizer.bos_id]
        self.ids, self.start = [], len(tokenizer.decode(self.context))
        self.printed = 0

    def __call__(self, token, logits=None):
        if token == self.tok.eos_id:
            return
        self.ids.append(token)
        text = self.tok.decode(self.context + self.ids)[self.start:]
        if not text.endswith("\ufffd"):  # else half of a multi-byte character: wait for the rest
            self.write(text)

    def write(self, text):
        self.file.write(text[self.printed:])
        self.file.flush()
        self.printed = len(text)

    def close(self):
        """Print what was held back (bytes that never completed a character), then a newline."""
        self.write(self.tok.decode(self.context + self.ids)[self.start:] + "\n")


# ---- memory and speed --------------------------------------------------------------

def cache_bytes(cfg, ctx, dtype):
    """The KV cache's size before it is allocated: keys and values of every layer, and the token ids."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * ctx * dtype.itemsize + 8 * ctx


def memory_bytes(device):
    """The device's total memory (None if unknown): a request beyond it cannot succeed."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def compile_decode(model):
    """model.compile_decode(), compiled and captured now on a few dummy steps at position 0 (which the
    prefill then overwrites), so that the time it takes is not counted as decoding."""
    device = next(model.parameters()).device
    step = model.compile_decode()
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):  # a CUDA graph is recorded on the second or third call
            step(torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))
    sync(device)
    note(f"compiled the decode step in {time.perf_counter() - t:.1f}s")
    return step


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU (allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak RSS)"


# ---- command line: parse, check, load, generate -------------------------------------------------------

def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    model = p.add_argument_group("model and context")
    model.add_argument("--model", required=True, metavar="DIR",
                       help="checkpoint directory (config.json, safetensors, tokenizer)")
    model.add_argument("--ctx", type=int, default=None,
                       help="context length the KV cache is allocated for (default: s*L of the RoPE method in force)")
    add_rope_flags(p.add_argument_group("RoPE"))
    prompt = p.add_argument_group("prompt and sampling")
    src = prompt.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text (default: start from BOS alone)")
    src.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from a UTF-8 text file")
    prompt.add_argument("--max-new-tokens", type=int, default=256,
                        help="tokens to generate (fewer if EOS comes or the cache fills)")
    prompt.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    prompt.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens; 0 = all")
    prompt.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: the smallest set of tokens with this much probability; 1 = all")
    prompt.add_argument("--seed", type=int, default=1337, help="random seed of the sampler")
    engine = p.add_argument_group("engine")
    add_engine_flags(engine)
    engine.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                        help="prompt tokens per prefill forward pass (default 4096 on CUDA, 1024 on CPU)")
    engine.add_argument("--compile", action="store_true",
                        help="decode with torch.compile's fixed-shape step (a CUDA graph on GPUs); compiling takes "
                             "a while up front, timed apart")
    return p.parse_args(argv)


def check_args(args):
    """Everything that can be checked without reading the weights. Returns the checkpoint's config and its
    config.json dict."""
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.original_ctx is not None and args.original_ctx < 1:
        raise UserError(f"--original-ctx must be >= 1, got {args.original_ctx}")
    check_seed(args.seed)
    yarn_scale(args)
    hf = read_config(args.model)  # config.json, read once: the model's shape and the L a new method scales from
    cfg = LlamaConfig.from_hf(hf, where=os.path.join(args.model, "config.json"))
    if args.ctx is not None and not 1 <= args.ctx <= MAX_POSITIONS:
        raise UserError(f"--ctx must be in [1, {MAX_POSITIONS}] (positions are fp32, exact up to 2^24), got {args.ctx}")
    return cfg, hf


def choose_rope(args, cfg, hf):
    """The RoPE method of --rope over the L it scales from, the context (--ctx, else s*L of that method),
    and the lines that say where L comes from when config.json does not (printed once the checks pass)."""
    L, notes = original_context(hf, cfg.rope, args.rope, args.original_ctx)
    rope = rope_config(cfg.rope, args.rope, args.rope_factor, args.ctx or cfg.context_length, L)
    notes += [n for n in [replaced_scaling_note(cfg.rope, rope)] if n]
    return rope, args.ctx or rope.context_length, notes


def read_prompt(args, tok, cfg, ctx):
    """The prompt as token ids: BOS first when the tokenizer has one."""
    text = args.prompt or ""
    if args.prompt_file is not None:
        limit = BYTES_PER_TOKEN * ctx  # read no further: a file past it (or endless, /dev/zero) cannot fit --ctx
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read(limit + 1)
            if len(text) > limit:
                raise UserError(f"prompt file {args.prompt_file} is longer than --ctx {ctx} tokens can hold (more "
                                f"than {limit} characters): give a shorter prompt or a larger --ctx")
        except FileNotFoundError:
            raise UserError(f"prompt file not found: {args.prompt_file}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {args.prompt_file}: {e}") from None
        if not text.strip():
            raise UserError(f"prompt file {args.prompt_file} is empty")
    ids = ([tok.bos_id] if tok.bos_id >= 0 else []) + tok.encode(text)
    if not ids:
        raise UserError("empty prompt and the tokenizer has no BOS token to start from: give --prompt")
    if max(ids) >= cfg.vocab_size:
        raise UserError(f"the tokenizer produced id {max(ids)}, outside the model's vocabulary of {cfg.vocab_size}")
    if len(ids) > ctx:
        raise UserError(f"the prompt has {len(ids)} tokens, longer than --ctx {ctx}")
    return ids


def check_memory(cfg, ctx, dtype, device):
    need, have = cache_bytes(cfg, ctx, dtype), memory_bytes(device)
    if have and need > have:
        raise UserError(f"the KV cache for --ctx {ctx} takes {need / 2**30:.1f} GiB, more than the "
                        f"{have / 2**30:.1f} GiB of {device}: lower --ctx")


def load(args, cfg, rope, ctx, device, dtype, prompt_len, notes):
    """The weights, then the KV cache for the whole context, once."""
    for line in notes:
        note(line)
    if ctx > rope.context_length and not rope.is_dynamic:
        note(f"note: --ctx {ctx} exceeds the {rope.context_length} tokens that {describe(rope)} reaches (s*L); "
             "continuing")
    model = Llama.from_pretrained(args.model, dtype=dtype, device=device, config=cfg)
    model.set_rope(rope)
    try:
        model.setup_cache(1, ctx)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError too
        raise UserError(f"cannot allocate the KV cache for --ctx {ctx} ({cache_bytes(cfg, ctx, dtype) / 2**30:.1f} "
                        f"GiB) on {device}: {str(e).splitlines()[0]}") from None
    note(f"model {args.model}: {model.num_params() / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')} "
         f"on {device}; rope {describe(rope)}")
    note(f"KV cache: {ctx} tokens x {cfg.num_hidden_layers} layers x {cfg.num_key_value_heads} kv heads x "
         f"{cfg.head_dim} dims = {model.cache_bytes() / 2**20:.1f} MiB; prompt {prompt_len} tokens")
    return model


def run(args, model, tok, ids, ctx, device, dtype):
    """Generate, streaming the text to stdout; the speed goes to stderr."""
    step = compile_decode(model) if args.compile else None
    chunk = args.prefill_chunk or (4096 if device.type == "cuda" else 1024)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    streamer = Streamer(tok, ids)
    with attention_kernels(device, dtype):
        new, timing = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator,
                               on_token=streamer, eos_id=tok.eos_id, chunk_size=chunk, decode_step=step,
                               vocab=tok.vocab_size)
    streamer.close()
    if len(new) < args.max_new_tokens and new[-1] != tok.eos_id:
        note(f"note: stopped after {len(new)} tokens: the KV cache of {ctx} tokens is full")
    note(timing.summary())
    note(f"peak memory: {peak_memory(device)}")


def main(argv=None):
    with one_line_errors():
        args = parse_args(argv)
        cfg, hf = check_args(args)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        rope, ctx, notes = choose_rope(args, cfg, hf)
        from data.tokenizer import load_tokenizer  # imports sentencepiece: only once the cheap checks passed
        tok = reading(load_tokenizer, args.model, prefix="tokenizer missing or unreadable: ")
        ids = read_prompt(args, tok, cfg, ctx)
        check_memory(cfg, ctx, dtype, device)
        model = load(args, cfg, rope, ctx, device, dtype, len(ids), notes)
        run(args, model, tok, ids, ctx, device, dtype)


if __name__ == "__main__":
    main()
