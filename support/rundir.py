"""
train.py's run directory, --out, and everything that guards it: which directories may be used (new,
empty, or an earlier run's), one run at a time (a lock), the resumable checkpoints under
out/checkpoints/step-N (written by every rank, resumed on any number of ranks), and the publishing of
the final Hugging Face checkpoint into out beside them.

    out/config.json, model*.safetensors, tokenizer files   the export (publish_export), what sample.py loads
    out/metrics.jsonl                                      one line per step (progress.py)
    out/checkpoints/step-000100/rank-R-of-W.safetensors    each rank's shards of the model and AdamW state
    out/checkpoints/step-000100/train_state.json           step, every rank's RNG, the run's flags
    out/.lock                                              held while a run uses out (flock)

Checkpoints hold only data: safetensors and JSON. torch.distributed.checkpoint would do the sharding
for us, but its metadata is a pickle, and loading a pickle can run code.
"""

import base64
import errno
import json
import os
import re
import shutil
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from support import distributed
from support.checkpoint import CHECKPOINT_FILE, CheckpointError
from support.common import UserError
from support.jsonfile import read_json
from support.progress import METRICS
from support.publish import move_into, new_file, publish_dir, remove_dir, save_tensors, stage_dir, write_json

EXPORT = ".export"  # the export, complete, before publish_export moves it into out
STEP_DIR = re.compile(r"step-\d{6,}")  # what save_state names them, and nothing else


# ---- which --out, and one run at a time ---------------------------------------------------------------

def check_out(tc):
    """--out is new, empty, or the directory of an earlier train.py run (it has metrics.jsonl): nothing
    else of the user's is ever overwritten or deleted there."""
    out = tc.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory")
    if os.path.isdir(out):
        names = [n for n in os.listdir(out) if n not in (".lock", EXPORT)]  # ours, hidden
        if names and METRICS not in names:
            raise UserError(f"--out {out} is not empty and not the output of a train.py run (no {METRICS}): "
                            "pick a new or empty directory")
        if tc.init != "scratch" and os.path.isdir(tc.init) and os.path.samefile(tc.init, out):
            raise UserError("--out must not be the --init checkpoint")
    finished = os.path.isfile(os.path.join(out, "config.json"))
    if tc.resume is False and checkpoints(out):
        raise UserError(f"{out} holds checkpoints of an earlier run: add --resume, or pick another --out")
    if not tc.resume and finished and not tc.overwrite:
        raise UserError(f"--out {out} holds a finished run (its export): starting over would replace it; pick another "
                        "--out, or add --overwrite to replace it")
    if tc.resume and not checkpoints(out) and finished:
        raise UserError(f"--resume: nothing to resume in {out}, which holds a finished run (its export, and no "
                        "checkpoints): pick another --out, or give --overwrite instead of --resume to replace it")


def claim(tc, env, cleanup):
    """Rank 0 locks --out (let go by `cleanup`), every rank learns whether the lock was had (the process
    group is up: train.py starts it), and an export that an earlier run left half-published is finished."""
    lock = None
    if env.master:
        os.makedirs(tc.out, exist_ok=True)
        lock = lock_out(tc.out)
        if lock:
            cleanup.callback(lock.close)
    if not distributed.broadcast_flag(lock is not None, env):
        raise UserError(f"another train.py is running with --out {tc.out} (it holds {tc.out}/.lock): wait for it, "
                        "or pick another --out")
    if env.master and os.path.isdir(os.path.join(tc.out, EXPORT)):
        publish_export(tc.out)
        print(f"note: finished publishing the checkpoint that an earlier run left in {tc.out}/{EXPORT}",
              file=sys.stderr)
    cleanup.push(lambda kind, e, tb: full_disk(tc.out, e))


