"""
Extend the context of a Llama by fine-tuning it with YaRN (or any RoPE method of rope.py), the YaRN
paper's recipe; or pretrain a small Llama from nothing. One CPU, or many GPUs with FSDP2 under torchrun.

    # the paper: Llama 2 7B, YaRN s=16 over its L=4096, 400 steps of 64 sequences of s*L = 64k tokens
    torchrun --nproc_per_node 8 train.py --init Llama-2-7b-hf --data data/pg19 --yarn-scale 16 --out out/yarn16
    # s=32 starts from the s=16 model and still trains at 64k, half of s*L: the model extrapolates
    torchrun --nproc_per_node 8 train.py --init out/yarn16 --data data/pg19 --yarn-scale 32 --seq-len 65536 --steps 200 --out out/yarn32
    # any other method under the same training, to compare them (linear = PI, ntk, ntk-by-parts, ...)
    torchrun --nproc_per_node 8 train.py --init Llama-2-7b-hf --data data/pg19 --rope linear --rope-factor 16 --out out/pi16
    # on a CPU: pretrain a small Llama on Shakespeare (lr 1e-3, cosine), then extend it 4x with YaRN
    python data/shakespeare/prepare.py --out data/shakespeare/out
    python train.py --init scratch --data data/shakespeare/out --seq-len 256 --batch-size 16 --steps 1000 --out out/tiny
    python train.py --init out/tiny --data data/shakespeare/out --yarn-scale 4 --batch-size 8 --steps 50 --out out/tiny-yarn4
    # one GPU takes the FSDP2 path of eight (a mesh of one); 7B's fp32 weights, gradients and AdamW alone are 108 GB: an H200
    python train.py --init Llama-2-7b-hf --data data/pg19 --yarn-scale 16 --seq-len 16384 --compile --out out/one-gpu
    # after a crash: the same command plus --resume
    # several machines: torchrun's --nnodes/--rdzv-endpoint, with --out on a file system they all share

--out receives a Hugging Face checkpoint (config.json with the method's rope_scaling and the new
max_position_embeddings, model.safetensors, the tokenizer files) that sample.py, eval.py and
transformers load as is; metrics.jsonl, one line per step; checkpoints/step-N for --resume.

What this file teaches: the paper's recipe with FSDP2 in torchtitan's order (build on meta, checkpoint
and shard each block, materialise, fill from the checkpoint), a flat training loop, and resumable
sharded checkpoints that hold only data.
"""

import argparse
import base64
import json
import math
import os
import shutil
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

try:
    import resource  # Unix only: peak memory on CPU
except ImportError:
    resource = None

from data.packed import PackedData, read_meta
from data.tokenizer import load_tokenizer
from common import ArgumentParser, UserError, one_line_errors, reading
from checkpoint import CHECKPOINT_FILE, CheckpointError, read_config, read_tensors
from publish import check_writable, write_json
from model import CHECKPOINTING, Llama, LlamaConfig
from rope import METHODS, RopeConfig

SEQ_MULTIPLE = 64  # flash attention works on 64/128-token tiles; a ragged tail would waste one per layer
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def arg(default, help, type=None, choices=None):
    return field(default=default, metadata={"help": help, "type": type, "choices": choices})


