"""
Hugging Face checkpoints on disk: config.json, and the weights as safetensors (one file, or shards
listed in model.safetensors.index.json). Read it after model.py: it teaches what a checkpoint is made
of, and how to read one safely (no pickles, every tensor checked) and write one that a crash never
leaves half-written.

    hf = read_config(path)                                  # the config.json dict
    for name, t in read_tensors(path, expected_shapes):     # one tensor at a time, checked
        ...
    save(path, state, config_json)                          # staged aside, then swapped in (publish.py)
    drop_padding(model, tok.vocab_size)                     # eval.py: a head padded past the tokenizer, cut to it

Both Llama.from_pretrained and train.py's sharded loading read weights through read_tensors: one
stream, one set of checks and messages. Every problem is a CheckpointError, one line for the user.
"""

import os
import re
import shutil

import torch

from support.common import UserError, note
from support.jsonfile import CONFIG_TYPES, JSONFileError, read_json
from support.publish import new_dir, save_tensors, write_json


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
        return read_json(file, CONFIG_TYPES)
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
    except JSONFileError as e:  # "FILE: why" or "FILE is not valid JSON (why)"
        raise CheckpointError(f"corrupt config.json in {path}: {str(e).removeprefix(file).lstrip(': ')}") from None


def weight_files(path):
    """(the safetensors files of a checkpoint, the index's {tensor: file name} or None for one file).
    Pickled weights (pytorch_model.bin, *.pt) are refused: unpickling runs arbitrary code from the file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            weight_map = read_json(index, {"weight_map": (dict,)})["weight_map"]
            names = list(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"corrupt {index}: {e}") from None
        for n in names:  # a shard is a file of this directory: no "../", no absolute path, no sub-folder
            if not isinstance(n, str) or os.path.basename(n) != n or n in (".", "..") or not n.endswith(".safetensors"):
                raise CheckpointError(f"{index}: {n!r} is not a .safetensors file name of this directory")
        names = sorted(set(names))
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise CheckpointError(f"shard {missing[0]} listed in model.safetensors.index.json is missing")
        return [os.path.join(path, n) for n in names], weight_map
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single], None
    pickles = [n for n in sorted(os.listdir(path)) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(f"{path} holds only pickle weights ({pickles[0]}); refusing to unpickle "
                              "(it can run arbitrary code): convert the checkpoint to safetensors first")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the dtypes a weight may have
INT_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
              "U32": "uint32", "I64": "int64", "U64": "uint64"}


def read_tensors(path, expected, tied=False, device="cpu", headers_only=False):
    """(name, tensor) for every weight of the checkpoint at `path`, one at a time from the memory-mapped
    files, each checked against `expected` ({name: shape}, what config.json implies): no unknown name, no
    other shape, no NaN, none missing. tied: the head is the embedding; a checkpoint may still hold it.
    headers_only: check the names and shapes from the safetensors headers alone, yield nothing: a wrong
    shape (or a vocabulary too large to allocate) is found before any memory is."""
    from safetensors import safe_open
    config = os.path.join(path, "config.json")
    needed = {n for n in expected if not (tied and n == "lm_head.weight")}
    files, weight_map = weight_files(path)
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                        continue  # a buffer old checkpoints saved; a tied head saved anyway
                    if name not in expected:
                        raise CheckpointError(f"{os.path.basename(file)}: unexpected tensor {name!r} "
                                              f"(not a Llama weight: wrong architecture?)")
                    if weight_map is not None and weight_map.get(name) != os.path.basename(file):
                        raise CheckpointError(f"{name} is in {os.path.basename(file)}, but the index puts it in "
                                              f"{weight_map.get(name)}: a damaged or hand-edited checkpoint")
                    shape, dtype = tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()
                    if shape != tuple(expected[name]):
                        raise CheckpointError(f"{file}: {name} has shape {shape}, {config} implies "
                                              f"{tuple(expected[name])}")
                    if dtype not in FLOAT_DTYPES:  # an integer, boolean or float8 tensor is no weight: never cast it
                        what = "a quantized float8" if dtype.startswith("F8") else "not floating point"
                        raise CheckpointError(f"{os.path.basename(file)}: {name} is {INT_DTYPES.get(dtype, dtype)}, "
                                              f"{what}: not a weight this model can use")
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
    above max_shard_bytes, and copies of `extra_files` (a tokenizer), into a directory staged beside
    `path` and then swapped in (publish.new_dir): a crash never leaves a half-written checkpoint, and an
    existing one is only replaced by a complete one."""
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
    with new_dir(path) as tmp:
        if len(shards) == 1:
            save_tensors({n: state[n] for n in shards[0]}, os.path.join(tmp, "model.safetensors"),
                         metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_tensors({n: state[n] for n in names}, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in names})
            total = sum(t.numel() * t.element_size() for t in state.values())
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
        for src in extra_files:  # a path, or (path, name in the checkpoint)
            src, name = src if isinstance(src, tuple) else (src, os.path.basename(src))
            shutil.copyfile(src, os.path.join(tmp, name))
        write_json(os.path.join(tmp, "config.json"), config_json)
    return path


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


def drop_padding(model, vocab):
    """A model padded past its tokenizer (Qwen2.5 7B: 152,064 rows for 151,665 tokens): the rows past
    `vocab` stand for no token, so perplexity and decoding are over the tokenizer's `vocab`, as if the head
    had only those rows."""
    rows = model.config.vocab_size
    if vocab < rows:
        note(f"note: the model's {rows} output rows go past the tokenizer's {vocab} tokens: the {rows - vocab} "
             "padding rows are left out")
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach()[:vocab], requires_grad=False)
        model.lm_head.out_features = vocab
