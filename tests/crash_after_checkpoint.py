"""
train.py with a crash: rank 0 kills itself with SIGKILL right after saving the checkpoint of step N,
for the resume tests of tests/test_train.py. Otherwise exactly train.py (run_and_exit included).

    torchrun --nproc_per_node 2 tests/crash_after_checkpoint.py 3 --init ... --save-every 3
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

crash_after, save_state = int(sys.argv[1]), train.save_state


def save_then_crash(model, optimizer, tc, step, rank, world, master):
    save_state(model, optimizer, tc, step, rank, world, master)
    if master and step == crash_after:
        os.kill(os.getpid(), signal.SIGKILL)


train.save_state = save_then_crash
train.run_and_exit(sys.argv[2:])
