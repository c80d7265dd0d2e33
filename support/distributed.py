"""
Who this process is in a training job, and the process group's start and end: what train.py needs of
torch.distributed beyond FSDP2 itself. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain
`python train.py` is rank 0 of 1.

    env = environment("auto", "auto")      # rank, world, device (cuda:LOCAL_RANK or cpu), bf16, fsdp
    start(env, cleanup)                    # the process group: nccl on CUDA, gloo on CPU
    ...
    finish()                               # every rank waits for the others, then the group is destroyed
    # and the command's last line: run_and_exit(main), for the reason in its docstring
"""

import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Env:
    rank: int
    local_rank: int
    world: int
    device: torch.device
    bf16: bool     # the compute dtype: bf16 (with fp32 master weights), else fp32
    fsdp: bool     # FSDP2 under torchrun, and on CUDA always: one GPU takes the path of eight

    @property
    def master(self):
        return self.rank == 0


def environment(device="auto", dtype="auto"):
    """This process's place in the job, from torchrun's variables and the --device/--dtype flags."""
    rank, local_rank, world = (int(os.environ.get(k, "0")) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    index = int(device[5:]) if device[5:].isdigit() else local_rank  # cuda:N: one process on GPU N
    dev = torch.device("cuda", index) if cuda else torch.device("cpu")
    bf16 = dtype == "bf16" or (dtype == "auto" and cuda)
    return Env(rank, local_rank, max(world, 1), dev, bf16, fsdp="WORLD_SIZE" in os.environ or cuda)


def start(env, cleanup):
    """Join the process group (torchrun's environment says where the others are; one plain process is a
    group of one). A group made here for a single process is left by `cleanup`, so main() can run again."""
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if not env.fsdp:
        return
    alone = {} if "WORLD_SIZE" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo",
                            device_id=env.device if env.device.type == "cuda" else None, **alone)
    if alone:
        cleanup.callback(leave)



def barrier():
    if dist.is_initialized():
        dist.barrier()


def leave():
    if dist.is_initialized():
        dist.destroy_process_group()


def finish():
    """No rank leaves while another still writes or communicates; then the group is destroyed."""
    barrier()
    leave()


def broadcast_flag(flag, env):
    """Rank 0's boolean, on every rank."""
    t = torch.tensor([float(flag)], device=env.device if env.world > 1 else "cpu")
    if env.world > 1:
        dist.broadcast(t, 0)
    return bool(t.item())


def any_rank(flags, env):
    """[flag or the same flag of any other rank, ...]: a decision all ranks take together (they must: one
    rank saving while another trains would wait forever in their collectives)."""
    if env.world == 1:
        return [bool(f) for f in flags]
    # reading it waits for the step's kernels, as reading the step's loss (progress.py) does anyway
    t = torch.tensor([float(f) for f in flags], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class StopRequest:
    """SIGTERM, which Slurm, Kubernetes and torchrun send before they kill a job (torchrun forwards it to
    every worker, and again if it gets it again), asks for a stop: `requested` becomes true, and the loop
    finishes its step, writes a resumable checkpoint and exits. Restores the old handler via `cleanup`."""

    def __init__(self, cleanup):
        self.requested = False
        cleanup.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, self._request))

    def _request(self, signum, frame):
        self.requested = True


def run_and_exit(main, argv=None):
    """main(argv), then leave the process without tearing down the interpreter when it used a process
    group (under torchrun, or FSDP's group of one on a GPU).

    Why: gloo runs each collective on a C++ worker thread, and that thread drops its reference to the
    collective's tensors a moment *after* the rank waiting on it has moved on. Freeing a tensor that
    Python knows needs the GIL; an interpreter that is shutting down answers by ending the thread
    (pthread_exit), which unwinds through a C++ noexcept frame: std::terminate, SIGABRT, after all the
    work was done. destroy_process_group() cannot join those threads, since DTensor's caches keep the
    device mesh, and with it the process group, alive until the very end. So once our files are
    written and closed, each rank of a torchrun job flushes its output and ends with os._exit: the
    threads end with the process, and no interpreter shutdown runs beside them."""
    distributed = "WORLD_SIZE" in os.environ or torch.cuda.is_available()  # when main() may make a process group
    code = 0
    try:
        main(argv)  # a user error or Ctrl-C is a SystemExit with code 2 or 130 (one_line_errors)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not distributed:
            raise
    if distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