@dataclass
class TrainConfig:
    init: str = arg(None, "Hugging Face Llama checkpoint directory to fine-tune, or 'scratch'", str)
    data: str = arg(None, "dataset directory written by data/prepare.py", str)
    out: str = arg("out", "output directory: HF checkpoint, metrics.jsonl, checkpoints/")
    # which RoPE method, over which original context L
    yarn_scale: float = arg(None, "YaRN scale s, the same as --rope yarn --rope-factor s", float)
    rope: str = arg(None, "RoPE method (default: the checkpoint's own)", str, METHODS)
    rope_factor: float = arg(None, "scale s of --rope: the new context is s*L", float)
    original_ctx: int = arg(None, "L, the checkpoint's original context (default: read from its config.json)", int)
    seq_len: int = arg(None, f"training length, a multiple of {SEQ_MULTIPLE} (default s*L; shorter is fine)", int)
    # the paper's recipe
    steps: int = arg(400, "optimizer steps")
    batch_size: int = arg(64, "global batch in sequences, reached by gradient accumulation")
    micro_batch: int = arg(1, "sequences per forward pass on each process")
    lr: float = arg(None, "peak learning rate (default 2e-5 to fine-tune, 1e-3 from scratch)", float)
    lr_schedule: str = arg(None, "after warmup: constant (the paper's, fine-tuning default) or cosine "
                                 "to 10%% (scratch default)", str, ("constant", "cosine"))
    warmup: int = arg(20, "linear warmup steps")
    weight_decay: float = arg(0.0, "AdamW weight decay (the paper uses none)")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)")
    seed: int = arg(0, "seed of the data order and of a scratch model's weights")
    # engine
    device: str = arg("auto", "cuda (one GPU per process) or cpu; auto: cuda if there is one", str,
                      ("auto", "cuda", "cpu"))
    dtype: str = arg("auto", "compute dtype: auto is bf16 on CUDA, fp32 on CPU", str, ("auto", "bf16", "fp32"))
    activation_checkpointing: str = arg(None, "what each block keeps for backward: none, full (its input: "
                                              "recompute all) or selective (input and attention outputs: "
                                              "recompute the rest); default selective from seq-len 2048, "
                                              "else none (model.py gives the memory estimate)", str, CHECKPOINTING)
    compile: bool = arg(False, "torch.compile each block (the first step's time, compilation included, is "
                               "left out of the reported speed)")
    # checkpoints and logging
    save_every: int = arg(100, "write a resumable checkpoint every N steps (0: never)")
    resume: bool = arg(False, "continue from the last checkpoint in --out")
    eval_every: int = arg(0, "validation loss every N steps (0: only at the end)")
    eval_blocks: int = arg(8, "validation sequences per evaluation")
    # --init scratch: the model's shape (the vocabulary is the tokenizer's)
    tokenizer: str = arg(None, "scratch: tokenizer file or directory (default: the dataset's)", str)
    n_layer: int = arg(6, "scratch: layers")
    n_embd: int = arg(384, "scratch: model width C")
    n_head: int = arg(6, "scratch: attention heads")
    n_kv_head: int = arg(None, "scratch: key/value heads (default n_head; fewer is grouped-query attention)", int)
    intermediate_size: int = arg(None, "scratch: SwiGLU width (default 8C/3 rounded up to 256)", int)
    rope_theta: float = arg(10000.0, "scratch: RoPE base")


def parse_args(argv):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    p = ArgumentParser(description=__doc__, formatter_class=Formatter)
    for f in fields(TrainConfig):
        kind, flag = f.metadata["type"] or type(f.default), "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=kind, default=f.default, choices=f.metadata["choices"], help=f.metadata["help"])
    return TrainConfig(**vars(p.parse_args(argv)))


# ---- checking the flags against the checkpoint and the data --------------------------------------------

