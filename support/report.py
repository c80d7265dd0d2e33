"""
How eval.py's numbers are shown: markdown tables on stdout and in files, the JSON of a run, and plots
(perplexity against length, one line per method; passkey accuracy as a length x depth heatmap), for one
run or for several merged into one table.

    python eval.py ppl ... --json out/yarn.json     # write_run: the table, out/yarn.json and out/yarn.png
    python eval.py report out/base.json out/yarn.json --out out/ppl.md   # report: one table and one plot

A run is what `eval.py ppl --json` (or passkey --json) writes: {"task", "model", "lengths", the task's own
flags, "results": [{"method", "ppl" or "accuracy", ...}, ...]}.
What guards it: check_outputs refuses, before the evaluation runs, an output that cannot be written or is
a file of another kind (publish.check_target: a result, a table and a plot of ours may be replaced);
check_run refuses JSON of another shape (report turns that into a UserError naming the file); every file
is written through publish.py. Plots need matplotlib: without it they are skipped, with a note.
"""

import math
import os
import textwrap

import numpy as np

from support.common import UserError, note
from support.jsonfile import loads
from support.publish import check_target, new_file, write_json


def write_run(run, json_path=None, plot_path=None):
    """One run of eval.py ppl or passkey: its table on stdout; with json_path the run as JSON, and the plot
    at plot_path (default: json_path with .png)."""
    lengths, results = run["lengths"], run["results"]
    if run["task"] == "ruler":
        print(f"RULER of {run['model']}, {run['samples']} samples per task and length (score: RULER's, 0-100)\n")
        print(ruler_table(results, lengths, run["tasks"]))
    elif run["task"] == "ppl":
        what = f"sliding window, stride {run['stride']}" if run["stride"] else "whole documents truncated to each length"
        print(f"perplexity ({what}) of {run['model']}\n")
        rows = [[r["method"]] + [f"{r['ppl'][str(n)]['ppl']:.3f}" if r["ppl"][str(n)]["tokens"] else "-"
                                  for n in lengths] for r in results]
        print(markdown_table(["method \\ length"] + lengths, rows))
        first = results[0]["ppl"]
        print("\nscored per length: " + ", ".join(f"{n}: {first[str(n)]['docs']} docs, {first[str(n)]['tokens']} tokens"
                                                for n in lengths))
    else:
        print(f"passkey retrieval accuracy of {run['model']}, {run['trials']} keys per cell\n")
        for r in results:
            print(f"{r['method']}: mean {r['mean']:.1%}\n")
            rows = [[n] + [f"{r['accuracy'][str(n)][str(d)]:.0%}" for d in run["depths"]] for n in lengths]
            print(markdown_table(["length \\ depth"] + [f"{d:g}" for d in run["depths"]], rows) + "\n")
    if json_path:
        try:
            write_json(json_path, run)
        except OSError as e:  # a full disk after the whole evaluation: one line, and the table above stands
            raise UserError(f"cannot write {json_path}: {e.strerror or e} (the results are the table above)") from None
        note(f"wrote {json_path}")
    plot = plot_path or (os.path.splitext(json_path)[0] + ".png" if json_path else None)
    if plot:
        done = plot_ppl(results, lengths, plot) if run["task"] == "ppl" else plot_ruler(results, lengths, plot) \
            if run["task"] == "ruler" else plot_passkey(results, lengths, run["depths"], plot)
        note(f"wrote {plot}" if done else "note: matplotlib is not installed: plot skipped (pip install matplotlib)")


def markdown_table(header, rows):
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def ruler_table(results, lengths, tasks):
    """Tasks x lengths and their average, for each method a column per length (several side by side: A, B, ...
    named below the table)."""
    tag = (lambda i: "") if len(results) == 1 else (lambda i: " " + chr(ord("A") + i % 26))
    header = ["task \\ length"] + [f"{n}{tag(i)}" for n in lengths for i in range(len(results))]
    cell = lambda r, t, n: f"{r['scores'][t][str(n)]:.1f}" if str(n) in r["scores"].get(t, {}) else "-"  # noqa: E731
    rows = [[t] + [cell(r, t, n) for n in lengths for r in results] for t in tasks]
    rows.append(["**average**"] + [f"**{r['average'][str(n)]:.1f}**" if str(n) in r["average"] else "-"
                                   for n in lengths for r in results])
    legend = "\n\n" + "; ".join(f"{tag(i).strip() or 'method'}: {r['method']}" for i, r in enumerate(results))
    return markdown_table(header, rows) + legend


def plot_ruler(results, lengths, path):
    """RULER's average score against context length, one line per method. False if matplotlib is missing."""
    return plot_by_length(results, lengths, path, lambda r, n: r["average"].get(str(n)),
                          "RULER average score (0-100)", ylim=(-2, 102))


