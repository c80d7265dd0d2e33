r"""
Measure long-context ability the way the YaRN paper does: perplexity against context length, and
passkey retrieval.

    # perplexity of the same documents truncated to each length (the paper's Proof-pile protocol)
    python eval.py ppl --model out/llama-yarn --data data/proofpile/val.bin --lengths 8192,32768,65536,98304,131072 \
        --max-docs 10
    # one checkpoint under several RoPE methods, no training: the paper's comparison table in one command
    python eval.py ppl --model Llama-2-7b-hf --data heldout/ --lengths 4096,8192,16384 --json out/ppl.json \
        --rope none --rope linear:4 --rope ntk:4 --rope yarn:4 --rope dynamic-yarn
    # sliding windows moving by 256 tokens, only the new ones scored (Press et al.)
    python eval.py ppl --model out/llama-yarn --data data/books/val.bin --lengths 8192 --stride 256
    # passkey retrieval: accuracy per length and depth of the key in the filler
    python eval.py passkey --model out/llama-yarn --lengths 4096,8192,16384 --depths 0,0.25,0.5,0.75,1 --trials 10
    # RULER (Hsieh et al. 2024): its 11 synthetic tasks (13 with QA data), each prompt exactly each length
    python eval.py ruler --model out/llama-yarn --lengths 4096,8192,16384,32768,65536,131072 \
        --haystack data/pg19/val.bin --samples 100 --json out/ruler.json --save-samples out/ruler.jsonl
    # several checkpoints in one table: label each run, then merge their JSON
    python eval.py ppl --model out/pi --label PI --data heldout/ --lengths 4096,8192 --json out/pi.json
    python eval.py report out/base.json out/pi.json out/yarn.json --out out/ppl.md

--rope SPEC, repeatable: METHOD or METHOD:FACTOR, METHOD one of model (the checkpoint's own; the
default), none, linear, ntk, dynamic-ntk, ntk-by-parts, yarn, dynamic-yarn, llama3. Without a factor,
--rope-factor is used, else (static methods) the longest length divided by the checkpoint's L.
The checkpoint is loaded once and only its RoPE tables are swapped between methods.

--data is a .bin split written by data/prepare.py (its meta.json gives the dtype and the documents),
or text: .txt files, directories of them, .jsonl or .parquet files (as data/prepare.py reads them), one
document each, tokenized with the model's tokenizer. BOS is prepended where the tokenizer adds one.

ppl follows the paper's protocol: the same documents at every length, those with at least as many tokens
as the longest length (the first --max-docs of them; the paper takes ten Proof-pile documents of 128k
tokens or more), so each point of the curve is the same text read with more context. --docs-per-length
scores instead, at each length, every document that reaches it. A document is truncated to the length and
scored in one forward pass (length - 1 predictions), or with --stride, read whole (up to --max-tokens)
in windows of `length` tokens that move by the stride, each scoring only its new tokens, so every
token after the first is scored exactly once; that costs about length / stride reads of each scored
token, and a run over 50 is announced with its forward passes and tokens before it starts.
Perplexity = exp(total loss / total scored tokens) over the documents; the JSON names them (one list, or
one per length when they differ). The loss runs in chunks of the vocabulary: memory is linear in the length.
ruler: RULER's synthetic tasks as RULER generates them (data/ruler.py says how, and where we differ), each
prompt exactly `length` ids, greedy answers stopped at EOS or a newline, RULER's metric (the fraction of the
references in the answer; for QA any), averaged per task and length (0-100). --save-samples writes every
prompt, answer and score (a run cut short resumes from it with --resume).
passkey: the prompt of Mohtashami & Jaggi (2023), which the YaRN paper uses unchanged (data/passkey.py
writes it): the task line, filler ("The grass is green. The sky is blue. ..."), the key line "The pass key
is K. Remember it. K is the pass key." after a fraction `depth` of the filler (0 = start, 1 = end), more
filler and "What is the pass key? The pass key is", at most each length tokens (BOS included). Keys are
random 5-digit numbers; greedy decoding; correct when the first integer of the answer is the key.

Output (support/report.py): a markdown table on stdout; with --json OUT the numbers, and a PNG plot next to it (OUT
with .png, or --plot FILE) when matplotlib is installed: perplexity against length, one line per method;
passkey accuracy as a length x depth heatmap.

What this file teaches: the paper's two measurements, perplexity by context length and passkey
retrieval (the task itself is data/passkey.py's), RULER beside them (data/ruler.py's), and comparing RoPE
methods on one checkpoint by swapping only its tables.
"""