def check_flags(tc):
    """Each flag's own range, before anything is read: a value that would train silently wrong (a negative
    clip ascends the loss, lr inf exports NaN, batch 0 trains nothing) is refused like one that would crash."""
    def at_least(low, *names):
        for name in names:
            value = getattr(tc, name)
            if value is not None and value < low:
                raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")

    def finite(name, low, above=False):
        value = getattr(tc, name)
        if value is not None and not (math.isfinite(value) and (value > low if above else value >= low)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number {'>' if above else '>='} {low}, "
                             f"got {value}")

    at_least(1, "steps", "batch_size", "micro_batch", "eval_blocks", "n_layer", "n_embd", "n_head", "n_kv_head",
             "intermediate_size", "original_ctx")
    at_least(0, "warmup", "save_every", "eval_every")
    finite("yarn_scale", 1)
    finite("rope_factor", 1)
    finite("lr", 0, above=True)
    finite("grad_clip", 0)
    finite("weight_decay", 0)
    finite("rope_theta", 1, above=True)
    if tc.init == "scratch":
        if tc.n_embd % tc.n_head or (tc.n_embd // tc.n_head) % 2:
            raise UserError(f"--n-embd {tc.n_embd} must be --n-head {tc.n_head} times an even head dim")
        if tc.n_kv_head and tc.n_head % tc.n_kv_head:
            raise UserError(f"--n-head {tc.n_head} must be a multiple of --n-kv-head {tc.n_kv_head}")
    check_writable(tc.out, "--out")


def resolve(tc, world):
    """Fill the defaults that depend on the checkpoint and the data, and reject what cannot work.
    Returns the model config and the tokenizer files to ship with it; raises UserError."""
    if not tc.init or not tc.data:
        raise UserError("--init (a checkpoint directory, or 'scratch') and --data are required")
    check_flags(tc)
    if tc.yarn_scale is not None:
        if tc.rope not in (None, "yarn") or tc.rope_factor not in (None, tc.yarn_scale):
            raise UserError("--yarn-scale S means --rope yarn --rope-factor S: give one or the other")
        tc.rope, tc.rope_factor = "yarn", tc.yarn_scale
    if tc.rope not in (None, "none") and tc.rope_factor is None:
        raise UserError(f"--rope {tc.rope} needs --rope-factor")
    meta = reading(read_meta, tc.data)
    data_vocab = meta["vocab_size"]

    if tc.init == "scratch":
        tok = reading(load_tokenizer, tc.tokenizer or os.path.join(tc.data, meta["tokenizer"]))
        if tok.vocab_size != data_vocab:
            raise UserError(f"tokenizer/data vocab mismatch: the tokenizer has {tok.vocab_size} tokens, "
                             f"{tc.data} was tokenized with {data_vocab}")
        L = tc.original_ctx or (tc.seq_len and int(tc.seq_len / (tc.rope_factor or 1)))
        if not L:
            raise UserError("--init scratch needs --seq-len (or --original-ctx)")
        C = tc.n_embd
        rope = RopeConfig(method=tc.rope or "none", theta=tc.rope_theta, head_dim=C // tc.n_head,
                          factor=tc.rope_factor or 1.0, original_max_position_embeddings=L)
        mcfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=C, num_hidden_layers=tc.n_layer,
                           intermediate_size=tc.intermediate_size or 256 * math.ceil(8 * C / 3 / 256),
                           num_attention_heads=tc.n_head, num_key_value_heads=tc.n_kv_head or tc.n_head,
                           bos_token_id=tok.bos_id if tok.bos_id >= 0 else None,
                           eos_token_id=tok.eos_id if tok.eos_id >= 0 else None, rope=rope)
        tok_files = list(tok.files)
    else:
        base = LlamaConfig.from_pretrained(tc.init)
        Llama.check_checkpoint(base, tc.init)  # no weights, only pickles, or other shapes: fail now, before allocating
        L = tc.original_ctx or base.rope.original_max_position_embeddings
        if tc.rope is None:  # keep the checkpoint's own method (its L may still be overridden)
            rope = base.rope.replace(original_max_position_embeddings=L)
        else:
            rope = RopeConfig(method=tc.rope, theta=base.rope.theta, head_dim=base.head_dim,
                              factor=tc.rope_factor if tc.rope != "none" else 1.0, original_max_position_embeddings=L)
        mcfg = replace(base, rope=rope)
        tok_files = [os.path.join(tc.init, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tc.init, n))]
        try:
            own = load_tokenizer(tc.init).vocab_size
        except FileNotFoundError:  # a checkpoint without a tokenizer: ship the one the data was made with
            own, tok_files = data_vocab, reading(load_tokenizer, os.path.join(tc.data, meta["tokenizer"])).files
        except ValueError as e:  # one we cannot read
            raise UserError(str(e)) from None
        if own != data_vocab:
            raise UserError(f"tokenizer/model vocab mismatch: {tc.data} was tokenized with {data_vocab} "
                             f"tokens, the tokenizer of {tc.init} has {own}: prepare the data with it")
        if data_vocab > mcfg.vocab_size:
            raise UserError(f"tokenizer/model vocab mismatch: the data has ids up to {data_vocab - 1}, "
                             f"the model's vocabulary is {mcfg.vocab_size}")

    json.dumps(mcfg.to_hf(), allow_nan=False)  # what export writes at the end must be writable now
    tc.seq_len = tc.seq_len or int(rope.factor * rope.original_max_position_embeddings)
    if tc.seq_len <= 0 or tc.seq_len % SEQ_MULTIPLE:
        raise UserError(f"--seq-len (default s*L) must be a positive multiple of {SEQ_MULTIPLE}, got {tc.seq_len}")
    train = reading(PackedData, tc.data, "train")
    if train.num_blocks(tc.seq_len) < 1:
        raise UserError(f"{tc.data}/train.bin holds {len(train)} tokens, fewer than one sequence of {tc.seq_len}")
    if tc.batch_size % (world * tc.micro_batch):
        raise UserError(f"--batch-size {tc.batch_size} is not divisible by world size {world} x "
                         f"--micro-batch {tc.micro_batch}")
    if tc.steps < 1 or tc.warmup < 0 or tc.save_every < 0 or tc.eval_every < 0:
        raise UserError("--steps must be >= 1; --warmup, --save-every, --eval-every >= 0")
    scratch = tc.init == "scratch"
    tc.lr = tc.lr if tc.lr is not None else (1e-3 if scratch else 2e-5)
    tc.lr_schedule = tc.lr_schedule or ("cosine" if scratch else "constant")
    if tc.activation_checkpointing is None:
        tc.activation_checkpointing = "selective" if tc.seq_len >= 2048 else "none"
    for file in tok_files:
        check_side_file(file)
    return mcfg, tok_files


