"""
Hugging Face checkpoints on disk: config.json, and the weights as safetensors (one file, or shards
listed in model.safetensors.index.json). Read it after model.py: it teaches what a checkpoint is made
of, and how to read one safely (no pickles, every tensor checked) and write one that a crash never
leaves half-written.

    hf = read_config(path)                                  # the config.json dict
    for name, t in read_tensors(path, expected_shapes):     # one tensor at a time, checked
        ...
    save(path, state, config_json)                          # written aside, then renamed into place

Both Llama.from_pretrained and train.py's sharded loading read weights through read_tensors: one
stream, one set of checks and messages. Every problem is a CheckpointError, one line for the user.
"""

import contextlib
import ctypes
import json
import os
import re
import shutil
import tempfile

import torch

from common import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint directory we cannot load; the message is one line meant for the user."""


# ---- reading ---------------------------------------------------------------------------------------------

def read_config(path):
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not os.path.isfile(file):
        raise CheckpointError(f"no config.json in {path}")
    try:
        with open(file) as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt config.json in {path}: {e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"corrupt config.json in {path}: not a JSON object")
    return hf


def weight_files(path):
    """The safetensors files of a checkpoint. Pickled weights (pytorch_model.bin, *.pt) are refused:
    unpickling runs arbitrary code from the file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = list(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"corrupt {index}: {e}") from None
        for n in names:  # a shard is a file of this directory: no "../", no absolute path, no sub-folder
            if not isinstance(n, str) or os.path.basename(n) != n or n in (".", "..") or not n.endswith(".safetensors"):
                raise CheckpointError(f"{index}: {n!r} is not a .safetensors file name of this directory")
        names = sorted(set(names))
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise CheckpointError(f"shard {missing[0]} listed in model.safetensors.index.json is missing")
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    pickles = [n for n in sorted(os.listdir(path)) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(f"{path} holds only pickle weights ({pickles[0]}); refusing to unpickle "
                              "(it can run arbitrary code): convert the checkpoint to safetensors first")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def read_tensors(path, expected, tied=False, device="cpu", headers_only=False):
    """(name, tensor) for every weight of the checkpoint at `path`, one at a time from the memory-mapped
    files, each checked against `expected` ({name: shape}, what config.json implies): no unknown name, no
    other shape, no NaN, none missing. tied: the head is the embedding; a checkpoint may still hold it.
    headers_only: check the names and shapes from the safetensors headers alone, yield nothing: a wrong
    shape (or a vocabulary too large to allocate) is found before any memory is."""
    from safetensors import safe_open
    config = os.path.join(path, "config.json")
    needed = {n for n in expected if not (tied and n == "lm_head.weight")}
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                        continue  # a buffer old checkpoints saved; a tied head saved anyway
                    if name not in expected:
                        raise CheckpointError(f"{os.path.basename(file)}: unexpected tensor {name!r} "
                                              f"(not a Llama weight: wrong architecture?)")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[name]):
                        raise CheckpointError(f"{file}: {name} has shape {shape}, {config} implies "
                                              f"{tuple(expected[name])}")
                    needed.discard(name)
                    if headers_only:
                        continue
                    t = f.get_tensor(name)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise CheckpointError(f"{os.path.basename(file)}: {name} holds NaN or infinite values "
                                              "(a diverged or damaged checkpoint)")
                    yield name, t
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"cannot read {file}: {str(e).splitlines()[0]}") from None
    if needed:
        missing = sorted(needed)
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensors: {', '.join(missing[:3])}{more}")


def check_tensors(path, expected, tied=False):
    """read_tensors' checks from the headers alone, before anything is allocated."""
    for _ in read_tensors(path, expected, tied, headers_only=True):
        pass


# ---- writing ---------------------------------------------------------------------------------------------

CHECKPOINT_FILE = re.compile(r"config\.json|generation_config\.json|model\.safetensors(\.index\.json)?"
                             r"|model-\d{5}-of-\d{5}\.safetensors")


def save(path, state, config_json, max_shard_bytes=5 * 2**30, extra_files=()):
    """Write config.json and the tensors of `state` as safetensors ({"format": "pt"} metadata), sharded
    above max_shard_bytes, and copies of `extra_files` (a tokenizer), into a temporary directory that is
    then put in place of `path` (replace_dir): a crash never leaves a half-written checkpoint, and an
    existing one is only replaced by a complete one."""
    from safetensors.torch import save_file
    shards, size = [[]], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    path = os.path.abspath(path)
    check_replaceable(path)
    with staging(path) as tmp:
        if len(shards) == 1:
            save_file({n: state[n] for n in shards[0]}, os.path.join(tmp, "model.safetensors"),
                      metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: state[n] for n in names}, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in names})
            total = sum(t.numel() * t.element_size() for t in state.values())
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
        for src in extra_files:
            shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
        write_json(os.path.join(tmp, "config.json"), config_json)
    return path


@contextlib.contextmanager
def staging(path):
    """`with staging(path) as tmp:` a new directory beside `path` to write into. When the block ends, it
    is given the usual permissions and put in place of `path` (replace_dir); if the block raises, it is
    removed and `path` is untouched."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        yield tmp
        publish_permissions(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once in place; else the debris of a failure


def check_writable(path, flag):
    """`path` (which may not exist yet) must be a directory we can create files in: checked before
    the work whose result goes there, not after it. Raises UserError naming `flag`."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e})") from None


def write_json(file, obj):
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def publish_permissions(path):
    """mkdtemp makes a 0700 directory and safetensors writes 0600 files: give them the usual modes
    (what the umask allows), so other users and tools can read the checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for name in os.listdir(path):
        os.chmod(os.path.join(path, name), 0o666 & ~umask)


def check_replaceable(path):
    """save replaces a checkpoint, never anything else: `path` must not exist, or be a directory
    holding only the files save writes. Raises CheckpointError otherwise."""
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
        raise CheckpointError(f"refusing to replace {path}: it is not a checkpoint directory")
    if os.path.isdir(path):
        foreign = sorted(n for n in os.listdir(path) if not CHECKPOINT_FILE.fullmatch(n))
        if foreign:
            raise CheckpointError(f"refusing to replace {path}: it holds {foreign[0]!r}, which save_pretrained "
                                  "did not write (save to a new or empty directory)")


def exchange_dirs(a, b):
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2, at_fdcwd, rename_exchange = getattr(libc, "renameat2", None), -100, 2
    return bool(renameat2) and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(src, dst):
    """Move the finished directory `src` onto `dst`. Where the system can, the two are exchanged
    atomically, so `dst` is at every instant the old checkpoint or the new one. Elsewhere, two
    renames: the old `dst` is first moved aside to .NAME.old-XXXX beside it, where it stays if the
    process dies before the second rename."""
    if os.path.isdir(dst) and exchange_dirs(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # now the old checkpoint
        return
    old = None
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
        os.rmdir(old)
        os.rename(dst, old)
    os.rename(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)