import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from data import passkey, ruler
from model import Llama, LlamaConfig
from support import report
from support.checkpoint import drop_padding, read_config
from support.common import (ArgumentParser, UserError, add_engine_flags, add_rope_flags, attention_kernels, describe,
                            note, one_line_errors, pick_device, pick_dtype, reading, rope_config, yarn_scale)
from support.eval_checks import check_task_flags, float_list, int_list, note_documents, parse_rope_spec
from support.hf_config import original_context, replaced_scaling_note
from support.samples import open_samples


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


def choose_documents(docs, lengths, max_docs=None, per_length=False):
    """{length: [(name, ids)]}, the documents scored at each length. The paper's protocol (the default):
    the same documents at every length, the first max_docs of those with at least max(lengths) tokens,
    so each point of the curve is the same text read with more or less context. per_length: at each
    length, the first max_docs of the documents that reach it (more text at short lengths, but each
    point is other texts, and a harder text at one length moves the curve)."""
    if per_length:
        return {n: [d for d in docs if len(d[1]) >= n][:max_docs] for n in lengths}
    same = [d for d in docs if len(d[1]) >= max(lengths)][:max_docs]
    return {n: same for n in lengths}


def evaluate_ppl(model, chosen, stride=None, max_tokens=None, desc=""):
    """{length: {"ppl", "nll", "tokens", "docs", "names", "seconds"}} over the documents chosen for each
    length: truncated to it, or with a stride read whole (up to max_tokens) in windows."""
    out = {}
    for length, docs in chosen.items():
        nll, count, t0 = 0.0, 0, time.perf_counter()
        for _, ids in tqdm(docs, desc=f"{desc} @ {length}", unit="doc", leave=False, disable=None):
            ids = ids[:length] if stride is None else ids[:max_tokens]
            n, c = perplexity(model, ids.astype(np.int64), length, stride)
            nll, count = nll + n, count + c
        seconds = time.perf_counter() - t0
        ppl = exp(nll / count) if count else None  # None: no document was long enough
        out[length] = {"ppl": ppl, "nll": nll, "tokens": count, "docs": len(docs),
                       "names": [name for name, _ in docs], "seconds": seconds}
        if docs:
            note(f"{desc} @ {length}: perplexity {ppl:.3f} over {len(docs)} documents, "
                 f"{seconds / len(docs):.2f} s per document")
    return out


# A --stride run whose windows read more than this many times the tokens they score is announced first:
# 8192 / 256 (32 reads a token) runs quietly; 16384 / 256 (64) and the paper's 131072 / 256 (512) warn.
STRIDE_COST_WARNING = 50


def stride_cost(chosen, stride, max_tokens=None):
    """(forward passes, tokens read, tokens scored) of a --stride run over every length and document:
    about n / stride passes of `length` tokens for a document of n, so up to length / stride reads of
    each scored token, where one pass over a truncated document reads each once."""
    passes = read = scored = 0
    for length, docs in chosen.items():
        for _, ids in docs:
            for start, end, first in windows(len(ids[:max_tokens]), length, stride):
                passes, read, scored = passes + 1, read + end - start, scored + end - first
    return passes, read, scored


# ---- command line: parse, check, read the inputs, evaluate, write ---------------------------------------

