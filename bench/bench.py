"""
Benchmark model.py against Hugging Face transformers on the same model, in one command.

Both implementations run the *same* checkpoint: we build a random Llama, save it in the Hugging Face
layout with our save_pretrained, and transformers loads that directory (LlamaForCausalLM, sdpa
attention). Before any timing, logits, loss and greedy tokens are asserted equal. Each measurement
(implementation, workload, repetition) runs in a fresh subprocess, so peak memory is its own; ours and
theirs alternate, and the median over repetitions is reported.

    python bench/bench.py                          # tiny + 135M model, all workloads (~25 min, 2 cores)
    python bench/bench.py --quick                  # tiny model, short lengths, 1 repetition (~30 s)
    python bench/bench.py --sizes 135m --workloads decode --reps 3
    python bench/bench.py --sizes 135m --workloads eval-4096,train-1024
    python bench/bench.py --device cuda            # bf16 on the GPU, peak = torch.cuda.max_memory_allocated
    # one GPU: Llama 2 7B's layers (8 of them), YaRN s=32 over L=4096, at the paper's lengths
    python bench/bench.py --device cuda --sizes 7b-8l --workloads train-65536,prefill-131072,decode-131072 --reps 1

Workloads (T = tokens, batch 1):
    eval-T    the mean next-token loss over T tokens, no grad (ours: chunked over the vocabulary;
              transformers: model(ids, labels=...) which materialises the (T, V) fp32 logits)
    logits-T  a plain forward returning the full (T, V) logits
    train-T   one training step: forward + backward + AdamW, with --checkpointing (transformers has no
              selective mode: it checkpoints each layer fully unless the mode is none)
    prefill-T a T-token prompt into the KV cache, no grad (ours: chunked prefill into a cache allocated
              once; transformers: one forward with a fresh DynamicCache, logits of the last position only)
    decode-P  greedy decoding with a P-token prompt in the KV cache; tokens/s excludes the prefill
              (ours: setup_cache + prefill + model(tok, pos=t, last_only=True);
               transformers: a manual loop with its default DynamicCache, as generate() uses)

Peak memory: on CPU the process's peak RSS (VmHWM, reset after loading so it covers the workload,
the loaded weights included); on CUDA torch.cuda.max_memory_allocated. The machine's fp32 (bf16 on
CUDA) matmul peak and copy bandwidth are measured in the same run (on a GPU named in support/plan.py's table,
the datasheet's dense bf16 peak is used instead: 989 TFLOP/s for H100 and H200); forward FLOPs are counted as
2 * (weights of every matmul, lm_head included) * T + 2 * T^2 * (H * D) * layers (causal attention:
QK^T and PV, half the square each), a training step as 3x that.
Decode is bound by memory bandwidth instead: its "of limit" is (weights + K/V read per token) * tok/s
over the copy bandwidth. "others" is the largest share of the CPU that other processes took during a
measurement: on a shared machine, runs with a high share are slowed unevenly (see --wait-idle).
Results: a table of our/their ratios on stdout, JSON (and the same table as Markdown) under --out.
"""

import argparse
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support.common import ArgumentParser, UserError, one_line_errors  # noqa: E402  (after the path: bench/ runs as a script)
from model import CHECKPOINTING, Llama, LlamaConfig  # noqa: E402
from support.plan import peak_flops  # noqa: E402
from support.publish import new_file  # noqa: E402
from rope import RopeConfig  # noqa: E402

# The models: "135m" has the shape of SmolLM-135M (a small real Llama-family model), with YaRN x8
# over its 2k context so that 16k tokens are a context it is configured for.
SIZES = {
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # Llama 2 7B's shapes, 8 of its 32 layers: the paper's per-layer work at 64k-128k on one GPU
    "7b-8l": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
                  num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
}
ROPE = dict(method="yarn", theta=10000.0, factor=8.0, original_max_position_embeddings=2048)
ROPES = {"7b-8l": dict(method="yarn", theta=10000.0, factor=32.0, original_max_position_embeddings=4096)}

DEFAULT_WORKLOADS = ("eval-2048", "eval-8192", "eval-16384", "logits-2048", "train-2048",
                     "decode-4096", "decode-16384")
