"""
train.py's flags, and every check of them against the checkpoint and the data, made before any
process group or memory is set up: the guard in front of the recipe.

    tc = parse_args(argv)                      # TrainConfig: one field per flag, `train.py --help` lists them
    tc, mcfg, tok_files, dtype, notes = check(tc, env)  # the defaults filled in, the model's config, or a UserError

A value that would train silently wrong (a negative clip ascends the loss, lr inf exports NaN, batch 0
trains nothing) is refused like one that would crash: one line, exit code 2 (common.one_line_errors).
"""

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field, fields, replace

import torch

from data.packed import PackedData, read_meta
from data.tokenizer import load_tokenizer
from model import CHECKPOINTING, Llama, LlamaConfig  # the config it resolves the flags into
from rope import METHODS, RopeConfig
from support import rundir
from support.checkpoint import check_tensors, read_config
from support.common import ArgumentParser, UserError, check_seed, checked, dtype_flag, reading
from support.hf_config import pretraining_context, replaced_scaling_note
from support.plan import FITS, GIB, Plan, peak_flops
from support.publish import check_writable

SEQ_MULTIPLE = 64  # flash attention works on 64/128-token tiles; a ragged tail would waste one per layer
# every tokenizer file a Hugging Face checkpoint may carry (transformers 4.5x writes the chat template to its own
# file, chat_template.jinja; GPT-2-style tokenizers keep vocab.json and merges.txt): the export ships each one
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "added_tokens.json",
                   "vocab.json", "merges.txt")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def arg(default, help, type=None, choices=None):
    return field(default=default, metadata={"help": help, "type": type, "choices": choices})