def full_disk(out, e):
    """A full disk (or quota) anywhere in the run, after --out is claimed: one line that says where the last
    good checkpoint is, instead of the bare error (one_line_errors'). Anything else passes through."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise UserError(f"cannot write {e.filename or 'in ' + out}: {e.strerror}; {kept(out)}") from None


def left_behind(out):
    """The end of a finished run's last line: the resumable checkpoint it leaves (the size of the weights and
    AdamW state), and what it is for; "" when there is none."""
    found = checkpoints(out)
    if not found:
        return ""
    size = sum(os.path.getsize(os.path.join(found[-1], n)) for n in os.listdir(found[-1]))
    return (f"; the resumable checkpoint {found[-1]} stays ({size / 2**30:.3g} GiB): --resume with more --steps "
            "continues from it, or delete it")


def kept(out):
    """What a run that failed leaves to continue from, in words: the last good checkpoint, or none."""
    found = checkpoints(out)
    if not found:
        return "no resumable checkpoint was written"
    return (f"the last good checkpoint is {found[-1]}: after freeing space, the same command with --resume "
            f"continues from step {int(os.path.basename(found[-1])[5:])}")


def lock_out(out):
    """One run per --out: an exclusive lock on out/.lock, held until the process ends (the kernel drops
    it even after SIGKILL). Returns the open file, or None if another run holds the lock."""
    import fcntl
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def publish_export(out):
    """Move the complete checkpoint of out/.export into out (publish.move_into), config.json last, so out
    holds a config.json only beside the weights it describes. config.json goes first: weights of an
    earlier export that the new one does not overwrite (another sharding) are removed; nothing else is."""
    staged = os.path.join(out, EXPORT)
    new = set(os.listdir(staged))
    if os.path.exists(os.path.join(out, "config.json")):
        os.remove(os.path.join(out, "config.json"))
    for name in os.listdir(out):
        if CHECKPOINT_FILE.fullmatch(name) and name not in new:
            os.remove(os.path.join(out, name))
    move_into(staged, out, last="config.json")


# ---- resumable state --------------------------------------------------------------------------------

def checkpoints(out):
    folder = os.path.join(out, "checkpoints")
    names = sorted((n for n in os.listdir(folder) if STEP_DIR.fullmatch(n)), key=lambda n: int(n[5:])) \
        if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names]


def resume(model, optimizer, tc, env):
    """The step to start from: with --resume, that of the last checkpoint, whose state is loaded; else 0.
    metrics.jsonl keeps the steps that the restored state has seen, and drops the lost ones."""
    start = 0
    if tc.resume and checkpoints(tc.out):
        start = load_state(model, optimizer, tc, checkpoints(tc.out)[-1], env)
    log_path = os.path.join(tc.out, METRICS)
    if env.master:
        lines = open(log_path).read().splitlines() if start and os.path.exists(log_path) else []
        with new_file(log_path) as f:
            f.writelines(line + "\n" for line in lines if logged_step(line) <= start)
    return start


def logged_step(line):
    """The step of a metrics.jsonl line; a line cut short by a crash counts as after every step."""
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return float("inf")


def check_resume(tc):
    """--resume's checkpoint, before anything is allocated: its train_state.json against this run's flags,
    and every rank's file readable. (load_state reads the tensors themselves later.)"""
    if not (tc.resume and checkpoints(tc.out)):
        return
    from safetensors import safe_open
    path = checkpoints(tc.out)[-1]
    state = read_train_state(path, tc)
    for r in range(state["world"]):
        try:
            with safe_open(os.path.join(path, f"rank-{r:05d}-of-{state['world']:05d}.safetensors"), framework="pt"):
                pass
        except Exception as e:  # missing, or damaged: safetensors has its own error types
            raise CheckpointError(f"--resume: cannot read the checkpoint {path}: {str(e).splitlines()[0]}") from None


def local(t):
    """This rank's part of a tensor: its shard of a DTensor (FSDP2 splits dim 0), or all of a plain one."""
    return (t.to_local() if isinstance(t, DTensor) else t).detach().to("cpu").contiguous()