def parse_args(argv):
    common = ArgumentParser(add_help=False)
    model = common.add_argument_group("model and lengths")
    model.add_argument("--model", required=True, metavar="DIR",
                       help="checkpoint directory (config.json, safetensors, tokenizer)")
    model.add_argument("--lengths", type=int_list, required=True,
                       help="comma-separated context lengths, e.g. 2048,4096,8192")
    model.add_argument("--label", default=None, metavar="NAME",
                       help="name of this checkpoint in tables and plots (e.g. base, PI-tuned)")
    add_rope_flags(common.add_argument_group("RoPE"), repeatable=True)
    output = common.add_argument_group("output")
    output.add_argument("--json", default=None, metavar="OUT",
                        help="write the results as JSON here (and a PNG plot next to it)")
    output.add_argument("--plot", default=None, metavar="PNG",
                        help="where to save the plot: .png, .svg or .pdf (default: the --json path with .png)")
    add_engine_flags(common.add_argument_group("engine"), what="weights")
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="task", required=True, metavar="ppl|passkey|report")
    pp = sub.add_parser("ppl", parents=[common], help="perplexity against context length")
    pp = pp.add_argument_group("documents and windows")
    pp.add_argument("--data", nargs="+", required=True, metavar="PATH",
                    help="a .bin split from data/prepare.py, or .txt files / directories / .jsonl / .parquet files")
    pp.add_argument("--stride", type=int, default=None, metavar="N",
                    help="sliding windows moving by this many tokens (default: one pass per document); a run "
                         f"whose windows read over {STRIDE_COST_WARNING}x the tokens they score is announced")
    pp.add_argument("--max-docs", type=int, default=None, metavar="N",
                    help="score only the first N documents long enough (default: all): the same N at every length, "
                         "or with --docs-per-length the first N that reach each length")
    pp.add_argument("--docs-per-length", action="store_true",
                    help="at each length, score every document that reaches it, instead of the paper's protocol "
                         "(the default: the same documents at every length, those that reach the longest): more "
                         "text at short lengths, but each length is then other texts")
    pp.add_argument("--max-tokens", type=int, default=None, metavar="N",
                    help="with --stride: score only the first N tokens of each document")
    pk = sub.add_parser("passkey", parents=[common], help="passkey retrieval accuracy per length and depth, with "
                        "the prompt of Mohtashami & Jaggi (2023) that the YaRN paper uses")
    pk = pk.add_argument_group("keys")
    pk.add_argument("--depths", type=float_list, default="0,0.25,0.5,0.75,1",
                    help="comma-separated depths of the key line in the filler, 0 = start, 1 = end")
    pk.add_argument("--trials", type=int, default=5, help="random keys per length and depth")
    pk.add_argument("--seed", type=int, default=0, help="seed of the keys")
    add_ruler_flags(sub, common)
    rp = sub.add_parser("report", help="merge the --json files of several ppl runs (or passkey runs, or ruler runs) "
                        "into one table and plot")
    rp.add_argument("files", nargs="+", metavar="JSON", help="outputs of eval.py ppl --json (or passkey, ruler --json)")
    rp.add_argument("--out", default=None, metavar="MD", help="also write the table here (and a PNG next to it)")
    return p.parse_args(argv)


def add_ruler_flags(sub, common):
    g = sub.add_parser("ruler", parents=[common], help="RULER's synthetic tasks by length (Hsieh et al. 2024), the "
                       "benchmark model cards report").add_argument_group("RULER")
    g.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=list(ruler.TASKS),
                   help="comma-separated tasks, RULER's names (default: all; qa_1 and qa_2 need --qa-file)")
    g.add_argument("--haystack", nargs="+", default=None, metavar="PATH",
                   help="text for the essay haystack and cwe's words: .txt/.jsonl/.parquet files or folders, or a "
                        "dataset of data/prepare.py (PG19 or Proof-pile serve where RULER takes essays)")
    g.add_argument("--qa-file", action="append", default=None, metavar="JSON",
                   help="SQuAD JSON (for qa_1) or HotpotQA JSON (for qa_2), repeatable")
    g.add_argument("--samples", type=int, default=500, help="samples per task and length: RULER's 500 (default), "
                   "or 100, five times faster (a cell's standard error: at most 2.2 points at 500, 5 at 100)")
    g.add_argument("--seed", type=int, default=0, help="seed of the samples")
    g.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (their KV cache is batch x "
                   "(length + 128 tokens))")
    g.add_argument("--save-samples", default=None, metavar="JSONL", help="one JSON line per sample: prompt ids, "
                   "references, answer and score; written as the run goes")
    g.add_argument("--resume", action="store_true", help="continue the run whose --save-samples file this is")