def check_side_file(file):
    """A tokenizer file we copy into --out must be a file of its own directory. A symbolic link is
    followed only inside that directory, or, for a Hugging Face hub cache snapshot
    (.../snapshots/REV/tokenizer.model -> ../../blobs/HASH), into that repository's blobs/. Anything
    else could make us copy a private file from elsewhere into the output."""
    if not os.path.islink(file):
        return
    folder = os.path.realpath(os.path.dirname(file))
    allowed = [folder]
    if os.path.basename(os.path.dirname(folder)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(folder)), "blobs"))
    target = os.path.realpath(file)
    if not any(os.path.commonpath([target, root]) == root for root in allowed):
        raise UserError(f"{file} is a symbolic link to {target}, outside its checkpoint: refusing to copy it "
                         "(put the file itself there)")


def check_out(tc):
    """--out is new, empty, or the directory of an earlier train.py run (it has metrics.jsonl): nothing
    else of the user's is ever overwritten or deleted there."""
    out = tc.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory")
    if os.path.isdir(out):
        names = [n for n in os.listdir(out) if n not in (".lock", ".export")]  # ours, hidden
        if names and "metrics.jsonl" not in names:
            raise UserError(f"--out {out} is not empty and not the output of a train.py run (no metrics.jsonl): "
                             "pick a new or empty directory")
        if tc.init != "scratch" and os.path.isdir(tc.init) and os.path.samefile(tc.init, out):
            raise UserError("--out must not be the --init checkpoint")


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


# ---- model: built on meta, sharded, materialised, then filled -----------------------------------------

def build_model(mcfg, tc, device, world, bf16, fsdp):
    # 1) on the meta device: no memory is touched, whatever the size; checkpointing and compilation are
    #    per block, the checkpoint inside each block's forward (so a compiled block includes it)
    with torch.device("meta"):
        model = Llama(mcfg)
    shapes = model.shapes()
    model.set_activation_checkpointing(tc.activation_checkpointing)
    if tc.compile:
        for block in model.model.layers:
            block.compile()
    # 2) FSDP2: each block is one all-gather unit, then the root (embeddings, final norm, head);
    #    bf16 compute on fp32 master weights, gradients reduced in fp32. On one GPU too (a mesh of one):
    #    the bf16 copy of each block's weights then lives only while the block runs, where autocast
    #    would keep a bf16 copy of every weight for the whole step
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    # 3) real storage: each rank allocates only its shards
    model.to_empty(device=device)
    if mcfg.tie_word_embeddings and not fsdp:  # to_empty made two tensors of the tied one
        model.lm_head.weight = model.model.embed_tokens.weight
    # 4) the weights: a checkpoint's, streamed in, or a fresh init made the same way on any world size
    if tc.init == "scratch":
        torch.manual_seed(tc.seed)
        full = Llama(mcfg)
        full.init_weights()
        fill_weights(model, full.state_dict().items())
    else:
        fill_weights(model, read_tensors(tc.init, shapes, mcfg.tie_word_embeddings))
    return model


@torch.no_grad()
def fill_weights(model, named_tensors):
    """Copy full tensors (checked by read_tensors) into the model; with FSDP each rank slices out its own
    shard locally (no communication), so no rank ever holds more than one full tensor beside its shards."""
    params = model.state_dict()  # with FSDP2: DTensors sharded on dim 0
    for name, t in named_tensors:
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # the embedding
        dst = params[name]
        if isinstance(dst, DTensor):
            t = distribute_tensor(t, dst.device_mesh, dst.placements, src_data_rank=None)
        dst.copy_(t)