@dataclass
class TrainConfig:
    init: str = arg(None, "Hugging Face Llama checkpoint directory to fine-tune, or 'scratch' (--model: the same)", str)
    data: str = arg(None, "dataset directory written by data/prepare.py", str)
    out: str = arg("out", "output directory: HF checkpoint, metrics.jsonl, checkpoints/")
    # which RoPE method, over which original context L
    yarn_scale: float = arg(None, "YaRN scale s, the same as --rope yarn --rope-factor s", float)
    rope: str = arg(None, "RoPE method (default: the checkpoint's own)", str, METHODS)
    rope_factor: float = arg(None, "scale s of --rope (without it: of the checkpoint's own method): the new context "
                                   "is s*L", float)
    original_ctx: int = arg(None, "L, the checkpoint's original context (default: read from its config.json)", int)
    seq_len: int = arg(None, f"training length, a multiple of {SEQ_MULTIPLE} (default s*L; shorter is fine)", int)
    # the paper's recipe
    steps: int = arg(400, "optimizer steps")
    batch_size: int = arg(64, "global batch in sequences, reached by gradient accumulation")
    micro_batch: int = arg(1, "sequences per forward pass on each process")
    lr: float = arg(None, "peak learning rate (default 2e-5 to fine-tune, 1e-3 from scratch)", float)
    lr_schedule: str = arg(None, "after warmup: constant (the paper's; the default to fine-tune) or cosine "
                                 "to 10%% (the default from scratch)", str, ("constant", "cosine"))
    warmup: int = arg(20, "linear warmup steps")
    weight_decay: float = arg(0.0, "AdamW weight decay (the paper uses none)")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)")
    seed: int = arg(0, "seed of the data order and of a scratch model's weights")
    # engine
    device: str = arg("auto", "cuda (one GPU per process; cuda:N: GPU N, for one process) or cpu; auto: cuda if there "
                              "is one", str)
    dtype: str = arg("auto", "compute dtype: bf16 or fp32 (also bfloat16, float32); auto is bf16 on CUDA, fp32 "
                             "on CPU (default: auto)", dtype_flag)
    activation_checkpointing: str = arg(None, "what each block keeps for backward: none, full (its input: "
                                              "recompute all) or selective (input and attention outputs: "
                                              "recompute the rest); default selective from seq-len 2048, "
                                              "else none (the plan, --dry-run, gives the memory of each)", str, CHECKPOINTING)
    cp: int = arg(1, "context parallelism: split each sequence over N processes (context_parallel.py), for "
                     "sequences too long for one GPU's activations; the processes are data-parallel x N")
    compile: bool = arg(False, "torch.compile each block (the first step's time, compilation included, is "
                               "left out of the reported speed)")
    # memory for time, past 64k tokens (support/memory.py; the plan says what each costs)
    tile_mlp: bool = arg(False, "the MLP over tiles of C positions in training, each tile's intermediates recomputed "
                                "in backward (+1 MLP forward; the MLP is over half of what a block holds)")
    offload_checkpoints: bool = arg(False, "full checkpointing's kept block inputs wait in pinned host memory for "
                                           "their backward (copies over PCIe beside the compute; implies "
                                           "--activation-checkpointing full)")
    cpu_offload: bool = arg(False, "FSDP2's CPUOffloadPolicy: fp32 weights, gradients and AdamW in host memory, "
                                   "the optimizer step on the CPU (an 8B on one 80 GiB GPU); on a CPU, a note and no change")
    # checkpoints and logging
    save_every: str = arg("100", "write a resumable checkpoint every N steps, or every N minutes with Nm (30m) or "
                                 "hours with Nh; 0: never (SIGTERM still writes one)", str)
    resume: bool = arg(False, "continue from the last checkpoint in --out")
    overwrite: bool = arg(False, "start over in the --out of a finished run, replacing its export and metrics.jsonl "
                                 "(without it such an --out is refused: it holds the run's result)")
    eval_every: int = arg(0, "validation loss every N steps (0: only at the end)")
    eval_blocks: int = arg(8, "validation sequences per evaluation")
    log_every: int = arg(10, "without a terminal (a batch job's log): a progress line every N steps, or every "
                             "--log-seconds, whichever comes first")
    log_seconds: float = arg(60.0, "see --log-every")
    # the plan: memory, tokens, disk and time, before anything is read
    dry_run: bool = arg(False, "print the plan (memory per GPU by part, tokens, disk, time) and exit: 0 if it "
                               "fits, 2 if not; reads config.json only (a scratch model: the dataset's meta.json), "
                               "no weights, no data")
    gpus: int = arg(None, "with --dry-run: plan for this many GPUs (default: this run's processes)", int)
    gpu_memory: float = arg(None, "with --dry-run: plan for GPUs of this many GiB (default: this machine's GPU)",
                            float)
    host_memory: float = arg(None, "with --dry-run: each node has this many GiB of host memory, checked against "
                                   "what --cpu-offload and --offload-checkpoints put there (default: not checked)",
                             float)
    mfu: float = arg(0.4, "the model FLOPs utilisation the plan's time estimate assumes")
    fit_check: bool = arg(True, "on CUDA, refuse a run whose plan does not fit the GPU (--no-fit-check: the plan is "
                                "an estimate; run anyway)")
    # --init scratch: the model's shape (the vocabulary is the tokenizer's)
    tokenizer: str = arg(None, "scratch: tokenizer file or directory (default: the dataset's)", str)
    n_layer: int = arg(6, "scratch: layers")
    n_embd: int = arg(384, "scratch: model width C")
    n_head: int = arg(6, "scratch: attention heads")
    n_kv_head: int = arg(None, "scratch: key/value heads (default n_head; fewer is grouped-query attention)", int)
    intermediate_size: int = arg(None, "scratch: SwiGLU width (default 8C/3 rounded up to 256)", int)
    rope_theta: float = arg(10000.0, "scratch: RoPE base")


