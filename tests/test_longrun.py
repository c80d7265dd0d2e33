"""
Tests of what a multi-day job needs from train.py, on CPU: SIGTERM (what Slurm, Kubernetes and torchrun
send before they kill) finishes the step, writes a resumable checkpoint and exits, and the same command
with --resume ends with the weights of a run never stopped (torch.equal), in one process and under
torchrun with two; --save-every in minutes; plain progress lines when stderr is not a terminal.

    python -m pytest tests/test_longrun.py -q
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import rundir  # noqa: E402
from tests.helpers import free_port, run_train  # noqa: E402

LONG = ["--yarn-scale", "2", "--steps", "24", "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--save-every", "0"]


def launch(args, nproc=None):
    """train.py started in the background (under torchrun with nproc CPU processes), as a job scheduler
    starts it: its own process group, output to files."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port())] if nproc else [sys.executable]) + [os.path.join(ROOT, "train.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def steps_logged(out):
    try:
        with open(out / "metrics.jsonl") as f:
            return len(f.read().splitlines())
    except FileNotFoundError:
        return 0


def uninterrupted(work, nproc):
    """The same run never stopped, on as many processes (one and two differ in the last bits)."""
    out = work / f"long-ref-{nproc}"
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", out, *LONG], nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("nproc", [None, 2])
def test_sigterm_checkpoints_and_resume_is_exact(work, nproc):
    out = work / f"long-sigterm-{nproc}"
    args = ["--init", work / "ckpt", "--data", work / "data", "--out", out, *LONG]
    job = launch(args, nproc)
    deadline = time.monotonic() + 120
    while steps_logged(out) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)  # to train.py, or to torchrun, which forwards it to both workers
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == (143 if nproc is None else 1), stderr[-3000:]  # torchrun exits 1 after a signal
    assert "stopped by SIGTERM after step" in stderr and "Traceback" not in stderr.split("stopped by")[0], stderr
    stopped = int(stderr.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert 3 <= stopped <= 24 and rundir.checkpoints(str(out))[-1].endswith(f"step-{stopped:06d}")
    assert not (out / "config.json").exists()  # not finished: nothing exported
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, stopped + 1))

    r = run_train(args + ["--resume"], nproc=nproc)
    assert r.returncode == 0 and f"resuming at step {stopped}" in r.stderr, r.stderr[-3000:]
    ref = uninterrupted(work, nproc)
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(out / "metrics.jsonl") as f, open(ref / "metrics.jsonl") as g:
        ours, ref = [json.loads(line) for line in f], [json.loads(line) for line in g]
    assert [r["loss"] for r in ours] == [r["loss"] for r in ref]


def test_save_every_minutes(work):
    out = work / "long-minutes"
    args = ["--init", work / "ckpt", "--data", work / "data", "--out", out, *LONG[:-2], "--steps", "4",
            "--save-every", "0.0001m"]  # 6 ms: due after every step
    r = run_train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [os.path.basename(p) for p in rundir.checkpoints(str(out))] == ["step-000004"]  # the older ones went
    with open(os.path.join(rundir.checkpoints(str(out))[-1], "train_state.json")) as f:
        assert json.load(f)["config"]["save_every"] == "0.0001m"
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", work / "long-hours", *LONG[:-2],
                   "--steps", "2", "--save-every", "2h"])
    assert r.returncode == 0 and not rundir.checkpoints(str(work / "long-hours"))  # not due in two hours


def test_plain_progress_lines_without_a_terminal(work):
    out = work / "long-lines"
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", out, *LONG[:-4], "--steps", "25",
                   "--save-every", "0", "--log-every", "10", "--log-seconds", "1000"])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["10/25", "20/25", "25/25"], r.stderr
    words = lines[0].split()
    assert words[2] == "loss" and float(words[3]) > 0 and words[5] == "tokens/s"
    assert words[-4] == "elapsed" and words[-2] == "ETA" and words[-1].count(":") == 2
    assert "\r" not in r.stderr  # no progress bar in a log file
    # --log-seconds 0: every step
    r = run_train(["--init", work / "ckpt", "--data", work / "data", "--out", work / "long-lines-0", *LONG[:-4],
                   "--steps", "3", "--save-every", "0", "--log-seconds", "0"])
    assert [line.split()[1] for line in r.stderr.splitlines() if line.startswith("step ")] == ["1/3", "2/3", "3/3"]