def export(model, mcfg, tc, tok_files, save_dtype, master):
    """Write the Hugging Face checkpoint into --out: first complete in out/.export (weights, config.json,
    tokenizer files), then published into out by renames, config.json last (see publish_export)."""
    if dist.is_initialized():  # a collective: every rank sends its shards, rank 0 gets full CPU tensors
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if not master:
        return
    with torch.device("meta"):
        plain = Llama(mcfg)
    plain.load_state_dict({k: v.to("cpu", save_dtype) for k, v in state.items()}, assign=True, strict=False)
    if mcfg.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.save_pretrained(os.path.join(tc.out, ".export"), extra_files=tok_files)  # exists only complete
    publish_export(tc.out)


def publish_export(out):
    """Move the complete checkpoint of out/.export into out. config.json goes first out and last in, so
    out holds a config.json only beside the weights it describes; weights of an earlier export that the
    new one does not overwrite (another sharding) are removed, nothing else is. Killed halfway, out has no
    config.json and .export holds the rest: the next train.py on this --out finishes the job."""
    staged = os.path.join(out, ".export")
    new = set(os.listdir(staged))
    if os.path.exists(os.path.join(out, "config.json")):
        os.remove(os.path.join(out, "config.json"))
    for name in os.listdir(out):
        if CHECKPOINT_FILE.fullmatch(name) and name not in new:
            os.remove(os.path.join(out, name))
    for name in sorted(new, key=lambda n: n == "config.json"):
        os.replace(os.path.join(staged, name), os.path.join(out, name))
    os.rmdir(staged)


# ---- resumable training state --------------------------------------------------------------------------

def leave_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoints(out):
    folder = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.startswith("step-")) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names]


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


def save_state(model, optimizer, tc, step, rank, world, master):
    """The resumable state, in files that hold only data: each rank writes its shards of the model and
    optimizer to rank-R-of-W.safetensors, rank 0 the step (which is the data position and the schedule),
    the RNG of every rank and the run's flags to train_state.json. (torch.distributed.checkpoint would
    do the sharding for us, but its metadata is a pickle, and loading a pickle can run code.)
    Written to a temporary directory renamed to checkpoints/step-N, so a step-N directory is always
    complete; older ones go after."""
    from safetensors.torch import save_file
    folder = os.path.join(tc.out, "checkpoints")
    tmp, final = os.path.join(folder, f".step-{step:06d}.tmp"), os.path.join(folder, f"step-{step:06d}")
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
        os.makedirs(tmp)
    barrier()
    tensors, _, _ = state_tensors(model, optimizer)
    save_file({k: local(v) for k, v in tensors.items()}, os.path.join(tmp, f"rank-{rank:05d}-of-{world:05d}.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rng = {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in rng.items()}
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    barrier()  # every rank's file is written
    if master:
        sharded = sorted(k for k, v in tensors.items() if isinstance(v, DTensor))
        write_json(os.path.join(tmp, "train_state.json"), {"step": step, "samples": step * tc.batch_size,
                                                           "world": world, "sharded": sharded, "rng": rngs,
                                                           "config": asdict(tc)})
        old = checkpoints(tc.out)
        os.rename(tmp, final)
        for path in old:  # rename first: a half-deleted directory never looks like a checkpoint
            trash = os.path.join(folder, "." + os.path.basename(path) + ".trash")
            os.rename(path, trash)
            shutil.rmtree(trash)
    barrier()


RESUME_MUST_MATCH = ("init", "data", "seq_len", "batch_size", "rope", "rope_factor", "original_ctx", "seed", "lr",
                     "lr_schedule", "warmup", "weight_decay")


def load_state(model, optimizer, tc, path, rank, world):
    """Read a checkpoint of save_state into this run, whatever its world size: each tensor is put
    together from the shards of every rank that wrote it (dim 0, in rank order), and this rank keeps its
    own part. Raises CheckpointError (one line) for anything that does not fit."""
    from safetensors import safe_open
    try:
        with open(os.path.join(path, "train_state.json")) as f:
            state = json.load(f)
        step, old_world, sharded, config = state["step"], state["world"], set(state["sharded"]), state["config"]
        if not (isinstance(step, int) and isinstance(old_world, int) and step >= 0 and old_world >= 1):
            raise ValueError("step and world must be non-negative integers")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--resume: unreadable {path}/train_state.json ({e})") from None
    for key in RESUME_MUST_MATCH:
        if config.get(key) != getattr(tc, key):
            raise CheckpointError(f"--resume: --{key.replace('_', '-')} was {config.get(key)} in {path}, "
                                  f"now {getattr(tc, key)}")
    tensors, model_state, optim_state = state_tensors(model, optimizer)
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
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    if old_world == world:  # the same ranks: the same random streams
        try:
            rng = {k: torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8)
                   for k, v in state["rng"][rank].items()}
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        except Exception as e:
            raise CheckpointError(f"--resume: bad RNG state in {path}/train_state.json ({e})") from None
    return step


# ---- data, schedule, evaluation -------------------------------------------------------------------------

class BlockOrder:
    """Sample g of the run is block perm_e[g mod n] of a fresh seeded shuffle for each epoch e = g // n:
    a pure function of (seed, g), so a resumed run reads exactly what an uninterrupted one would."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.perm = n, seed, -1, None

    def __getitem__(self, g):
        epoch, i = divmod(g, self.n)
        if epoch != self.epoch:
            self.epoch, self.perm = epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self.perm[i])


def get_lr(step, tc):
    """Linear warmup, then constant (the paper) or cosine down to 10%."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    if tc.lr_schedule == "constant":
        return tc.lr
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


class StepMeter:
    """Times the steps and turns a step's device tensors into a log line (loss and gradient norm read in
    one transfer, speed, memory), without making the host wait for the GPU: a step's numbers are read
    once the next step is queued, and its time is measured on the GPU itself, by CUDA events at its start
    and end (on a CPU, the clock). The first step of a process (compilation, warm-up) is kept out of the
    summary's speed."""

    def __init__(self, tokens_per_step, device, world, flops_per_token, peak_flops):
        self.tokens, self.device, self.world = tokens_per_step, device, world
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.cuda = device.type == "cuda"
        self.first, self.steps, self.seconds = None, 0, 0.0  # after the first step: how many, how long

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
                f"{self.first:.2f}s (warm-up, and compilation with --compile)")