# --help shows the flags in these groups, in this order
GROUPS = {
    "model and data": ("init", "data", "out"),
    "RoPE: which method, over which original context L": ("yarn_scale", "rope", "rope_factor", "original_ctx", "seq_len"),
    "optimisation (the paper's recipe)": ("steps", "batch_size", "micro_batch", "lr", "lr_schedule", "warmup",
                                          "weight_decay", "grad_clip", "seed"),
    "engine": ("device", "dtype", "activation_checkpointing", "cp", "compile"),
    "memory for time, past 64k tokens": ("tile_mlp", "offload_checkpoints", "cpu_offload"),
    "checkpoints and logging": ("save_every", "resume", "overwrite", "eval_every", "eval_blocks", "log_every", "log_seconds"),
    "the plan (memory, tokens, disk, time)": ("dry_run", "gpus", "gpu_memory", "host_memory", "mfu", "fit_check"),
    "--init scratch only: the new model's shape": ("tokenizer", "n_layer", "n_embd", "n_head", "n_kv_head",
                                                   "intermediate_size", "rope_theta"),
}


def parse_args(argv, description=None):
    p = ArgumentParser(description=description)
    spec = {f.name: f for f in fields(TrainConfig)}
    for title, names in GROUPS.items():
        group = p.add_argument_group(title)
        for f in map(spec.get, names):
            kind, flag = f.metadata["type"] or type(f.default), "--" + f.name.replace("_", "-")
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
            else:  # --init is --model too, as sample.py and eval.py call a checkpoint
                group.add_argument(flag, *(["--model"] if f.name == "init" else []), type=kind, default=f.default,
                                   choices=f.metadata["choices"], help=f.metadata["help"])
    return TrainConfig(**vars(p.parse_args(argv)))


def check(tc, env):
    """Everything the user gave, before any process group or memory is set up. Returns the config with
    its defaults filled in, the model config, the tokenizer files to ship, the dtype of the output, and
    notes for the user (printed once every check has passed: which L a new RoPE method scales from).
    A dry run reads config.json alone (a scratch model: the dataset's meta.json): no weights, no data."""
    if not tc.init or not (tc.data or tc.dry_run and tc.init != "scratch"):
        raise UserError("--init (a checkpoint directory, or 'scratch') and --data are required")
    check_flags(tc)
    check_writable(tc.out, "--out")  # a dry run too: what the real run would refuse, said before it is queued
    hf = read_config(tc.init) if tc.init != "scratch" else None  # config.json, read once: handed down from here
    tc, mcfg, tok_files, notes = resolve(tc, hf, tc.gpus or env.world)
    if tc.cpu_offload and env.device.type == "cpu" and tc.gpus is None and tc.gpu_memory is None:
        notes.append("note: --cpu-offload is for GPUs: on a CPU the weights, gradients and AdamW are in host memory "
                     "already; the run goes on without it")
    rundir.check_out(tc)
    if not tc.dry_run:
        rundir.check_resume(tc)
        if env.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no CUDA device")
    # the output keeps the checkpoint's dtype (bf16 for Llama 2); a scratch model its compute dtype
    hf = hf or {"torch_dtype": "bfloat16" if env.bf16 else "float32"}
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"{tc.init}/config.json: torch_dtype {dtype!r}: the export keeps the checkpoint's dtype, "
                        f"one of {', '.join(EXPORT_DTYPES)}")
    return tc, mcfg, shipped(tok_files), getattr(torch, dtype), notes


def run_plan(tc, mcfg, env, save_dtype):
    """The plan (plan.py) of this run: for --gpus/--gpu-memory (a dry run) if given, else for the GPUs it runs
    on, or for its CPU processes (each with its share of the machine's memory, no time estimate)."""
    gpu = tc.gpus is not None or tc.gpu_memory is not None or env.device.type == "cuda"
    cuda = env.device.type == "cuda" and torch.cuda.is_available()
    if tc.gpu_memory:
        memory = tc.gpu_memory * GIB
    elif cuda:
        memory = torch.cuda.get_device_properties(env.device).total_memory
    elif gpu:
        raise UserError("--gpus: give --gpu-memory GiB too (no GPU here to read it from)")
    else:
        memory = physical_memory() / env.world
    peak = peak_flops(torch.cuda.get_device_name(env.device) if cuda else "H100") if gpu else None
    host = tc.host_memory * GIB if tc.host_memory else (physical_memory() if cuda else None)
    return Plan(mcfg, tc.seq_len, tc.activation_checkpointing, tc.batch_size, tc.steps, tc.micro_batch,
                tc.gpus or env.world, memory, bf16=tc.dtype == "bf16" or (tc.dtype == "auto" and gpu), peak_flops=peak,
                mfu=tc.mfu, device="GPU" if gpu else "CPU", export_itemsize=save_dtype.itemsize,
                cp=tc.cp, tile_mlp=tc.tile_mlp, offload=tc.offload_checkpoints,
                cpu_offload=tc.cpu_offload, host_memory=host,
                gpus_per_node=8 if tc.gpus else int(os.environ.get("LOCAL_WORLD_SIZE", env.world)))