def check_args(args):
    """Checks that need no weights. Returns the checkpoint's config and the RoPE methods, with their labels."""
    lengths = args.lengths
    check_task_flags(args)
    inputs = getattr(args, "data", None) or getattr(args, "haystack", None) or ()
    report.check_outputs(args.json, args.plot, inputs=inputs)
    if args.original_ctx is not None and args.original_ctx < 1:
        raise UserError(f"--original-ctx must be >= 1, got {args.original_ctx}")
    yarn_scale(args)
    hf = read_config(args.model)  # config.json, read once
    cfg = LlamaConfig.from_hf(hf, where=os.path.join(args.model, "config.json"))
    specs = [parse_rope_spec(s, args.rope_factor) for s in args.rope or ["model"]]
    ropes, notes = [], []
    for method, factor in specs:
        L, why = original_context(hf, cfg.rope, method, args.original_ctx)
        ropes.append(rope_config(cfg.rope, method, factor, lengths[-1], L))
        notes += [n for n in why + [replaced_scaling_note(cfg.rope, ropes[-1])] if n and n not in notes]
    labels = [("model: " if m == "model" else "") + describe(r) for (m, _), r in zip(specs, ropes)]
    if args.label:
        labels = [f"{args.label}, {x}" for x in labels]
    return cfg, ropes, labels, notes


def read_documents(args, cfg):
    """ppl's documents, chosen for each length (choose_documents): {length: [(name, 1-D token ids)]}, and the
    vocabulary they were tokenized with."""
    docs, vocab = reading(load_documents, args.data, args.model)
    if vocab > cfg.vocab_size:
        raise UserError(f"--data was tokenized with a vocabulary of {vocab}, larger than the model's {cfg.vocab_size}")
    if not docs:
        raise UserError(f"no documents in {' '.join(args.data)}")
    chosen = choose_documents(docs, args.lengths, args.max_docs, args.docs_per_length)
    longest = args.lengths[-1]
    if not chosen[longest] and not args.docs_per_length:
        raise UserError(f"no document has {longest} tokens, the longest length (the longest of the {len(docs)} has "
                        f"{max(len(ids) for _, ids in docs)}): the same documents are scored at every length, so give "
                        "shorter --lengths, or --docs-per-length to score at each length those that reach it")
    note_documents(docs, chosen, args.docs_per_length)
    if args.stride is not None:
        warn_stride_cost(chosen, args.stride, args.max_tokens)
    return chosen, vocab


def warn_stride_cost(chosen, stride, max_tokens):
    passes, read, scored = stride_cost(chosen, stride, max_tokens)
    if read > STRIDE_COST_WARNING * scored:
        note(f"warning: --stride {stride}: {passes:,} forward passes reading {read:,} tokens to score {scored:,} "
             f"({read / scored:.0f}x, for each --rope method); a larger --stride or fewer --max-docs costs less")


def read_tokenizer(args, cfg):
    """passkey's tokenizer, checked on the shortest prompt, and its vocabulary's size."""
    from data.tokenizer import load_tokenizer
    tok = reading(load_tokenizer, args.model, prefix="tokenizer missing or unreadable: ")
    try:
        ids = passkey.passkey_prompt(tok, args.lengths[0], 0.5, 12345)
    except ValueError as e:
        raise UserError(str(e)) from None
    if max(ids) >= cfg.vocab_size:
        raise UserError(f"the tokenizer produced id {max(ids)}, outside the model's vocabulary of {cfg.vocab_size}")
    return tok, tok.vocab_size


