"""
train.py with a crash: rank 0 kills itself with SIGKILL right after saving the checkpoint of step N,
for the resume tests of tests/test_train.py. Otherwise exactly train.py (distributed.run_and_exit included).

    torchrun --nproc_per_node 2 tests/crash_after_checkpoint.py 3 --init ... --save-every 3
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import distributed  # noqa: E402
from support import rundir  # noqa: E402
import train  # noqa: E402

crash_after, save_state = int(sys.argv[1]), rundir.save_state


def save_then_crash(model, optimizer, tc, step, env):
    save_state(model, optimizer, tc, step, env)
    if env.master and step == crash_after:
        os.kill(os.getpid(), signal.SIGKILL)


rundir.save_state = save_then_crash
distributed.run_and_exit(train.main, sys.argv[2:])