QUICK_WORKLOADS = ("eval-256", "eval-1024", "logits-256", "train-256", "decode-256")
KINDS = ("eval", "logits", "train", "prefill", "decode")

# The issue's goals, our/their: speed ratios at least, memory ratios at most.
GOALS = {("decode", None, "speed"): 1.5, ("train", None, "speed"): 1.2, ("eval", 2048, "speed"): 1.0,
         ("eval", 16384, "speed"): 1.3, ("eval", 16384, "memory"): 0.6}


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class BenchConfig:
    sizes: str = arg("tiny,135m", f"comma-separated model sizes: {', '.join(SIZES)}")
    workloads: str = arg("", f"comma-separated names (eval-2048) or kinds ({', '.join(KINDS)}); default: "
                             + ", ".join(DEFAULT_WORKLOADS))
    reps: int = arg(5, "fresh processes per (implementation, workload); the median is reported")
    long_reps: int = arg(1, "repetitions of a workload whose first ours+theirs pair took over --long-run s")
    long_run: float = arg(60.0, "seconds: see --long-reps (the 8k and 16k runs of the 135m model on a CPU)")
    quick: bool = arg(False, "tiny model, short lengths, 1 repetition: a smoke test")
    device: str = arg("cpu", "cpu (fp32) or cuda (bf16)")
    threads: int = arg(0, "torch threads (0: every core)")
    decode_tokens: int = arg(0, "new tokens per decode measurement (0: 64 for 135m, 128 for tiny)")
    min_time: float = arg(1.0, "repeat a workload inside one process until this many seconds have passed")
    compile: bool = arg(False, "torch.compile our model for eval/logits/train, and on CUDA our decode step "
                               "(ours only; compile time is not timed)")
    checkpointing: str = arg("none", "our activation checkpointing in train workloads: none, full or "
                                          "selective (transformers: full unless none)")
    cache_dir: str = arg(os.path.join(ROOT, "bench", ".cache"), "where the random checkpoints are saved")
    wait_idle: float = arg(0.0, "on a shared machine: before each measurement wait up to this many seconds "
                                "for other processes to leave the CPU, and redo (twice at most) a measurement "
                                "they took over 10%% of it during")
    out: str = arg("", "JSON results path (default bench/results/DEVICE.json, quick.json with --quick); "
                       "the Markdown table goes beside it")


# ---- small helpers ------------------------------------------------------------------------------------

def parse_workload(name):
    kind, _, n = name.partition("-")
    if kind not in KINDS or not n.isdigit() or int(n) < 2:
        raise ValueError(f"bad workload {name!r}: expected KIND-TOKENS with KIND one of {', '.join(KINDS)}")
    return kind, int(n)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def rss_mb(key="VmRSS"):
    """Resident memory from /proc (VmRSS now, VmHWM the peak); ru_maxrss where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key + ":"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def reset_peak(device):
    """Measure the peak from now on: the loading transient (file pages + tensors) is not the workload's."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: resets VmHWM to the current RSS
        return True
    except OSError:
        return False  # the peak then includes loading; recorded as exact_peak=False


def peak_mb(device):
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss_mb("VmHWM")