def plot_ppl(results, lengths, path):
    """Perplexity against context length, one line per method. False if matplotlib is missing."""
    return plot_by_length(results, lengths, path,
                          lambda r, n: r["ppl"][str(n)]["ppl"] if r["ppl"][str(n)]["tokens"] else None, "perplexity")


def plot_by_length(results, lengths, path, value, ylabel, ylim=None):
    """value(run, length) against context length (log scale), one line per method, lengths it has no value
    for left out. False if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs = [n for n in lengths if value(r, n) is not None]
        ax.plot(xs, [value(r, n) for n in xs], marker="o", label=r["method"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set(xlabel="context length (tokens)", ylabel=ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(plt, fig, path)
    return True


def plot_passkey(results, lengths, depths, path):
    """Accuracy heatmaps, lengths x depths, one panel per method. False if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
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
    save_figure(plt, fig, path)
    return True


def pyplot():
    """matplotlib.pyplot drawing into files only (no display needed), or None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


MARKER = "yarn-from-scratch eval.py"  # in every plot we draw: what lets a later run replace it
PLOT_FORMATS = ("png", "svg", "pdf")


def save_figure(plt, fig, path):
    """The figure in the format its file extension names (png, svg, pdf), written through publish.new_file,
    with our marker in its metadata."""
    fmt = plot_format(path)
    with new_file(path, "wb") as f:
        fig.savefig(f, format=fmt, dpi=120, metadata={"Software" if fmt == "png" else "Creator": MARKER})
    plt.close(fig)


def plot_format(path):
    return os.path.splitext(path)[1][1:].lower() or "png"


def report(files, out=None):
    """Several runs of one task (e.g. a base model under each method, then the fine-tuned ones) as one
    table and one plot: perplexity by length, or passkey accuracy by length (the mean over depths).
    Raises UserError for a file that is not such a run."""
    if out:
        check_outputs(table_path=out, inputs=files)
    runs = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                runs.append(loads(fh.read(), f))
            check_run(runs[-1])
            if runs[-1]["task"] != runs[0]["task"]:
                raise ValueError(f"not the output of eval.py {runs[0]['task']} --json, as the first file is "
                                 "(a report merges runs of one task)")
        except UserError:  # the JSON reader's one line, naming the file
            raise
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {f}: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
        except ValueError as e:  # also json.JSONDecodeError
            raise UserError(f"{f}: {e}") from None
    tell_apart(runs)
    if runs[0]["task"] == "passkey":
        return passkey_report(runs, out)
    if runs[0]["task"] == "ruler":
        return ruler_report(runs, out)
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


def tell_apart(runs):
    """Rows of different checkpoints that carry the same label (runs without --label) get the checkpoint's
    name in front, so that no two rows of a table read the same."""
    labels = [res["method"] for r in runs for res in r["results"]]
    for r in runs:
        for res in r["results"]:
            if labels.count(res["method"]) > 1 and isinstance(r.get("model"), str):
                res["method"] = f"{os.path.basename(os.path.normpath(r['model']))}: {res['method']}"


def ruler_report(runs, out):
    lengths = sorted({n for r in runs for n in r["lengths"]})
    tasks = list(dict.fromkeys(t for r in runs for t in r["tasks"]))
    results = [res for r in runs for res in r["results"]]
    table = ruler_table(results, lengths, tasks)
    print("RULER: score per task and length (0-100), and the average over the tasks\n")
    print(table)
    if out:
        write_report(out, table, lambda png: plot_ruler(results, lengths, png))
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
    print(f"passkey retrieval: accuracy at each length over {depths_of(runs)} ({'/'.join(map(str, trials))} keys "
          "each)\n")
    print(table)
    if out:
        for res in results:  # lengths and depths a run did not evaluate show as 0 in the heatmap
            res["accuracy"] = {str(n): {str(d): res["accuracy"].get(str(n), {}).get(str(d), 0.0) for d in depths}
                               for n in lengths}
        write_report(out, table, lambda png: plot_passkey(results, lengths, depths, png))
    return results


def depths_of(runs):
    """The key depths a passkey report's means are over: one list when every run used the same, else each
    row's own (a mean over other depths is another number)."""
    named = lambda ds: ", ".join(f"{d:g}" for d in ds)
    if len({tuple(r["depths"]) for r in runs}) == 1:
        return f"the key depths {named(runs[0]['depths'])}"
    rows = "".join(f"\n  {res['method']}: {named(r['depths'])}" for r in runs for res in r["results"])
    return f"the key depths of each row, which differ:{rows}\n"