def physical_memory():
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(plan):
    if plan.fits:
        return
    if plan.memory is None or plan.total <= FITS * plan.memory:  # the host is what is short
        need = f"{plan.host_total / GIB:.1f} GiB of host memory per node, more than {FITS:.0%} of its " \
               f"{plan.host_memory / GIB:.0f} GiB"
    else:
        need = f"{plan.total / GIB:.1f} GiB per {plan.device}, more than {FITS:.0%} of its {plan.memory / GIB:.0f} GiB"
    raise UserError(f"the plan needs {need}: {plan.hint()} (the plan is an estimate: --no-fit-check runs it anyway)")


def check_flags(tc):
    """Each flag's own range, before anything is read."""
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

    at_least(1, "steps", "batch_size", "micro_batch", "cp", "eval_blocks", "n_layer", "n_embd", "n_head", "n_kv_head",
             "intermediate_size", "original_ctx", "gpus", "log_every")
    at_least(0, "warmup", "eval_every")
    save_interval(tc)
    finite("log_seconds", 0)
    finite("gpu_memory", 0, above=True)
    finite("mfu", 0, above=True)
    if tc.mfu > 1:
        raise UserError(f"--mfu is a fraction of the GPU's peak, at most 1, got {tc.mfu}")
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
    check_seed(tc.seed)
    check_device(tc.device)
    if (tc.gpus is not None or tc.gpu_memory is not None or tc.host_memory is not None) and not tc.dry_run:
        raise UserError("--gpus, --gpu-memory and --host-memory plan a run elsewhere: give them with --dry-run (a real "
                        "run plans for the machine it has)")
    check_memory_flags(tc)
    if tc.dtype == "fp16":
        raise UserError("--dtype fp16: training in fp16 needs loss scaling, which train.py does not do: use bf16 "
                        "(the paper's), or fp32")
    if tc.yarn_scale is not None and (tc.rope not in (None, "yarn") or tc.rope_factor not in (None, tc.yarn_scale)):
        raise UserError("--yarn-scale S means --rope yarn --rope-factor S: give one or the other")


def check_memory_flags(tc):
    if tc.host_memory is not None and not (math.isfinite(tc.host_memory) and tc.host_memory > 0):
        raise UserError(f"--host-memory must be a finite number > 0, got {tc.host_memory}")
    if tc.offload_checkpoints and tc.activation_checkpointing not in (None, "full"):
        raise UserError(f"--offload-checkpoints moves what full checkpointing keeps to the host: it needs "
                        f"--activation-checkpointing full, not {tc.activation_checkpointing}")