def read_ruler(args, cfg):
    """ruler's tokenizer and what its tasks draw from; each task's first sample is made at every length, so a
    length too short for a task, or past what the haystack fills, is refused before the weights are read."""
    from data.tokenizer import load_tokenizer
    tok = reading(load_tokenizer, args.model, prefix="tokenizer missing or unreadable: ")
    src, args.tasks = reading(ruler.make_sources, tok, args.tasks, args.lengths, args.haystack, args.qa_file, args.seed)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's {cfg.vocab_size}")
    return (tok, src), tok.vocab_size


def run_ruler(args, model, inputs, label, done, append):
    """One method's RULER scores; the lines of --save-samples appended as they are scored."""
    tok, src = inputs
    log = (lambda lines: append([{"method": label, **line} for line in lines])) if append else None
    mine = {key[1:]: line for key, line in done.items() if key[0] == label}
    try:
        scores = ruler.evaluate(model, tok, args.tasks, args.lengths, args.samples, args.seed, src, args.batch_size,
                                mine, log, desc=label)
    except torch.OutOfMemoryError as e:
        raise UserError(f"out of memory with --batch-size {args.batch_size} at up to {args.lengths[-1]} tokens: a "
                        f"smaller batch needs less ({str(e).splitlines()[0]})") from None
    return {"method": label, "scores": {t: {str(n): v for n, v in row.items()} for t, row in scores.items()},
            "average": {str(n): float(np.mean([scores[t][n] for t in args.tasks])) for n in args.lengths}}


def run(args, model, ropes, labels, inputs, device):
    """Each method in turn on the same weights: only the RoPE tables are swapped."""
    results, lengths = [], args.lengths
    if args.task == "ruler":
        done, append = open_samples(args.save_samples, args.resume) if args.save_samples else ({}, None)
    for label, rope in zip(labels, ropes):
        model.set_rope(rope)
        if args.task == "ruler":
            results.append({**run_ruler(args, model, inputs, label, done, append), "rope": asdict(rope)})
            continue
        if args.task == "ppl":
            r = evaluate_ppl(model, inputs, args.stride, args.max_tokens, desc=label)
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
    """The run as --json holds it (support/report.py's format): the task, the model, the lengths, the task's own
    flags and the results."""
    extra = {"data": args.data, "stride": args.stride, "docs_per_length": args.docs_per_length,
             "documents": scored_documents(results)} if args.task == "ppl" else \
        {"tasks": args.tasks, "samples": args.samples, "seed": args.seed, "haystack": args.haystack,
         "qa_files": args.qa_file} if args.task == "ruler" else \
        {"depths": args.depths, "trials": args.trials, "seed": args.seed}
    return {"task": args.task, "model": args.model, "lengths": args.lengths, **extra, "results": results}


def scored_documents(results):
    """The names of the documents scored, taken out of the results (every method scores the same ones):
    one list when every length scored the same documents (the paper's protocol), else {length: names}."""
    names = {n: cell.pop("names") for r in results for n, cell in r["ppl"].items()}
    return next(iter(names.values())) if len({tuple(v) for v in names.values()}) == 1 else names


def main(argv=None):
    with one_line_errors():
        args = parse_args(argv)
        if args.task == "report":
            return report.report(args.files, args.out)
        cfg, ropes, labels, notes = check_args(args)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        inputs, vocab = read_documents(args, cfg) if args.task == "ppl" else read_ruler(args, cfg) \
            if args.task == "ruler" else read_tokenizer(args, cfg)
        for line in notes:  # which L a --rope METHOD scales from, when config.json does not say it
            note(line)
        model = Llama.from_pretrained(args.model, dtype=dtype, device=device, config=cfg)
        drop_padding(model, vocab)
        with attention_kernels(device, dtype):
            results = run(args, model, ropes, labels, inputs, device)
        report.write_run(run_json(args, results), args.json, args.plot)


if __name__ == "__main__":
    main()