def write_report(out, table, plot):
    """The markdown table in `out`, and plot(PNG path) beside it."""
    with new_file(out) as fh:
        fh.write(table + "\n")
    png = os.path.splitext(out)[0] + ".png"
    note(f"wrote {out}" + (f" and {png}" if plot(png) else " (no matplotlib: no plot)"))


# ---- checks: what can be written, what can be read ----------------------------------------------------

def check_outputs(json_path=None, plot_path=None, table_path=None, inputs=()):
    """What eval.py is about to write, before the evaluation: each file new or one of ours of its kind
    (publish.check_target), never an input; the plot in a format we draw."""
    plot = plot_path or next((os.path.splitext(p)[0] + ".png" for p in (json_path, table_path) if p), None)
    flag = "--plot" if plot_path else ("--json" if json_path else "--out")
    if plot and plot_format(plot) not in PLOT_FORMATS:
        raise UserError(f"--plot {plot}: a .{plot_format(plot)} file; plots are {', '.join(PLOT_FORMATS)}")
    for name, path in (("--json", json_path), ("--out", table_path)):  # two outputs under one name: one is lost
        if plot and path and os.path.realpath(path) == os.path.realpath(plot):
            raise UserError(f"{name} {path} is also where the plot goes: the plot would replace it; give {name} "
                            f"a {'.json' if name == '--json' else '.md'} name, or --plot another file")
    if json_path:
        check_target(json_path, "--json", is_result, "a result of eval.py", inputs)
    if table_path:
        check_target(table_path, "--out", is_table, "a table of eval.py report", inputs)
    if plot:
        check_target(plot, flag + (f" (its plot {plot})" if not plot_path else ""), is_plot, "a plot eval.py drew",
                     inputs)


def is_result(path):
    try:
        with open(path, "rb") as f:
            run = loads(f.read(), path)
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and run.get("task") in ("ppl", "passkey", "ruler") and \
        isinstance(run.get("results"), list)


def is_table(path):
    try:
        with open(path) as f:
            return f.readline().startswith(("| method \\ length |", "| task \\ length |"))
    except (OSError, UnicodeDecodeError):
        return False


def is_plot(path):
    try:
        with open(path, "rb") as f:
            return MARKER.encode() in f.read(1 << 24)
    except OSError:
        return False


def check_run(run):
    """Raise ValueError unless `run` has the shape eval.py ppl --json or passkey --json writes."""
    task = run.get("task") if isinstance(run, dict) else None
    if task not in ("ppl", "passkey", "ruler"):
        raise ValueError("not the output of eval.py ppl --json, passkey --json or ruler --json")
    lengths, results = run.get("lengths"), run.get("results")
    if not isinstance(lengths, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
        raise ValueError('"lengths" must be a list of integers')
    depths = run.get("depths")
    if task == "passkey" and (not isinstance(depths, list) or not all(isinstance(d, (int, float)) for d in depths)):
        raise ValueError('"depths" must be a list of numbers')
    if not isinstance(results, list) or not results:
        raise ValueError('"results" must be a non-empty list')
    if task == "ruler":
        return check_ruler_run(run)
    cells = "ppl" if task == "ppl" else "accuracy"
    for r in results:
        if not (isinstance(r, dict) and isinstance(r.get("method"), str) and isinstance(r.get(cells), dict)):
            raise ValueError(f'each result needs a "method" string and a "{cells}" object')
    if task == "ppl":
        for r in results:
            for n, cell in r["ppl"].items():
                ok = isinstance(cell, dict) and isinstance(cell.get("tokens"), int) and (  # inf: past floats
                    cell["tokens"] == 0 or isinstance(cell.get("ppl"), (int, float)) and not math.isnan(cell["ppl"]))
                if not ok:
                    raise ValueError(f'{r["method"]} @ {n}: expected {{"ppl": a number, "tokens": N}}')
        return
    for r in results:
        for n in lengths:
            row = r["accuracy"].get(str(n))
            if not isinstance(row, dict) or not all(isinstance(row.get(str(d)), (int, float)) for d in depths):
                raise ValueError(f'{r["method"]} @ {n}: expected an accuracy for each depth')


def check_ruler_run(run):
    if not isinstance(run.get("tasks"), list) or not all(isinstance(t, str) for t in run["tasks"]):
        raise ValueError('"tasks" must be a list of task names')
    for r in run["results"]:
        ok = isinstance(r, dict) and isinstance(r.get("method"), str) and isinstance(r.get("average"), dict) and \
            isinstance(r.get("scores"), dict) and all(isinstance(v, dict) for v in r["scores"].values())
        if not ok:
            raise ValueError('each result needs a "method" string, "scores" {task: {length: score}} and "average"')