def check_device(device):
    """auto, cpu, cuda, or cuda:N for one process (as sample.py and eval.py take it)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UserError(f"--device must be auto, cuda, cuda:N or cpu, got {device!r}")
    if ":" in device and "WORLD_SIZE" in os.environ:
        raise UserError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK: give "
                        "--device cuda")


def resolve(tc, hf, world):
    """The defaults that depend on the checkpoint and the data, and what cannot work with them. Returns
    the config with its defaults filled in, the model config, the tokenizer files to ship and notes."""
    if tc.yarn_scale is not None:
        tc = replace(tc, rope="yarn", rope_factor=tc.yarn_scale)
    if tc.rope not in (None, "none") and tc.rope_factor is None:
        raise UserError(f"--rope {tc.rope} needs --rope-factor")
    if tc.rope_factor is not None and (tc.rope == "none" or tc.rope is None and tc.init == "scratch"):
        raise UserError("--rope-factor needs a --rope METHOD other than none")
    if tc.init == "scratch":
        mcfg, tok_files, notes = scratch_model(tc, reading(read_meta, tc.data))
    else:
        mcfg, notes = pretrained_config(tc, hf)
        tok_files = [] if tc.dry_run else checkpoint_files(tc, mcfg, reading(read_meta, tc.data))
    json.dumps(mcfg.to_hf(), allow_nan=False)  # what export writes at the end must be writable now
    rope = mcfg.rope
    tc = replace(tc, seq_len=tc.seq_len or rope.context_length)
    if tc.seq_len <= 0 or tc.seq_len % SEQ_MULTIPLE:
        raise UserError(f"--seq-len (default s*L) must be a positive multiple of {SEQ_MULTIPLE}, got {tc.seq_len}")
    if not tc.dry_run:
        train = reading(PackedData, tc.data, "train")
        if train.num_blocks(tc.seq_len) < 1:
            raise UserError(f"{tc.data}/train.bin holds {len(train)} tokens, fewer than one sequence of {tc.seq_len}")
    check_context_parallel(tc, world)
    if tc.batch_size % (world // tc.cp * tc.micro_batch):
        raise UserError(f"--batch-size {tc.batch_size} is not divisible by world size {world}"
                        f"{f' / --cp {tc.cp}' if tc.cp > 1 else ''} x --micro-batch {tc.micro_batch}")
    scratch = tc.init == "scratch"
    tc = replace(tc, lr=tc.lr if tc.lr is not None else (1e-3 if scratch else 2e-5),
                 lr_schedule=tc.lr_schedule or ("cosine" if scratch else "constant"),
                 activation_checkpointing=tc.activation_checkpointing or ("full" if tc.offload_checkpoints else
                                                                          "selective" if tc.seq_len >= 2048 else "none"))
    for file in tok_files:
        check_side_file(file)
    if tc.warmup > tc.steps:
        notes = notes + [f"note: --warmup {tc.warmup} is longer than --steps {tc.steps}: the learning rate never reaches "
                         f"--lr {tc.lr:g} (it ends at {tc.lr * tc.steps / tc.warmup:.3g})"]
    return tc, mcfg, tok_files, notes


def check_context_parallel(tc, world):
    """--cp N: N divides the world (each data-parallel group is N ranks) and the sequence cuts into 2N
    equal chunks (context_parallel.py's load balance)."""
    if world % tc.cp:
        raise UserError(f"--cp {tc.cp} does not divide the world size {world}: the processes are data-parallel "
                        "groups of --cp each")
    if tc.seq_len % (2 * tc.cp):
        raise UserError(f"--seq-len {tc.seq_len} does not cut into 2 x --cp = {2 * tc.cp} equal chunks")


def scratch_model(tc, meta):
    """--init scratch: the model config of the --n-* flags over the dataset's tokenizer."""
    tok = reading(load_tokenizer, tc.tokenizer or os.path.join(tc.data, meta["tokenizer"]))
    if tok.vocab_size != meta["vocab_size"]:
        raise UserError(f"tokenizer/data vocab mismatch: the tokenizer has {tok.vocab_size} tokens, "
                        f"{tc.data} was tokenized with {meta['vocab_size']}")
    L = tc.original_ctx or (tc.seq_len and int(tc.seq_len / (tc.rope_factor or 1)))
    if not L:
        raise UserError("--init scratch needs --seq-len (or --original-ctx)")
    rope = checked(RopeConfig, method=tc.rope or "none", theta=tc.rope_theta, head_dim=tc.n_embd // tc.n_head,
                   factor=tc.rope_factor or 1.0, original_max_position_embeddings=L)
    return scratch_config(tok, tc.n_layer, tc.n_embd, tc.n_head, tc.n_kv_head, tc.intermediate_size, rope), list(tok.files), []


def scratch_config(tok, n_layer, n_embd, n_head, n_kv_head=None, intermediate_size=None, rope=None):
    """A small Llama for `tok`'s vocabulary: SwiGLU width 8C/3 rounded up to 256 unless given."""
    return LlamaConfig(vocab_size=tok.vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer,
                       intermediate_size=intermediate_size or 256 * math.ceil(8 * n_embd / 3 / 256),
                       num_attention_heads=n_head, num_key_value_heads=n_kv_head or n_head,
                       bos_token_id=tok.bos_id if tok.bos_id >= 0 else None,
                       eos_token_id=tok.eos_id if tok.eos_id >= 0 else None, rope=rope or RopeConfig())


def pretrained_config(tc, hf):
    """--init CHECKPOINT: its config (`hf`, its config.json dict) with the RoPE method of the flags, and notes."""
    base = LlamaConfig.from_hf(hf, where=os.path.join(tc.init, "config.json"))
    notes = []
    if tc.rope is None:  # keep the checkpoint's own method (its L and s may still be overridden)
        if tc.rope_factor is not None and base.rope.method == "none":
            raise UserError("--rope-factor needs a --rope METHOD: this checkpoint uses plain RoPE")
        rope = checked(base.rope.replace, factor=tc.rope_factor or base.rope.factor,
                       original_max_position_embeddings=tc.original_ctx or base.rope.original_max_position_embeddings)
    else:  # a new method scales from the context the model was pretrained at: said in one line unless config.json says it
        L, note = pretraining_context(hf, base.rope)
        rope = checked(RopeConfig, method=tc.rope, theta=base.rope.theta, head_dim=base.head_dim,
                       factor=tc.rope_factor if tc.rope != "none" else 1.0,
                       original_max_position_embeddings=tc.original_ctx or L)
        notes = [n for n in (None if tc.original_ctx else note, replaced_scaling_note(base.rope, rope)) if n]
    return replace(base, rope=rope), notes


def checkpoint_files(tc, mcfg, meta):
    """--init CHECKPOINT's weights, checked from the file headers before anything is allocated, and its
    tokenizer files (or the dataset's, for a checkpoint without one) against the data's vocabulary."""
    with torch.device("meta"):  # no weights, only pickles, or other shapes: fail now, from the file headers
        check_tensors(tc.init, Llama(mcfg).shapes(), mcfg.tie_word_embeddings)
    tok_files = [os.path.join(tc.init, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tc.init, n))]
    for file in tok_files:  # a link out of the checkpoint is refused before anything reads it
        check_side_file(file)
    data_vocab = meta["vocab_size"]
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
    return tok_files


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


def save_interval(tc):
    """--save-every as (steps, seconds): "100" is every 100 steps, "30m" every 30 minutes, "2h" every two
    hours, "0" never (one of the two is None)."""
    value, unit = tc.save_every.strip(), 1
    if value[-1:] in ("m", "h"):
        value, unit = value[:-1], 60 if value[-1] == "m" else 3600
    try:
        n = float(value) if unit > 1 else int(value)
    except ValueError:
        raise UserError(f"--save-every must be a number of steps, or of minutes (30m) or hours (2h), got "
                        f"{tc.save_every!r}") from None
    if not (math.isfinite(n) and n >= 0):
        raise UserError(f"--save-every must be >= 0, got {tc.save_every}")
    return (None, n * unit) if unit > 1 else (n, None)


def shipped(files):
    """(file, its name in the export): a tokenizer under the name readers look for (sample.py, eval.py,
    transformers), whatever it was called on the command line; its side files under their own."""
    def name(f):
        base = os.path.basename(f)
        if base.endswith(".model"):
            return "tokenizer.model"
        return base if base in TOKENIZER_FILES or not base.endswith(".json") else "tokenizer.json"
    return [(f, name(f)) for f in files]