def timed(fn, device, min_time, max_iters=50):
    """Median seconds of fn(), run at least once and again until min_time has passed."""
    times, start = [], time.perf_counter()
    while not times or (time.perf_counter() - start < min_time and len(times) < max_iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def model_config(size):
    return LlamaConfig(**SIZES[size], rope=RopeConfig(**ROPES.get(size, ROPE)))


def num_params(size):
    with torch.device("meta"):  # no memory: only the count
        return Llama(model_config(size)).num_params()


def forward_flops(cfg, T):
    """2 * (weights of every matmul) * T + causal attention 2 * T^2 * H*D per layer (the docstring's)."""
    C, I, HD, KVD = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    weights = (2 * C * HD + 2 * C * KVD + 3 * C * I) * cfg.num_hidden_layers + C * cfg.vocab_size  # + lm_head
    return 2 * weights * T + 2 * T * T * HD * cfg.num_hidden_layers


def decode_bytes(cfg, T, bytes_per_el):
    """What one decoded token must read: every weight once, and the K/V of T cached positions."""
    params = (2 * cfg.hidden_size * cfg.num_attention_heads * cfg.head_dim
              + 2 * cfg.hidden_size * cfg.num_key_value_heads * cfg.head_dim
              + 3 * cfg.hidden_size * cfg.intermediate_size) * cfg.num_hidden_layers \
        + cfg.hidden_size * cfg.vocab_size * (1 if cfg.tie_word_embeddings else 2)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * T
    return (params + kv) * bytes_per_el


def tokens(vocab, T, seed=0):
    """Inputs (1, T) and targets (1, T): the next ids, the last masked (-100) so that our loss and
    transformers' (which drops the last position when it shifts its labels) cover the same positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, T + 1), generator=g)
    targets = ids[:, 1:].clone()
    targets[:, -1] = -100
    return ids[:, :-1], targets


# ---- the two implementations behind one interface ---------------------------------------------------

class Ours:
    name = "ours"

    def __init__(self, path, device, dtype, compile=False):
        self.model = Llama.from_pretrained(path, dtype=dtype, device=device)
        # for eval and training only: decoding stays eager, where its row-split projections (model.Linear)
        # beat what inductor makes of a matrix-vector product on this CPU (19 vs 24 tok/s at 4k)
        self.run = torch.compile(self.model, dynamic=True) if compile else self.model
        # on a GPU decoding is bound by kernel launches: the fixed-shape step as one CUDA graph
        self.step = self.model.compile_decode() if compile and device == "cuda" else None

    def train_mode(self, checkpointing):
        self.model.train()
        self.model.set_activation_checkpointing(checkpointing)

    def loss(self, idx, targets):
        return self.run(idx, targets)

    def logits(self, idx):
        return self.run(idx)

    def start(self, prompt, max_len):
        """Fill the cache with the prompt; return the first greedy token (B, 1). A cache of the same size
        is reused, as a server would: allocated once, and the same buffers for a captured decode step."""
        cache = self.model.cache
        if cache is None or cache.max_len != max_len or cache.tokens.size(0) != prompt.size(0):
            self.model.cache = None  # the old one goes before the new one is allocated
            self.model.setup_cache(prompt.size(0), max_len)
        return self.model.prefill(prompt).argmax(-1)

    def next(self, tok, pos):
        if self.step:
            return self.model.decode(tok, pos, self.step).argmax(-1)
        return self.model(tok, pos=pos, last_only=True).argmax(-1)


class Theirs:
    name = "transformers"

    def __init__(self, path, device, dtype, compile=False):
        from transformers import LlamaForCausalLM
        self.model = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to(device)
        self.model.eval()
        # transformers 5 renamed past_key_values to cache
        self.cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def train_mode(self, checkpointing):
        self.model.train()
        if checkpointing != "none":
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def loss(self, idx, targets):  # transformers shifts the labels itself: they are the inputs
        return self.model(idx, labels=idx, use_cache=False).loss

    def logits(self, idx):
        return self.model(idx, use_cache=False).logits

    def start(self, prompt, max_len):  # as generate() does: DynamicCache, logits of the last position
        from transformers import DynamicCache
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(prompt, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits[:, -1:].argmax(-1)

    def next(self, tok, pos):
        out = self.model(tok, use_cache=True, **{self.cache_kw: self.cache})
        return out.logits[:, -1:].argmax(-1)


IMPLS = {"ours": Ours, "transformers": Theirs}


@torch.no_grad()
def greedy(impl, prompt, n):
    """n greedy tokens (B, n) after the prompt."""
    out = [impl.start(prompt, prompt.size(1) + n)]
    for i in range(n - 1):
        out.append(impl.next(out[-1], prompt.size(1) + i))
    return torch.cat(out, dim=1)


# ---- worker: one measurement, in its own process ------------------------------------------------------

def work(spec):
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = spec["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if spec["task"] == "peak":
        return machine_peak(device, dtype, spec["n"])
    if spec["task"] == "check":
        return check(spec["ckpt"], device, spec["compile"])
    impl = IMPLS[spec["impl"]](spec["ckpt"], device, dtype, spec["compile"])
    kind, T = parse_workload(spec["workload"])
    idx, targets = (t.to(device) for t in tokens(impl.model.config.vocab_size, T))
    res = dict(rss_after_load_mb=rss_mb(), exact_peak=reset_peak(device))
    if kind == "eval":
        with torch.no_grad():
            impl.loss(idx[:, :512], targets[:, :512])  # warm up (and touch every weight)
            sec, iters = timed(lambda: impl.loss(idx, targets), device, spec["min_time"])
    elif kind == "logits":
        with torch.no_grad():
            impl.logits(idx[:, :512])
            sec, iters = timed(lambda: impl.logits(idx), device, spec["min_time"])
    elif kind == "train":
        impl.train_mode(spec["checkpointing"])
        opt = torch.optim.AdamW(impl.model.parameters(), lr=1e-5)

        def step(n=T):
            impl.loss(idx[:, :n], targets[:, :n]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step(min(T, 256))  # warm up; AdamW allocates its state here
        sec, iters = timed(step, device, spec["min_time"])
    elif kind == "prefill":
        with torch.no_grad():
            impl.start(idx[:, :512], 512)
            sec, iters = timed(lambda: impl.start(idx, T), device, spec["min_time"])
    else:  # decode: prompt T tokens, then n greedy tokens one at a time
        n = spec["decode_tokens"]
        with torch.no_grad():  # warm up the prefill and decode paths, with the cache of the real run
            tok = impl.start(idx[:, :64], T + n)
            for i in range(3):
                tok = impl.next(tok, 64 + i)
            sync(device)
            t = time.perf_counter()
            tok = impl.start(idx, T + n)
            sync(device)
            res["prefill_tokens_per_s"] = T / (time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(n):
                tok = impl.next(tok, T + i)
            sync(device)
            sec, iters = time.perf_counter() - t, n
        return dict(res, seconds=sec, iters=iters, tokens_per_s=n / sec, peak_mb=peak_mb(device))
    return dict(res, seconds=sec, iters=iters, tokens_per_s=T / sec, peak_mb=peak_mb(device))


def machine_peak(device, dtype, n):
    """The best square-matmul FLOP/s and copy bandwidth of this machine, in the benchmark's dtype. A GPU
    does one product or copy in about a millisecond: each timing there covers 10, so that the launch and
    synchronisation do not count. A GPU with a datasheet peak in support/plan.py's table is held to that."""
    reps = 10 if device == "cuda" else 1
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b

    def matmuls():
        for _ in range(reps):
            a @ b
    matmul = min(timed(matmuls, device, 0)[0] for _ in range(5)) / reps
    x = torch.ones(n * n * 8, device=device)  # 512 MiB at n = 4096, far beyond any cache
    y = torch.empty_like(x)
    y.copy_(x)

    def copies():
        for _ in range(reps):
            y.copy_(x)
    copy = min(timed(copies, device, 0)[0] for _ in range(5)) / reps
    res = dict(matmul_flops=2 * n**3 / matmul, copy_bytes_per_s=2 * x.numel() * 4 / copy)
    if device == "cuda":
        name = torch.cuda.get_device_name()
        datasheet = peak_flops(name)
        if datasheet:
            res.update(matmul_flops_measured=res["matmul_flops"], matmul_flops=datasheet)
    return res


def check(ckpt, device, compile):
    """Same outputs before any timing (fp32): logits, loss and greedy tokens of ours and transformers."""
    ours, theirs = Ours(ckpt, device, torch.float32, compile), Theirs(ckpt, device, torch.float32)
    idx, targets = (t.to(device) for t in tokens(ours.model.config.vocab_size, 64, seed=1))
    with torch.no_grad():
        a, b = ours.logits(idx), theirs.logits(idx)
        la, lb = ours.loss(idx, targets).item(), theirs.loss(idx, targets).item()
    ga, gb = greedy(ours, idx[:, :32], 8), greedy(theirs, idx[:, :32], 8)
    return dict(max_abs_logit_diff=(a - b).abs().max().item(), logit_scale=b.abs().max().item(),
                loss_ours=la, loss_theirs=lb, greedy_equal=torch.equal(ga, gb), greedy_tokens=ga[0].tolist())


# ---- orchestration -------------------------------------------------------------------------------------

def busy_cpu_seconds():
    """CPU seconds the whole machine has been busy (all processes), and those of our finished children."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError):
        busy = float("nan")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, children.ru_utime + children.ru_stime


def wait_idle(max_wait):
    """On a shared machine, wait (at most max_wait s) until other processes use under 10% of it."""
    deadline = time.time() + max_wait
    while time.time() < deadline:
        b0, _ = busy_cpu_seconds()
        time.sleep(1)
        if (busy_cpu_seconds()[0] - b0) / os.cpu_count() < 0.1:
            return


def spawn(spec, max_wait=0):
    """Run one measurement in a fresh Python; its last stdout line is the JSON result. Also recorded:
    other_load, the share of the machine that other processes used meanwhile (0 on a quiet machine)."""
    wait_idle(max_wait)
    (busy0, ours0), t0 = busy_cpu_seconds(), time.time()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                       capture_output=True, text=True, cwd=ROOT)
    (busy1, ours1), t1 = busy_cpu_seconds(), time.time()
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        err = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        return dict(error=f"{spec.get('impl', spec['task'])} {spec.get('workload', '')}: {err}")
    other = (busy1 - busy0) - (ours1 - ours0)
    return dict(json.loads(lines[-1]), other_load=round(max(0.0, other) / (os.cpu_count() * (t1 - t0)), 3))


def build_checkpoint(size, cache_dir):
    """Our random model of this size, saved in the Hugging Face layout (once; later runs reuse it)."""
    path = os.path.join(cache_dir, size)
    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        model = Llama(model_config(size))
        model.init_weights()
        if model.num_params() > 1e9:  # the GPU size: saved in bf16, the dtype it runs in (half the disk)
            model.to(torch.bfloat16)
        model.save_pretrained(path)
    return path


def summarise(size, workload, runs, peak, bytes_per_el):
    """Medians of ours and theirs over the repetitions, their ratios, and the issue's goals."""
    kind, T = parse_workload(workload)
    cfg = model_config(size)
    row = dict(size=size, workload=workload)
    for who in ("ours", "transformers"):
        ok = [r for r in runs[who] if "error" not in r]
        for key in ("tokens_per_s", "peak_mb", "prefill_tokens_per_s", "rss_after_load_mb"):
            if ok and key in ok[0]:
                row[f"{who}_{key}"] = statistics.median(r[key] for r in ok)
        if not ok:
            continue
        tps = row[f"{who}_tokens_per_s"]
        if kind == "decode":  # memory bound: bytes read per token against the copy bandwidth
            row[f"{who}_bandwidth_fraction"] = decode_bytes(cfg, T, bytes_per_el) * tps / peak["copy_bytes_per_s"]
        else:                 # compute bound: model FLOPs against the matmul peak
            flops = forward_flops(cfg, T) * (3 if kind == "train" else 1)
            row[f"{who}_peak_fraction"] = flops / T * tps / peak["matmul_flops"]
    row["other_load_max"] = max((r["other_load"] for who in runs for r in runs[who] if "other_load" in r), default=0)
    errors = [r["error"] for who in runs for r in runs[who] if "error" in r]
    if errors:
        row["errors"] = errors
    if "ours_tokens_per_s" in row and "transformers_tokens_per_s" in row:
        row["speed_ratio"] = row["ours_tokens_per_s"] / row["transformers_tokens_per_s"]
        row["memory_ratio"] = row["ours_peak_mb"] / row["transformers_peak_mb"]
        for metric in ("speed", "memory"):
            goal = GOALS.get((kind, T, metric), GOALS.get((kind, None, metric)))
            if goal is not None and size != "tiny":
                ratio = row[f"{metric}_ratio"]
                row[f"{metric}_goal"] = goal
                row[f"{metric}_goal_met"] = ratio >= goal if metric == "speed" else ratio <= goal
    row["runs"] = runs
    return row


def table(rows, markdown=False):
    head = ["size", "workload", "ours tok/s", "HF tok/s", "speed x", "ours peak MB", "HF peak MB", "mem x",
            "ours of limit", "HF of limit", "others", "goal"]

    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"

    def limit(r, who):  # the fraction of the machine's limit reached (matmul peak, or copy bandwidth)
        for key, unit in (("peak_fraction", "flops"), ("bandwidth_fraction", "bw")):
            if f"{who}_{key}" in r:
                return f"{100 * r[f'{who}_{key}']:.0f}% {unit}"
        return "-"

    lines = []
    for r in rows:
        goals = [f"{m} {'>=' if m == 'speed' else '<='}{r[m + '_goal']}: {'met' if r[m + '_goal_met'] else 'MISSED'}"
                 for m in ("speed", "memory") if m + "_goal" in r]
        lines.append([r["size"], r["workload"], cell(r, "ours_tokens_per_s", ".1f"),
                      cell(r, "transformers_tokens_per_s", ".1f"), cell(r, "speed_ratio", ".2f"),
                      cell(r, "ours_peak_mb", ".0f"), cell(r, "transformers_peak_mb", ".0f"),
                      cell(r, "memory_ratio", ".2f"), limit(r, "ours"), limit(r, "transformers"),
                      f"{100 * r['other_load_max']:.0f}%",
                      "; ".join(goals) + (" errors!" if "errors" in r else "")])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + lines)


