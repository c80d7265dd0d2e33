"""
What a training run says while it runs: one JSON line per step in out/metrics.jsonl (loss, lr, gradient
norm, tokens/s, peak memory, MFU on CUDA), the progress bar, and the speed summary at the end; and the
one check that needs the step's numbers: a loss or gradient norm that is not finite ends the run.

    progress = Progress(tc, env, start, flops_per_token, peak)
    t0 = progress.mark()
    ...                                      # the step's kernels are queued
    progress.step(step + 1, loss, norm, lr, t0)
    log = progress.flush()                   # before evaluating or saving: every step so far is logged
    progress.write(log)
    progress.close()

A step's numbers are read one step late, so that reading them (which waits for the GPU) waits only for
work already done while the next step's kernels are queued: the GPU never runs dry.
"""

import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from support.common import UserError

try:
    import resource  # Unix only: peak memory on CPU
except ImportError:
    resource = None

METRICS = "metrics.jsonl"  # one JSON line per step, in --out


class Progress:
    def __init__(self, tc, env, start, flops_per_token, peak):
        self.out, self.env, self.steps = tc.out, env, tc.steps
        self.meter = StepMeter(tc.batch_size * tc.seq_len, env.device, env.world, flops_per_token, peak)
        self.meter.compiled = tc.compile  # the first step's time then includes compilation
        # in a terminal a bar; in a batch job's log (no terminal) a plain line every --log-every steps or
        # --log-seconds, whichever comes first: step, loss, speed, MFU, elapsed time and ETA
        self.plain = env.master and not sys.stderr.isatty()
        self.bar = tqdm(total=tc.steps, initial=start, disable=not env.master or self.plain, unit="step",
                        dynamic_ncols=True)
        self.every, self.seconds = tc.log_every, tc.log_seconds
        self.start, self.t0 = start, time.monotonic()
        self.last_step, self.last_time = start, self.t0
        self.first_done = None  # when the first step (warm-up, compilation) was logged: the ETA counts from there
        self.pending = None  # the last step's metrics, still device tensors

    def mark(self):
        return self.meter.mark()

    def step(self, step, loss, norm, lr, t0):
        """Step `step` is queued: log the one before it, and keep this one's tensors for later."""
        marks = (t0, self.meter.mark())
        if self.pending:
            self.write(self.read(self.pending))
        self.pending = dict(step=step, loss=loss, grad_norm=norm, lr=lr, marks=marks)

    def flush(self):
        """The last step's log line, read now (not yet written: an evaluation may add to it)."""
        log, self.pending = self.read(self.pending), None
        return log

    def read(self, m):
        """A step's numbers, read; a step that diverged ends the run (a checkpoint is only saved after its
        step was read: never one with NaN weights)."""
        log = self.meter.read(m)
        if not (math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"])):  # every rank sees the same values
            self.bar.close()
            raise UserError(f"step {log['step']}: loss {log['loss']}, gradient norm {log['grad_norm']}: training "
                            f"diverged (lower --lr?); nothing exported, checkpoints in {self.out} are kept")
        return log

    def write(self, log):
        if self.env.master:
            with open(os.path.join(self.out, METRICS), "a") as f:
                f.write(json.dumps(log) + "\n")
            self.bar.set_postfix({k: f"{log[k]:.4g}" for k in ("loss", "lr", "tokens_per_s", "mfu") if k in log})
            self.bar.update()
            if self.plain:
                self.line(log)

    def line(self, log):
        now, step = time.monotonic(), log["step"]
        self.first_done = self.first_done or now  # the first step's line: warm-up (and compilation) are behind
        if step - self.last_step < self.every and now - self.last_time < self.seconds and step != self.steps:
            return
        elapsed = now - self.t0
        done = step - self.start - 1  # steps since the first one
        eta = ((now - self.first_done) / done if done > 0 else elapsed) * (self.steps - step)
        mfu = f"  MFU {log['mfu']:.1%}" if "mfu" in log else ""
        print(f"step {step}/{self.steps}  loss {log['loss']:.4f}  {log['tokens_per_s']:,.0f} tokens/s{mfu}  "
              f"elapsed {clock(elapsed)}  ETA {clock(eta)}", file=sys.stderr, flush=True)
        self.last_step, self.last_time = step, now

    def close(self):
        self.bar.close()
        if self.env.master and self.meter.steps:
            print(self.meter.summary(), file=sys.stderr)


def clock(seconds):
    """h:mm:ss"""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepMeter:
    """Times the steps and turns a step's device tensors into a log line (loss and gradient norm read in
    one transfer, speed, memory), without making the host wait for the GPU: a step's time is measured on
    the GPU itself, by CUDA events at its start and end (on a CPU, the clock). The first step of a
    process (compilation, warm-up) is kept out of the summary's speed."""

    def __init__(self, tokens_per_step, device, world, flops_per_token, peak_flops):
        self.tokens, self.device, self.world = tokens_per_step, device, world
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.cuda = device.type == "cuda"
        self.first, self.steps, self.seconds = None, 0, 0.0  # after the first step: how many, how long
        self.compiled = False

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def read(self, m):
        loss, norm = torch.stack([m["loss"].float(), m["grad_norm"].float().to(m["loss"].device)]).tolist()
        start, end = m["marks"]
        dt = start.elapsed_time(end) / 1000 if self.cuda else end - start
        tokens_per_s = self.tokens / dt
        log = {"step": m["step"], "loss": loss, "lr": m["lr"], "grad_norm": norm,
               "tokens_per_s": round(tokens_per_s, 1), "time_s": round(dt, 4)}
        if self.first is None:
            self.first = log["first_step_s"] = round(dt, 4)  # compilation and warm-up included
        else:
            self.steps, self.seconds = self.steps + 1, self.seconds + dt
        if self.cuda:
            log["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            if self.peak:
                log["mfu"] = round(tokens_per_s / self.world * self.flops_per_token / self.peak, 4)
        elif resource:  # the whole process's peak resident memory, in KiB on Linux
            log["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        return log

    def summary(self):
        tokens_per_s = self.tokens * self.steps / self.seconds
        mfu = f", MFU {tokens_per_s / self.world * self.flops_per_token / self.peak:.1%}" if self.peak else ""
        return (f"{tokens_per_s:.1f} tokens/s{mfu} over the last {self.steps} steps; the first step took "
                f"{self.first:.2f}s ({'warm-up and compilation' if self.compiled else 'warm-up'})")
