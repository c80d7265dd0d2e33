r"""
Measure long-context ability the way the YaRN paper does: perplexity against context length, and
passkey retrieval.

    # perplexity of whole documents truncated to each length (the paper's Proof-pile protocol)
    python eval.py ppl --model out/llama-yarn --data data/books/val.bin --lengths 2048,4096,8192,16384
    # one checkpoint under several RoPE methods, no training: the paper's comparison table in one command
    python eval.py ppl --model Llama-2-7b-hf --data heldout/ --lengths 4096,8192,16384 --json out/ppl.json \
        --rope none --rope linear:4 --rope ntk:4 --rope yarn:4 --rope dynamic-yarn
    # sliding windows moving by 256 tokens, only the new ones scored (Press et al.)
    python eval.py ppl --model out/llama-yarn --data data/books/val.bin --lengths 8192 --stride 256
    # passkey retrieval: accuracy per length and depth of the key in the filler
    python eval.py passkey --model out/llama-yarn --lengths 4096,8192,16384 --depths 0,0.25,0.5,0.75,1 --trials 10
    # several checkpoints in one table: label each run, then merge their JSON
    python eval.py ppl --model out/pi --label PI --data heldout/ --lengths 4096,8192 --json out/pi.json
    python eval.py report out/base.json out/pi.json out/yarn.json --out out/ppl.md

--rope SPEC, repeatable: METHOD or METHOD:FACTOR, METHOD one of model (the checkpoint's own; the
default), none, linear, ntk, dynamic-ntk, ntk-by-parts, yarn, dynamic-yarn, llama3. Without a factor,
--rope-factor is used, else (static methods) the longest length divided by the checkpoint's L.
The checkpoint is loaded once and only its RoPE tables are swapped between methods.

--data is a .bin split written by data/prepare.py (its meta.json gives the dtype and the documents),
or text: .txt files, directories of them, .jsonl files; one document each, tokenized with the model's
tokenizer. BOS is prepended when the tokenizer has one.

ppl: a document is used at a length if it has at least that many tokens; it is truncated to the length
and scored in one forward pass (length - 1 predictions), or with --stride, read whole (up to --max-tokens)
in windows of `length` tokens that move by the stride, each scoring only its new tokens, so every
token after the first is scored exactly once. Perplexity = exp(total loss / total scored tokens) over
the documents. The loss runs in chunks of the vocabulary: memory is linear in the length.
passkey: the prompt of Mohtashami & Jaggi (2023), which the YaRN paper uses unchanged: five lines joined
by newlines, the task line "There is an important info hidden inside a lot of irrelevant text. Find it
and memorize them. I will quiz you about the important information there.", filler ("The grass is
green. The sky is blue. The sun is yellow. Here we go. There and back again." repeated, space-separated),
the key line "The pass key is K. Remember it. K is the pass key.", more filler, and the question "What is
the pass key? The pass key is". The key line sits after a fraction `depth` of the filler sentences
(0 = start, 1 = end); as many sentences as fit make the prompt (BOS included) at most each length
tokens. Keys are random 5-digit numbers; greedy decoding; correct when the first integer of the answer
is the key.

Output (report.py): a markdown table on stdout; with --json OUT the numbers, and a PNG plot next to it (OUT
with .png, or --plot FILE) when matplotlib is installed: perplexity against length, one line per method;
passkey accuracy as a length x depth heatmap.

What this file teaches: the paper's two measurements, perplexity by context length and passkey
retrieval (the task itself is data/passkey.py's), and comparing RoPE methods on one checkpoint by
swapping only its tables.
"""

import argparse
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from common import (MAX_POSITIONS, ArgumentParser, UserError, attention_backends, describe, note, one_line_errors,
                    original_context, pick_device, pick_dtype, reading, rope_config)
from hf_config import replaced_scaling_note
from data import passkey
from model import Llama, LlamaConfig
import report


# ---- perplexity ---------------------------------------------------------------------------------------

