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

Output: a markdown table on stdout; with --json OUT the numbers, and a PNG plot next to it (OUT with .png,
or --plot FILE) when matplotlib is installed: perplexity against length, one line per method; passkey
accuracy as a length x depth heatmap.

What this file teaches: the paper's two measurements, perplexity by context length and passkey
retrieval (the task itself is data/passkey.py's), and comparing RoPE methods on one checkpoint by
swapping only its tables.
"""

import argparse
import json
import math
import os
import textwrap
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from publish import check_writable, write_json
from common import (MAX_POSITIONS, ArgumentParser, UserError, attention_backends, describe, note, one_line_errors,
                    pick_device, pick_dtype, reading, rope_config)
from data import passkey
from model import Llama, LlamaConfig


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
        ppl = math.exp(nll / count) if count else None  # None: no document was long enough
        out[length] = {"ppl": ppl, "nll": nll, "tokens": count, "docs": len(usable), "seconds": seconds}
        if usable:
            note(f"{desc} @ {length}: perplexity {ppl:.3f} over {len(usable)} documents, "
                 f"{seconds / len(usable):.2f} s per document")
    return out


# ---- output: tables and plots -------------------------------------------------------------------------

def markdown_table(header, rows):
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def plot_ppl(results, lengths, path):
    """Perplexity against context length, one line per method. False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs = [n for n in lengths if r["ppl"][str(n)]["tokens"]]
        ax.plot(xs, [r["ppl"][str(n)]["ppl"] for n in xs], marker="o", label=r["method"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_passkey(results, lengths, depths, path):
    """Accuracy heatmaps, lengths x depths, one panel per method. False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(1.2 + 0.9 * len(depths) * len(results), 1 + 0.5 * len(lengths)),
                             squeeze=False)
    for ax, r in zip(axes[0], results):
        acc = np.array([[r["accuracy"][str(n)][str(d)] for d in depths] for n in lengths])
        ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        for i in range(len(lengths)):
            for j in range(len(depths)):
                ax.text(j, i, f"{acc[i, j]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("depth of the key")
        ax.set_ylabel("context length")
        ax.set_title(textwrap.fill(r["method"], 28), fontsize=9)  # a long label wraps, never overflows its panel
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def check_run(run):
    """Raise ValueError unless `run` has the shape eval.py ppl --json or passkey --json writes."""
    task = run.get("task") if isinstance(run, dict) else None
    if task not in ("ppl", "passkey"):
        raise ValueError("not the output of eval.py ppl --json or passkey --json")
    lengths, results = run.get("lengths"), run.get("results")
    if not isinstance(lengths, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
        raise ValueError('"lengths" must be a list of integers')
    depths = run.get("depths")
    if task == "passkey" and (not isinstance(depths, list) or not all(isinstance(d, (int, float)) for d in depths)):
        raise ValueError('"depths" must be a list of numbers')
    if not isinstance(results, list) or not results:
        raise ValueError('"results" must be a non-empty list')
    cells = "ppl" if task == "ppl" else "accuracy"
    for r in results:
        if not (isinstance(r, dict) and isinstance(r.get("method"), str) and isinstance(r.get(cells), dict)):
            raise ValueError(f'each result needs a "method" string and a "{cells}" object')
    if task == "ppl":
        for r in results:
            for n, cell in r["ppl"].items():
                ok = isinstance(cell, dict) and isinstance(cell.get("tokens"), int) and (
                    cell["tokens"] == 0 or isinstance(cell.get("ppl"), (int, float)) and math.isfinite(cell["ppl"]))
                if not ok:
                    raise ValueError(f'{r["method"]} @ {n}: expected {{"ppl": a finite number, "tokens": N}}')
        return
    for r in results:
        for n in lengths:
            row = r["accuracy"].get(str(n))
            if not isinstance(row, dict) or not all(isinstance(row.get(str(d)), (int, float)) for d in depths):
                raise ValueError(f'{r["method"]} @ {n}: expected an accuracy for each depth')


def report(files, out=None):
    """Several runs of one task (e.g. a base model under each method, then the fine-tuned ones) as one
    table and one plot: perplexity by length, or passkey accuracy by length (the mean over depths).
    Raises UserError for a file that is not such a run."""
    if out:
        check_output(out, "--out")
    runs = []
    for f in files:
        try:
            with open(f) as fh:
                runs.append(json.load(fh))
            check_run(runs[-1])
            if runs[-1]["task"] != runs[0]["task"]:
                raise ValueError(f"not the output of eval.py {runs[0]['task']} --json, as the first file is "
                                 "(a report merges runs of one task)")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {f}: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
        except ValueError as e:  # also json.JSONDecodeError
            raise UserError(f"{f}: {e}") from None
    if runs[0]["task"] == "passkey":
        return passkey_report(runs, out)
    lengths = sorted({n for r in runs for n in r["lengths"]})
    results = [res for r in runs for res in r["results"]]
    cell = lambda res, n: (f"{res['ppl'][str(n)]['ppl']:.3f}" if str(n) in res["ppl"] and res["ppl"][str(n)]["tokens"]
                           else "-")
    table = markdown_table(["method \\ length"] + lengths, [[res["method"]] + [cell(res, n) for n in lengths]
                                                             for res in results])
    print(table)
    if out:
        for res in results:  # lengths a run did not evaluate count as empty
            res["ppl"] = {str(n): res["ppl"].get(str(n), {"tokens": 0}) for n in lengths}
        write_report(out, table, lambda png: plot_ppl(results, lengths, png))
    return results


def passkey_report(runs, out):
    lengths = sorted({n for r in runs for n in r["lengths"]})
    depths = sorted({d for r in runs for d in r["depths"]})
    results = [res for r in runs for res in r["results"]]
    trials = sorted({r["trials"] for r in runs if isinstance(r.get("trials"), int)})

    def cell(res, n):
        row = res["accuracy"].get(str(n))
        return f"{np.mean([row[str(d)] for d in depths if str(d) in row]):.0%}" if row else "-"
    table = markdown_table(["method \\ length"] + lengths, [[res["method"]] + [cell(res, n) for n in lengths]
                                                              for res in results])
    print(f"passkey retrieval: accuracy at each length over the key depths {', '.join(f'{d:g}' for d in depths)}"
          f" ({'/'.join(map(str, trials))} keys each)\n")
    print(table)
    if out:
        for res in results:  # lengths and depths a run did not evaluate show as 0 in the heatmap
            res["accuracy"] = {str(n): {str(d): res["accuracy"].get(str(n), {}).get(str(d), 0.0) for d in depths}
                               for n in lengths}
        write_report(out, table, lambda png: plot_passkey(results, lengths, depths, png))
    return results


def write_report(out, table, plot):
    """The markdown table in `out`, and plot(PNG path) beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(table + "\n")
    png = os.path.splitext(out)[0] + ".png"
    note(f"wrote {out}" + (f" and {png}" if plot(png) else " (no matplotlib: no plot)"))


# ---- command line: parse, check, read the inputs, evaluate, write ---------------------------------------

def check_output(path, flag):
    """An output file: not a directory, in a directory we can write (checked before the evaluation)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory: give a file name")
    check_writable(os.path.dirname(os.path.abspath(path)), flag)


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
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path:
            check_output(path, flag)
    cfg = LlamaConfig.from_pretrained(args.model)
    specs = [parse_rope_spec(s, args.rope_factor) for s in args.rope or ["model"]]
    ropes = [rope_config(cfg.rope, m, f, lengths[-1]) for m, f in specs]
    labels = [("model: " if m == "model" else "") + describe(r) for (m, _), r in zip(specs, ropes)]
    if args.label:
        labels = [f"{args.label}, {x}" for x in labels]
    return cfg, ropes, labels


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


def write(args, results):
    """The table on stdout; with --json the numbers, and the plot."""
    lengths = args.lengths
    if args.task == "ppl":
        what = f"sliding window, stride {args.stride}" if args.stride else "whole documents truncated to each length"
        print(f"perplexity ({what}) of {args.model}\n")
        rows = [[r["method"]] + [f"{r['ppl'][str(n)]['ppl']:.3f}" if r["ppl"][str(n)]["tokens"] else "-"
                                  for n in lengths] for r in results]
        print(markdown_table(["method \\ length"] + lengths, rows))
        first = results[0]["ppl"]
        print("\nscored per length: " + ", ".join(f"{n}: {first[str(n)]['docs']} docs, {first[str(n)]['tokens']} tokens"
                                                for n in lengths))
    else:
        print(f"passkey retrieval accuracy of {args.model}, {args.trials} keys per cell\n")
        for r in results:
            print(f"{r['method']}: mean {r['mean']:.1%}\n")
            rows = [[n] + [f"{r['accuracy'][str(n)][str(d)]:.0%}" for d in args.depths] for n in lengths]
            print(markdown_table(["length \\ depth"] + [f"{d:g}" for d in args.depths], rows) + "\n")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        extra = {"data": args.data, "stride": args.stride} if args.task == "ppl" else \
            {"depths": args.depths, "trials": args.trials, "seed": args.seed}
        write_json(args.json, {"task": args.task, "model": args.model, "lengths": lengths, **extra, "results": results})
        note(f"wrote {args.json}")
    plot = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if plot:
        done = plot_ppl(results, lengths, plot) if args.task == "ppl" else \
            plot_passkey(results, lengths, args.depths, plot)
        note(f"wrote {plot}" if done else "note: matplotlib is not installed: plot skipped (pip install matplotlib)")


def main(argv=None):
    with one_line_errors():
        args = parse_args(argv)
        if args.task == "report":
            return report(args.files, args.out)
        cfg, ropes, labels = check_args(args)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        inputs = read_documents(args, cfg) if args.task == "ppl" else read_tokenizer(args, cfg)
        model = Llama.from_pretrained(args.model, dtype=dtype, device=device)
        with attention_backends(device, dtype):
            results = run(args, model, ropes, labels, inputs, device)
        write(args, results)


if __name__ == "__main__":
    main()
