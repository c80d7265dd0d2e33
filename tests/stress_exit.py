"""
Repeat the 2-process fine-tune of tests/test_train.py many times and count the runs that did not exit 0.

A finished torchrun job used to die now and then at exit with SIGABRT ("terminate called without an
active exception", issue #13; see distributed.run_and_exit for the cause). One run in a dozen or so failed, so
a single test run proves nothing either way: this script is the proof, too slow for the suite (~7 s a run
on 2 cores).

    python tests/stress_exit.py --runs 50          # prints the count, exits 1 if any run failed
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.prepare import main as prepare_data  # noqa: E402
from tests.helpers import FINETUNE, tiny_checkpoint, write_verse  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs of failed runs)")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="stress-exit-")
    write_verse(os.path.join(work, "corpus"), 8, 200)  # the corpus of tests/test_train.py
    data, ckpt = os.path.join(work, "data"), os.path.join(work, "ckpt")
    prepare_data(["--input", os.path.join(work, "corpus"), "--out", data, "--train-tokenizer", "320",
                  "--val-fraction", "0.25"])
    tiny_checkpoint(ckpt, 320, os.path.join(data, "tokenizer.model"))

    failed, t0 = [], time.time()
    for i in range(args.runs):
        out = os.path.join(work, f"out{i}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(ROOT, "train.py"), "--init", ckpt, "--data", data, "--out", out,
               *FINETUNE, "--save-every", "3", "--activation-checkpointing", "full"]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           cwd=work, timeout=600)
        status = "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})"
        print(f"run {i + 1}/{args.runs}: {status}", flush=True)
        if r.returncode != 0:
            failed.append(i + 1)
            with open(os.path.join(work, f"run{i + 1}.log"), "w") as f:
                f.write(r.stdout + r.stderr)
            print("\n".join(r.stderr.splitlines()[-8:]), flush=True)
    print(f"{args.runs} runs in {time.time() - t0:.0f} s: {args.runs - len(failed)} exited 0, "
          f"{len(failed)} failed{' (runs ' + ', '.join(map(str, failed)) + ')' if failed else ''}")
    if args.keep or failed:
        print(f"work directory: {work}")
    else:
        import shutil
        shutil.rmtree(work)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