def windows(n, length, stride=None):
    """The forward passes that score a document of n tokens at context `length`, as (start, end,
    first): tokens[start:end] are fed and the tokens first..end-1 are scored (predicted from what
    precedes them). Without stride: one pass over the first min(n, length) tokens. With stride:
    windows of `length` tokens whose ends move by `stride` (< length: the first new token needs one
    before it in the window), the last one ending at n."""
    if stride is None or n <= length:
        return [(0, min(n, length), 1)]
    if not 0 < stride < length:
        raise ValueError(f"the stride must be in [1, length), got {stride} for length {length}")
    out, end = [(0, length, 1)], length
    while end < n:
        new_end = min(end + stride, n)
        out.append((new_end - length, new_end, end))
        end = new_end
    return out


@torch.no_grad()
def perplexity(model, tokens, length, stride=None):
    """Summed next-token loss of one document (1-D ids, BOS included) at context `length`, and the
    number of tokens it covers: (nll_sum, n_tokens). Only what `windows` says is scored."""
    device = next(model.parameters()).device
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
    nll, count = 0.0, 0
    for start, end, first in windows(tokens.numel(), length, stride):
        x = tokens[start:end]
        targets = torch.full_like(x, -100)  # targets[i] is the token after x[i]; -100 = not scored
        targets[first - start - 1:-1] = x[first - start:]
        nll += model(x[None], targets[None], reduction="sum").item()
        count += end - first
    return nll, count


def exp(x):
    """e^x, and inf past the largest float (a diverged model's perplexity is still a result)."""
    return math.exp(x) if x < 709 else math.inf


def load_documents(data, model_dir):
    """([(name, 1-D array of token ids, BOS first if there is one)], vocabulary size) from --data."""
    if len(data) == 1 and data[0].endswith(".bin"):
        from data.packed import PackedData
        if not os.path.isfile(data[0]):
            raise FileNotFoundError(f"--data {data[0]} not found")
        folder, split = os.path.split(data[0])
        packed = PackedData(folder or ".", split.removesuffix(".bin"))
        bos = np.array([packed.bos_id] if packed.bos_id >= 0 else [], dtype=packed.tokens.dtype)
        return [(name, np.concatenate([bos, ids])) for name, ids in packed.documents()], packed.meta["vocab_size"]
    from data.packed import find_documents
    from data.tokenizer import load_tokenizer
    try:
        tok = load_tokenizer(model_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"tokenizer missing, needed for text --data: {e}") from None
    bos = [tok.bos_id] if tok.bos_id >= 0 else []
    docs = [(name, np.array(bos + tok.encode(load()), dtype=np.int64))
            for name, load in tqdm(find_documents(data), desc="tokenize", unit="doc", disable=None)]
    return docs, tok.vocab_size


def evaluate_ppl(model, docs, lengths, stride=None, max_docs=None, max_tokens=None, desc=""):
    """{length: {"ppl", "nll", "tokens", "docs", "seconds"}} over the documents with >= `length` tokens."""
    out = {}
    for length in lengths:
        usable = [ids for _, ids in docs if len(ids) >= length][:max_docs]
        nll, count, t0 = 0.0, 0, time.perf_counter()
        for ids in tqdm(usable, desc=f"{desc} @ {length}", unit="doc", leave=False, disable=None):
            ids = ids[:length] if stride is None else ids[:max_tokens]
            n, c = perplexity(model, ids.astype(np.int64), length, stride)
            nll, count = nll + n, count + c
        seconds = time.perf_counter() - t0
        ppl = exp(nll / count) if count else None  # None: no document was long enough
        out[length] = {"ppl": ppl, "nll": nll, "tokens": count, "docs": len(usable), "seconds": seconds}
        if usable:
            note(f"{desc} @ {length}: perplexity {ppl:.3f} over {len(usable)} documents, "
                 f"{seconds / len(usable):.2f} s per document")
    return out


# ---- command line: parse, check, read the inputs, evaluate, write ---------------------------------------

def int_list(s):
    try:
        values = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not values or min(values) < 2 or max(values) > MAX_POSITIONS:
        raise argparse.ArgumentTypeError(f"expected lengths in [2, {MAX_POSITIONS}], got {s!r}")
    return sorted(set(values))


def float_list(s):
    try:
        values = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"depths are fractions in [0, 1], got {s!r}")
    return sorted(set(values))