def machine_info(device, threads):
    info = dict(cpu=platform.processor(), cores=os.cpu_count(), threads=threads, torch=torch.__version__,
                python=platform.python_version(), platform=platform.platform(),
                date=time.strftime("%Y-%m-%d %H:%M %Z"), command=" ".join(["python", "bench/bench.py"] + sys.argv[1:]))
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["transformers"] = importlib.metadata.version("transformers")
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        if type(f.default) is bool:
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one measurement given as JSON
    args = p.parse_args(argv)
    return args.worker, BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})


def resolve(cfg):
    """Check the flags; return the sizes and workloads to run."""
    if importlib.util.find_spec("transformers") is None:  # a bench-only dependency
        raise UserError("transformers is not installed: pip install -r requirements-dev.txt")
    if cfg.quick:
        cfg.sizes, cfg.reps, cfg.long_reps, cfg.min_time = "tiny", 1, 1, min(cfg.min_time, 0.2)
        cfg.workloads = cfg.workloads or ",".join(QUICK_WORKLOADS)
    sizes = [s for s in cfg.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            raise UserError(f"unknown size {s!r}: choose from {', '.join(SIZES)}")
    if cfg.checkpointing not in CHECKPOINTING:
        raise UserError(f"--checkpointing must be one of {', '.join(CHECKPOINTING)}, got {cfg.checkpointing!r}")
    if cfg.device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device")
    if cfg.reps < 1 or cfg.long_reps < 1 or cfg.threads < 0 or cfg.decode_tokens < 0:
        raise UserError("--reps and --long-reps must be at least 1, --threads and --decode-tokens not negative")
    workloads = []
    for w in [w for w in cfg.workloads.split(",") if w] or DEFAULT_WORKLOADS:
        if w in KINDS:  # a kind: its default lengths
            workloads += [d for d in DEFAULT_WORKLOADS if d.startswith(w + "-")]
            continue
        try:
            parse_workload(w)
        except ValueError as e:
            raise UserError(str(e))
        workloads.append(w)
    return sizes, workloads


def main(argv=None):
    with one_line_errors():
        return run(argv)


def run(argv):
    worker, cfg = parse_args(argv)
    if worker:  # a measurement subprocess: print one JSON line
        print(json.dumps(work(json.loads(worker))))
        return 0
    sizes, workloads = resolve(cfg)
    threads = cfg.threads or os.cpu_count()
    out = cfg.out or os.path.join(ROOT, "bench", "results", ("quick" if cfg.quick else cfg.device) + ".json")
    base = dict(device=cfg.device, threads=threads, min_time=cfg.min_time, compile=cfg.compile,
                checkpointing=cfg.checkpointing)
    bytes_per_el = 2 if cfg.device == "cuda" else 4
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)

    info = machine_info(cfg.device, threads)
    info["loadavg_start"] = os.getloadavg()[0]
    log(f"{info['cpu']}, {info['cores']} cores, {threads} threads, torch {info['torch']}, "
        f"transformers {info['transformers']}, load average {info['loadavg_start']:.2f}")
    peak_spec = dict(base, task="peak", n=1024 if cfg.quick else 8192 if cfg.device == "cuda" else 4096)
    peaks = [spawn(peak_spec, cfg.wait_idle)]
    if "error" in peaks[0]:
        raise UserError(peaks[0]["error"])

    rows, checks = [], {}
    for size in sizes:
        # 1) the same weights for both, and the same outputs, or nothing is timed
        ckpt = build_checkpoint(size, cfg.cache_dir)
        c = checks[size] = spawn(dict(base, task="check", ckpt=ckpt))
        if "error" in c:
            raise UserError(f"the parity check did not run: {c['error']}")
        log(f"{size}: max |logit diff| {c['max_abs_logit_diff']:.1e} (logits up to {c['logit_scale']:.2f}), "
            f"loss {c['loss_ours']:.6f} vs {c['loss_theirs']:.6f}, greedy tokens equal: {c['greedy_equal']}")
        if not (c["max_abs_logit_diff"] <= 1e-4 * max(1.0, c["logit_scale"]) and c["greedy_equal"]
                and abs(c["loss_ours"] - c["loss_theirs"]) <= 1e-4):
            raise UserError(f"{size}: ours and transformers give different outputs; refusing to time different computations")
        # 2) every workload, alternating ours and theirs, reps times
        n_new = cfg.decode_tokens or (64 if size == "135m" else 128)
        for w in workloads:
            runs, reps, rep = {"ours": [], "transformers": []}, cfg.reps, 0
            while rep < reps:  # alternate who goes first, so a drift in the machine hits both
                start = time.time()
                for impl in ("ours", "transformers") if rep % 2 == 0 else ("transformers", "ours"):
                    spec = dict(base, task="run", impl=impl, ckpt=ckpt, workload=w, decode_tokens=n_new)
                    res = spawn(spec, cfg.wait_idle)
                    for _ in range(2 if cfg.wait_idle else 0):  # disturbed by other processes: once more
                        if res.get("other_load", 0) <= 0.1:
                            break
                        log(f"{size} {w} {impl}: other processes took {100 * res['other_load']:.0f}% of the "
                            "CPU, measuring again")
                        res = spawn(spec, cfg.wait_idle)
                    runs[impl].append(res)
                    log(f"{size} {w} {rep + 1}/{reps} {impl}: " + (res["error"] if "error" in res else
                        f"{res['tokens_per_s']:.1f} tok/s, peak {res['peak_mb']:.0f} MB"
                        + (f" (other processes used {100 * res['other_load']:.0f}% of the CPU)"
                           if res["other_load"] > 0.05 else "")))
                if rep == 0 and time.time() - start > cfg.long_run:
                    reps = min(reps, cfg.long_reps)  # a long run averages over its own length already
                rep += 1
            rows.append((size, w, runs))

    # 3) the machine's limits again at the end (the best of both is the peak), then the table
    if not cfg.quick:
        peaks.append(spawn(peak_spec, cfg.wait_idle))
    peak = {k: max(p[k] for p in peaks if "error" not in p) for k in ("matmul_flops", "copy_bytes_per_s")}
    log(f"machine peak: {peak['matmul_flops'] / 1e9:.0f} GFLOP/s matmul, {peak['copy_bytes_per_s'] / 1e9:.1f} GB/s copy")
    summary = [summarise(size, w, runs, peak, bytes_per_el) for size, w, runs in rows]
    info.update(loadavg_end=os.getloadavg()[0], seconds=round(time.time() - t0))
    print("\n" + table(summary))
    with new_file(out) as f:
        json.dump(dict(machine=info, config=asdict(cfg), peak=dict(peak, runs=peaks), checks=checks,
                       models={s: dict(SIZES[s], rope=ROPES.get(s, ROPE), params=num_params(s)) for s in sizes},
                       results=summary), f, indent=1)
    with new_file(os.path.splitext(out)[0] + ".md") as f:
        f.write(table(summary, markdown=True) + "\n")
    log(f"wrote {out} and its .md table")
    return 1 if any("errors" in r for r in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