def state_tensors(model, optimizer):
    """Every tensor of the training state under one flat name, as the model and optimizer hold it now:
    model/<weight> and optim/<weight>/<exp_avg|exp_avg_sq|step>. A tied head is the embedding: once."""
    model_state, optim_state = get_state_dict(model, optimizer)  # creates AdamW's state if it has none yet
    tensors = {f"model/{k}": v for k, v in model_state.items()
               if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    for name, st in optim_state["state"].items():
        tensors.update({f"optim/{name}/{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return tensors, model_state, optim_state


def save_state(model, optimizer, tc, step, env):
    """The resumable state: each rank writes its shards of the model and optimizer to
    rank-R-of-W.safetensors, rank 0 the step (which is the data position and the schedule), the RNG of
    every rank and the run's flags to train_state.json. All of it into a staging directory that is renamed
    to checkpoints/step-N once complete (publish.py); the older ones go after."""
    folder = os.path.join(tc.out, "checkpoints")
    tmp, final = os.path.join(folder, f".step-{step:06d}.tmp"), os.path.join(folder, f"step-{step:06d}")
    if env.master:
        stage_dir(tmp)
    distributed.barrier()
    tensors, _, _ = state_tensors(model, optimizer)
    try:
        save_tensors({k: local(v) for k, v in tensors.items()},
                     os.path.join(tmp, f"rank-{env.rank:05d}-of-{env.world:05d}.safetensors"))
    except OSError:  # a full disk: the half-written staging directory goes, the last good checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rngs = gather_rng(env)
    distributed.barrier()  # every rank's file is written
    if env.master:
        sharded = sorted(k for k, v in tensors.items() if isinstance(v, DTensor))
        write_json(os.path.join(tmp, "train_state.json"), {"step": step, "samples": step * tc.batch_size,
                                                           "world": env.world, "sharded": sharded, "rng": rngs,
                                                           "config": asdict(tc)})
        old = [p for p in checkpoints(tc.out) if os.path.basename(p) != os.path.basename(final)]
        publish_dir(tmp, final)
        for path in old:
            remove_dir(path)
    distributed.barrier()


def gather_rng(env):
    """Every rank's random state (CPU, and CUDA if any), as base64 text, on rank 0."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rng = {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in rng.items()}
    rngs = [rng] if env.world == 1 else [None] * env.world
    if env.world > 1:
        dist.all_gather_object(rngs, rng)
    return rngs


RESUME_MUST_MATCH = ("init", "data", "seq_len", "batch_size", "rope", "rope_factor", "original_ctx", "seed", "lr",
                     "lr_schedule", "warmup", "weight_decay")
# a scratch model's shape and RoPE come from flags too: the same weight shapes can be another model (4 heads of
# 16 dims or 2 of 32), so every one of them must be the run's
SCRATCH_MUST_MATCH = ("n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size", "rope_theta")


def load_state(model, optimizer, tc, path, env):
    """Read a checkpoint of save_state into this run, whatever its world size: each tensor is put
    together from the shards of every rank that wrote it (dim 0, in rank order), and this rank keeps its
    own part. Raises CheckpointError (one line) for anything that does not fit."""
    state = read_train_state(path, tc)
    tensors, model_state, optim_state = state_tensors(model, optimizer)
    fill_state(tensors, path, state["world"], state["sharded"])
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    if state["world"] == env.world:  # the same ranks: the same random streams
        try:
            rng = {k: torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8)
                   for k, v in state["rng"][env.rank].items()}
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        except Exception as e:
            raise CheckpointError(f"--resume: bad RNG state in {path}/train_state.json ({e})") from None
    return state["step"]


def read_train_state(path, tc):
    """train_state.json of a checkpoint, checked, and checked against this run's flags."""
    try:
        state = read_json(os.path.join(path, "train_state.json"), {"config": (dict,), "sharded": (list,),
                                                                   "rng": (list,)})
        step, old_world, config = state["step"], state["world"], state["config"]
        state["sharded"] = set(state["sharded"])
        if not (isinstance(step, int) and isinstance(old_world, int) and step >= 0 and old_world >= 1):
            raise ValueError("step and world must be non-negative integers")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--resume: unreadable {path}/train_state.json ({e})") from None
    for key in RESUME_MUST_MATCH + (SCRATCH_MUST_MATCH if tc.init == "scratch" else ()):
        if config.get(key) != getattr(tc, key):
            raise CheckpointError(f"--resume: --{key.replace('_', '-')} was {config.get(key)} in {path}, "
                                  f"now {getattr(tc, key)}")
    return state


def fill_state(tensors, path, old_world, sharded):
    """Copy each tensor of the checkpoint at `path`, put together from the shards of its `old_world`
    ranks, into this rank's part of `tensors` (state_tensors' names)."""
    from safetensors import safe_open
    files = [os.path.join(path, f"rank-{r:05d}-of-{old_world:05d}.safetensors") for r in range(old_world)]
    try:
        opened = [safe_open(f, framework="pt", device="cpu") for f in files]
        for name, dst in tensors.items():
            parts = [f.get_tensor(name) for f in (opened if name in sharded else opened[:1])]
            full = torch.cat(parts) if len(parts) > 1 else parts[0]
            if full.shape != dst.shape:
                raise CheckpointError(f"--resume: {name} has shape {tuple(full.shape)} in {path}, this model "
                                      f"{tuple(dst.shape)}: a checkpoint of another model")
            with torch.no_grad():
                if isinstance(dst, DTensor):
                    dst.to_local().copy_(distribute_tensor(full, dst.device_mesh, dst.placements,
                                                           src_data_rank=None).to_local())
                else:
                    dst.copy_(full)
    except CheckpointError:
        raise
    except Exception as e:  # a missing or damaged file, a missing tensor: safetensors has its own error types
        raise CheckpointError(f"--resume: cannot read the checkpoint {path}: {str(e).splitlines()[0]}") from None