def parse_rope_spec(spec, default_factor):
    """'yarn:8' -> ('yarn', 8.0); 'dynamic-yarn' -> ('dynamic-yarn', default_factor)."""
    method, _, factor = spec.partition(":")
    if not factor:
        return method, default_factor
    try:
        return method, float(factor)
    except ValueError:
        raise UserError(f"--rope {spec}: the factor after ':' must be a number") from None


def parse_args(argv):
    common = ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, metavar="DIR",
                        help="checkpoint directory (config.json, safetensors, tokenizer)")
    common.add_argument("--lengths", type=int_list, required=True,
                        help="comma-separated context lengths, e.g. 2048,4096,8192")
    common.add_argument("--rope", action="append", default=None, metavar="SPEC",
                        help="METHOD or METHOD:FACTOR, repeatable: one table row each (default: model, the "
                             "checkpoint's own)")
    common.add_argument("--rope-factor", type=float, default=None, metavar="S",
                        help="factor of --rope specs without one (default: longest length / L for static methods)")
    common.add_argument("--original-ctx", type=int, default=None, metavar="L",
                        help="L, the context the checkpoint was pretrained at, which a --rope METHOD scales from "
                             "(default: its config.json's, said in one line when it names none)")
    common.add_argument("--json", default=None, metavar="OUT",
                        help="write the results as JSON here (and a PNG plot next to it)")
    common.add_argument("--plot", default=None, metavar="PNG",
                        help="where to save the plot (default: the --json path with .png)")
    common.add_argument("--label", default=None, metavar="NAME",
                        help="name of this checkpoint in tables and plots (e.g. base, PI-tuned)")
    common.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    common.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    pp = sub.add_parser("ppl", parents=[common], help="perplexity against context length")
    pp.add_argument("--data", nargs="+", required=True, metavar="PATH",
                    help="a .bin split from data/prepare.py, or .txt files / directories / .jsonl files")
    pp.add_argument("--stride", type=int, default=None,
                    help="sliding windows moving by this many tokens (default: one pass per document)")
    pp.add_argument("--max-docs", type=int, default=None, help="at most this many documents per length")
    pp.add_argument("--max-tokens", type=int, default=None,
                    help="with --stride: score only the first N tokens of each document")
    pk = sub.add_parser("passkey", parents=[common], help="passkey retrieval accuracy per length and depth, with "
                        "the prompt of Mohtashami & Jaggi (2023) that the YaRN paper uses")
    pk.add_argument("--depths", type=float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="comma-separated depths of the key line in the filler, 0 = start, 1 = end")
    pk.add_argument("--trials", type=int, default=5, help="random keys per length and depth")
    pk.add_argument("--seed", type=int, default=0, help="seed of the keys")
    rp = sub.add_parser("report", help="merge the --json files of several ppl runs, or of several passkey runs, "
                        "into one table and plot")
    rp.add_argument("files", nargs="+", metavar="JSON", help="outputs of eval.py ppl --json (or passkey --json)")
    rp.add_argument("--out", default=None, metavar="MD", help="also write the table here (and a PNG next to it)")
    return p.parse_args(argv)


def check_args(args):
    """Checks that need no weights. Returns the checkpoint's config and the RoPE methods, with their labels."""
    lengths = args.lengths
    if args.task == "ppl":
        if args.stride is not None and not 1 <= args.stride < lengths[0]:
            raise UserError(f"--stride must be at least 1 and less than the shortest length {lengths[0]}, got "
                            f"{args.stride}")
        if args.max_docs is not None and args.max_docs < 1:
            raise UserError(f"--max-docs must be >= 1, got {args.max_docs}")
        if args.max_tokens is not None and args.stride is None:
            raise UserError("--max-tokens applies to --stride windows (without it documents are truncated to each "
                            "length)")
        if args.max_tokens is not None and args.max_tokens < lengths[-1]:
            raise UserError(f"--max-tokens must be at least the longest length {lengths[-1]}, got {args.max_tokens}")
    elif args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    report.check_outputs(args.json, args.plot, inputs=getattr(args, "data", None) or ())
    if args.original_ctx is not None and args.original_ctx < 1:
        raise UserError(f"--original-ctx must be >= 1, got {args.original_ctx}")
    cfg = LlamaConfig.from_pretrained(args.model)
    specs = [parse_rope_spec(s, args.rope_factor) for s in args.rope or ["model"]]
    ropes, notes = [], []
    for method, factor in specs:
        L, why = original_context(args.model, cfg.rope, method, args.original_ctx)
        ropes.append(rope_config(cfg.rope, method, factor, lengths[-1], L))
        notes += [n for n in why + [replaced_scaling_note(cfg.rope, ropes[-1])] if n and n not in notes]
    labels = [("model: " if m == "model" else "") + describe(r) for (m, _), r in zip(specs, ropes)]
    if args.label:
        labels = [f"{args.label}, {x}" for x in labels]
    return cfg, ropes, labels, notes