@torch.no_grad()
def evaluate(model, val, tc, rank, world, device, amp):
    """Mean loss over the first --eval-blocks validation sequences, spread over the ranks."""
    n = min(tc.eval_blocks, val.num_blocks(tc.seq_len))
    if n == 0:
        return None
    model.eval()
    total = torch.zeros(2, device=device)  # (sum of losses, count)
    for i in range(rank, math.ceil(n / world) * world, world):  # same count everywhere: FSDP all-gathers
        block = val.block(i % n, tc.seq_len).to(device)
        with amp():
            loss = model(block[None, :-1], block[None, 1:])
        if i < n:
            total += torch.stack([loss.float(), torch.ones((), device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# ---- main: check, claim --out, build, resume, train, export ------------------------------------------

def check(tc, world, cuda, bf16):
    """Everything the user gave, before any process group or memory is set up. Returns the model config,
    the tokenizer files to ship, and the dtype of the output."""
    mcfg, tok_files = resolve(tc, world)
    check_out(tc)
    if tc.resume is False and checkpoints(tc.out):
        raise UserError(f"{tc.out} holds checkpoints of an earlier run: add --resume, or pick another --out")
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device")
    # the output keeps the checkpoint's dtype (bf16 for Llama 2); a scratch model its compute dtype
    hf = read_config(tc.init) if tc.init != "scratch" else {"torch_dtype": "bfloat16" if bf16 else "float32"}
    return mcfg, tok_files, getattr(torch, hf.get("torch_dtype") or hf.get("dtype") or "float32")


def claim_out(tc, device, world, master, fsdp, cleanup):
    """Rank 0 locks --out, then the process group is made (and let go by `cleanup`), every rank learns
    whether the lock was had, and an export that an earlier run left half-published is finished."""
    lock = None
    if master:
        os.makedirs(tc.out, exist_ok=True)
        lock = lock_out(tc.out)
        if lock:
            cleanup.callback(lock.close)
    if fsdp:  # torchrun's environment says where the others are; one plain process is a group of one
        alone = {} if "WORLD_SIZE" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None, **alone)
        if alone:  # however run() ends, so that main() can run again in this process
            cleanup.callback(leave_process_group)
    locked = torch.tensor([float(lock is not None)], device=device if world > 1 else "cpu")
    if world > 1:
        dist.broadcast(locked, 0)  # every rank learns whether rank 0 got --out
    if not locked.item():
        raise UserError(f"another train.py is running with --out {tc.out} (it holds {tc.out}/.lock): wait for it, "
                        "or pick another --out")
    if master and os.path.isdir(os.path.join(tc.out, ".export")):
        publish_export(tc.out)
        print(f"note: finished publishing the checkpoint that an earlier run left in {tc.out}/.export",
              file=sys.stderr)


def resume(model, optimizer, tc, rank, world, master):
    """The step to start from: with --resume, that of the last checkpoint, whose state is loaded; else 0.
    metrics.jsonl keeps the steps that the restored state has seen, and drops the lost ones."""
    start = 0
    if tc.resume and checkpoints(tc.out):
        start = load_state(model, optimizer, tc, checkpoints(tc.out)[-1], rank, world)
    log_path = os.path.join(tc.out, "metrics.jsonl")
    if master:
        lines = open(log_path).read().splitlines() if start and os.path.exists(log_path) else []
        with open(log_path, "w") as f:
            f.writelines(l + "\n" for l in lines if json.loads(l).get("step", 0) <= start)
    return start


def flops(model, mcfg, tc, device):
    """(parameters, flops per token, the GPU's peak bf16 flops or None): 6 flops per weight per token for
    the matmuls of forward and backward (the embedding lookup is not one), plus attention; recomputation
    is not counted (PaLM's convention)."""
    n_params = sum(p.numel() for p in model.parameters())  # DTensors count their full size
    n_matmul = n_params - (0 if mcfg.tie_word_embeddings else mcfg.vocab_size * mcfg.hidden_size)
    per_token = 6 * n_matmul + 12 * mcfg.num_hidden_layers * mcfg.num_attention_heads * mcfg.head_dim * tc.seq_len
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    return n_params, per_token, peak


def main(argv=None):
    with one_line_errors(), ExitStack() as cleanup:  # what main holds (the lock on --out) is let go however it ends
        run(argv, cleanup)


def run(argv, cleanup):
    tc = parse_args(argv)
    # 1) who we are: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` is 1 of 1
    rank, local_rank, world = (int(os.environ.get(k, "0")) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    world, master = max(world, 1), rank == 0
    cuda = tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
    # FSDP2 under torchrun, and on CUDA always: a single GPU takes the path of eight
    fsdp = "WORLD_SIZE" in os.environ or device.type == "cuda"
    # 2) check everything the user gave before any process group or memory is set up
    mcfg, tok_files, save_dtype = check(tc, world, cuda, bf16)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    claim_out(tc, device, world, master, fsdp, cleanup)
    # 3) model, optimizer, data
    try:
        model = build_model(mcfg, tc, device, world, bf16, fsdp)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if "alloc" not in str(e) and not isinstance(e, MemoryError):
            raise
        raise UserError(f"cannot allocate the model ({mcfg.num_hidden_layers} layers, width {mcfg.hidden_size}, vocabulary "
            f"{mcfg.vocab_size}) on {device}: {str(e).splitlines()[0]}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay,
                                  fused=device.type == "cuda", foreach=None if device.type == "cuda" else True)
    train, val = PackedData(tc.data, "train"), PackedData(tc.data, "val")
    order = BlockOrder(train.num_blocks(tc.seq_len), tc.seed)
    accum = tc.batch_size // (world * tc.micro_batch)
    # without FSDP (one process on CPU): autocast gives bf16 compute on fp32 weights; FSDP's policy does it otherwise
    amp = (lambda: torch.autocast(device.type, torch.bfloat16)) if bf16 and not fsdp else nullcontext
    start = resume(model, optimizer, tc, rank, world, master)
    log_path = os.path.join(tc.out, "metrics.jsonl")
    n_params, flops_per_token, peak = flops(model, mcfg, tc, device)
    if master:
        print(f"{n_params / 1e6:.1f}M parameters, rope {mcfg.rope.method} x{mcfg.rope.factor:g} over L="
              f"{mcfg.rope.original_max_position_embeddings}, seq_len {tc.seq_len}, {world} process(es) x "
              f"{accum} micro-steps x {tc.micro_batch} = {tc.batch_size} sequences per step"
              f"{f', resuming at step {start}' if start else ''}", file=sys.stderr)

    # 4) the loop: micro-steps, clip, step, log, evaluate, checkpoint
    # on CUDA, flash attention first; the math kernel (memory O(T^2)) only for shapes no fused one takes
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernels = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                               SDPBackend.MATH], set_priority=True)
    else:
        kernels = nullcontext()
    bar = tqdm(total=tc.steps, initial=start, disable=not master, unit="step", dynamic_ncols=True)
    meter = StepMeter(tc.batch_size * tc.seq_len, device, world, flops_per_token, peak)
    pending = None  # the last step's metrics, still device tensors

    def finished(m):
        """A step's numbers, read; a step that diverged ends the run (a checkpoint is only saved after its
        step was read: never one with NaN weights)."""
        log = meter.read(m)
        if not (math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"])):  # every rank sees the same values
            bar.close()
            raise UserError(f"step {log['step']}: loss {log['loss']}, gradient norm {log['grad_norm']}: training diverged "
                f"(lower --lr?); nothing exported, checkpoints in {tc.out} are kept")
        return log

    def write_log(log):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(log) + "\n")
            bar.set_postfix({k: f"{log[k]:.4g}" for k in ("loss", "lr", "tokens_per_s", "mfu") if k in log})
            bar.update()

    with kernels:
        for step in range(start, tc.steps):
            t0 = meter.mark()
            lr = get_lr(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                first = step * tc.batch_size + (rank * accum + micro) * tc.micro_batch  # global sample number
                blocks = torch.stack([train.block(order[g], tc.seq_len) for g in range(first, first + tc.micro_batch)])
                blocks = blocks.to(device, non_blocking=True)  # (B, T+1)
                with amp():
                    loss = model(blocks[:, :-1], blocks[:, 1:]) / accum
                loss.backward()  # FSDP reduce-scatters (averaging over ranks) in each backward
                loss_sum += loss.detach()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            marks = (t0, meter.mark())
            # the previous step is logged now, this one at the next step: reading its numbers waits only
            # for work already done while this step's kernels are queued, so the GPU never runs dry
            if pending:
                write_log(finished(pending))
            pending = dict(step=step + 1, loss=loss_sum, grad_norm=norm, lr=lr, marks=marks)
            evaluate_now = step + 1 == tc.steps or (tc.eval_every and (step + 1) % tc.eval_every == 0)
            save_now = tc.save_every and (step + 1) % tc.save_every == 0
            if evaluate_now or save_now:  # the log is complete up to this step before evaluating or saving
                log = finished(pending)
                pending = None
                if evaluate_now:
                    log["val_loss"] = evaluate(model, val, tc, rank, world, device, amp)
                write_log(log)
                if save_now:
                    try:
                        save_state(model, optimizer, tc, step + 1, rank, world, master)
                    except OSError as e:  # a full disk: the last complete checkpoint stays
                        bar.close()
                        raise UserError(f"cannot write a checkpoint in {tc.out}: {e.strerror or e}")
    bar.close()
    if master and meter.steps:
        print(meter.summary(), file=sys.stderr)

    # 5) the Hugging Face checkpoint
    try:
        export(model, mcfg, tc, tok_files, save_dtype, master)
    except OSError as e:  # a full disk: an earlier export in --out is only replaced by a complete one
        raise UserError(f"cannot export to {tc.out}: {e.strerror or e}; the resumable checkpoints in {tc.out} are kept")
    if master:
        val_loss = log["val_loss"] if start < tc.steps else None
        print(f"wrote {tc.out}" + (f"; final val loss {val_loss:.4f}" if val_loss is not None else ""), file=sys.stderr)
    if dist.is_initialized():
        barrier()  # no rank leaves while another still writes or communicates
        dist.destroy_process_group()


def run_and_exit(argv=None):
    """main(), then leave the process without tearing down the interpreter when it used a process group
    (under torchrun, or FSDP's group of one on a GPU).

    Why: gloo runs each collective on a C++ worker thread, and that thread drops its reference to the
    collective's tensors a moment *after* the rank waiting on it has moved on. Freeing a tensor that
    Python knows needs the GIL; an interpreter that is shutting down answers by ending the thread
    (pthread_exit), which unwinds through a C++ noexcept frame: std::terminate, SIGABRT, after all the
    work was done. destroy_process_group() cannot join those threads, since DTensor's caches keep the
    device mesh, and with it the process group, alive until the very end. So once our files are
    written and closed, each rank of a torchrun job flushes its output and ends with os._exit: the
    threads end with the process, and no interpreter shutdown runs beside them."""
    distributed = "WORLD_SIZE" in os.environ or torch.cuda.is_available()  # when run() may make a process group
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


if __name__ == "__main__":
    run_and_exit()