def read_documents(args, cfg):
    """ppl's documents, each a 1-D array of token ids."""
    docs, vocab = reading(load_documents, args.data, args.model)
    if vocab > cfg.vocab_size:
        raise UserError(f"--data was tokenized with a vocabulary of {vocab}, larger than the model's {cfg.vocab_size}")
    if not docs:
        raise UserError(f"no documents in {' '.join(args.data)}")
    for n in args.lengths:
        usable = sum(len(ids) >= n for _, ids in docs)
        used = min(usable, args.max_docs or usable)
        if not usable:
            note(f"warning: length {n}: no document has {n} tokens; skipped")
        elif usable < len(docs):
            note(f"length {n}: {used} documents ({len(docs) - usable} shorter ones skipped)")
        else:
            note(f"length {n}: {used} documents")
    return docs


def read_tokenizer(args, cfg):
    """passkey's tokenizer, checked on the shortest prompt."""
    from data.tokenizer import load_tokenizer
    tok = reading(load_tokenizer, args.model, prefix="tokenizer missing or unreadable: ")
    try:
        ids = passkey.passkey_prompt(tok, args.lengths[0], 0.5, 12345)
    except ValueError as e:
        raise UserError(str(e)) from None
    if max(ids) >= cfg.vocab_size:
        raise UserError(f"the tokenizer produced id {max(ids)}, outside the model's vocabulary of {cfg.vocab_size}")
    return tok


def run(args, model, ropes, labels, inputs, device):
    """Each method in turn on the same weights: only the RoPE tables are swapped."""
    results, lengths = [], args.lengths
    for label, rope in zip(labels, ropes):
        model.set_rope(rope)
        if args.task == "ppl":
            r = evaluate_ppl(model, inputs, lengths, args.stride, args.max_docs, args.max_tokens, desc=label)
            results.append({"method": label, "rope": asdict(rope), "ppl": {str(n): v for n, v in r.items()}})
            continue
        need = max(lengths) + passkey.PASSKEY_NEW_TOKENS
        try:
            model.setup_cache(1, need)
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError too
            raise UserError(f"cannot allocate the KV cache for {need} tokens on {device}: "
                            f"{str(e).splitlines()[0]}") from None
        acc = passkey.passkey_accuracy(model, inputs, lengths, args.depths, args.trials, args.seed)
        results.append({"method": label, "rope": asdict(rope),
                        "accuracy": {str(n): {str(d): a for d, a in row.items()} for n, row in acc.items()},
                        "mean": float(np.mean([a for row in acc.values() for a in row.values()]))})
    return results


def run_json(args, results):
    """The run as --json holds it (report.py's format): the task, the model, the lengths, the task's own
    flags and the results."""
    extra = {"data": args.data, "stride": args.stride} if args.task == "ppl" else \
        {"depths": args.depths, "trials": args.trials, "seed": args.seed}
    return {"task": args.task, "model": args.model, "lengths": args.lengths, **extra, "results": results}


def main(argv=None):
    with one_line_errors():
        args = parse_args(argv)
        if args.task == "report":
            return report.report(args.files, args.out)
        cfg, ropes, labels, notes = check_args(args)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        inputs = read_documents(args, cfg) if args.task == "ppl" else read_tokenizer(args, cfg)
        for line in notes:  # which L a --rope METHOD scales from, when config.json does not say it
            note(line)
        model = Llama.from_pretrained(args.model, dtype=dtype, device=device)
        with attention_backends(device, dtype):
            results = run(args, model, ropes, labels, inputs, device)
        report.write_run(run_json(args, results), args.json, args.plot)


if __name__ == "__main__":
    main()
