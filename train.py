"""
Extend the context of a Llama by fine-tuning it with YaRN (or any RoPE method of rope.py), the YaRN
paper's recipe; or pretrain a small Llama from nothing. One CPU, or many GPUs with FSDP2 under torchrun.

    # first, whether it fits: the plan (memory per GPU by part, tokens, disk, time) from config.json alone
    python train.py --init Llama-2-7b-hf --yarn-scale 16 --dry-run --gpus 8 --gpu-memory 80
    # the paper: Llama 2 7B, YaRN s=16 over its L=4096, 400 steps of 64 sequences of s*L = 64k tokens
    torchrun --nproc_per_node 8 train.py --init Llama-2-7b-hf --data data/pg19 --yarn-scale 16 --out out/yarn16
    # past 64k, memory for time: a refused plan names the cheapest switches that fit (README: "Longer than 64k")
    torchrun --nproc_per_node 8 train.py --init Llama-3.1-8B --data data/pg19 --seq-len 131072 --tile-mlp --offload-checkpoints --out out/128k
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
    # preempted (SIGTERM: the step finishes, a checkpoint is written, exit 143) or crashed: the same command plus --resume
    # several machines: torchrun's --nnodes/--rdzv-endpoint, with --out on a file system they all share
    # past 64k tokens: each sequence split over --cp N GPUs (context_parallel.py), here 4 groups of 2
    torchrun --nproc_per_node 8 train.py --init Llama-2-7b-hf --data data/pg19 --yarn-scale 32 --cp 2 --out out/yarn32-128k

--out receives a Hugging Face checkpoint (config.json with the method's rope_scaling and the new
max_position_embeddings, model.safetensors, the tokenizer files) that sample.py, eval.py and
transformers load as is; metrics.jsonl, one line per step; checkpoints/step-N for --resume.

What this file teaches: the paper's recipe, top to bottom: build the model with FSDP2 in torchtitan's
order (build on meta, checkpoint and shard each block, materialise, fill from the checkpoint), the data
order and the learning-rate schedule, one optimizer step, the flat loop, the export; run() strings them
together. What guards it lives beside it, in support/: train_config.py (the flags and their checks), rundir.py
(--out, its lock, the resumable checkpoints), distributed.py (the process group), progress.py (logging), plan.py
(the cost). context_parallel.py, read after this file, splits each sequence over --cp ranks.
"""

import math
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

import context_parallel
from data.packed import PackedData
from model import Llama
from support import distributed, rundir
from support.checkpoint import read_tensors
from support.common import UserError, attention_kernels, one_line_errors
from support.hf_config import widen_tokenizer_config
from support.progress import Progress
from support.train_config import check, check_fits, parse_args, run_plan, save_interval


# ---- 1) the model: built on meta, sharded, materialised, then filled ---------------------------------

def build_model(mcfg, tc, env):
    # 1) on the meta device: no memory is touched, whatever the size; checkpointing and compilation are
    #    per block, the checkpoint inside each block's forward (so a compiled block includes it)
    with torch.device("meta"):
        model = Llama(mcfg)
    shapes = model.shapes()
    model.set_activation_checkpointing(tc.activation_checkpointing, tc.tile_mlp, tc.offload_checkpoints)
    if tc.compile:
        for block in model.model.layers:
            block.compile()
    # 2) FSDP2: each block is one all-gather unit, then the root (embeddings, final norm, head);
    #    bf16 compute on fp32 master weights, gradients reduced in fp32. On one GPU too (a mesh of one):
    #    the bf16 copy of each block's weights then lives only while the block runs, where autocast
    #    would keep a bf16 copy of every weight for the whole step
    #    --cpu-offload: the shards (weights, gradients, so AdamW's state too) live in host memory, each
    #    block's copied in to be gathered and its gradients copied out (FSDP2's CPUOffloadPolicy)
    host = tc.cpu_offload and env.device.type == "cuda"
    if env.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        mesh = init_device_mesh(env.device.type, (env.world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if env.bf16 \
            else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy() if host else OffloadPolicy()
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    # 3) real storage: each rank allocates only its shards (in host memory with --cpu-offload)
    model.to_empty(device="cpu" if host else env.device)
    if mcfg.tie_word_embeddings and not env.fsdp:  # to_empty made two tensors of the tied one
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
        if isinstance(dst, DTensor):  # this rank's slice (of a tensor on the mesh's device: to_local() copies across)
            dst, t = dst.to_local(), distribute_tensor(t, dst.device_mesh, dst.placements, src_data_rank=None).to_local()
        dst.copy_(t)


def allocate(mcfg, tc, env):
    """build_model, with a failed allocation as one line."""
    try:
        return build_model(mcfg, tc, env)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if "alloc" not in str(e) and not isinstance(e, MemoryError):
            raise
        raise UserError(f"cannot allocate the model ({mcfg.num_hidden_layers} layers, width {mcfg.hidden_size}, "
                        f"vocabulary {mcfg.vocab_size}) on {env.device}: {str(e).splitlines()[0]}")


# ---- 2) the data and the schedule ---------------------------------------------------------------------

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


# ---- 3) one step, the loop, the validation loss -------------------------------------------------------

def train_step(model, optimizer, train, order, step, tc, env, amp):
    """One optimizer step over the global batch: each data-parallel rank runs its micro-batches (gradient
    accumulation), FSDP averages the gradients over the ranks, then clip, step, zero. With --cp N the N ranks
    of a group read the same sequences and each keeps its part (context_parallel.inputs_and_targets says why
    the gradients stay the single process's). Returns (mean loss, gradient norm), device tensors: reading
    them would make the host wait for the GPU."""
    dp_rank, dp_world = env.rank // tc.cp, env.world // tc.cp  # ranks g*N .. g*N+N-1 share sequences
    accum = tc.batch_size // (dp_world * tc.micro_batch)
    loss_sum = torch.zeros((), device=env.device)
    for micro in range(accum):
        first = step * tc.batch_size + (dp_rank * accum + micro) * tc.micro_batch  # global sample number
        blocks = torch.stack([train.block(order[g], tc.seq_len) for g in range(first, first + tc.micro_batch)])
        blocks = blocks.to(env.device, non_blocking=True)  # (B, T+1)
        with amp():
            loss = model(*context_parallel.inputs_and_targets(blocks, model.context_parallel)) / accum
        loss.backward()  # FSDP reduce-scatters (averaging over ranks) in each backward
        loss_sum += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if env.world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    return loss_sum, norm


def train_loop(model, optimizer, data, tc, env, start, progress, stop):
    """Steps start..tc.steps: the schedule, a step, its log line; a validation loss every --eval-every
    steps and at the end, a resumable checkpoint every --save-every (steps or minutes), and one at once
    when SIGTERM asks for a stop (`stop`), after which the loop ends. Returns (the last step's log, the
    step it stopped at, or None when it ran to the end)."""
    train, val = data
    order = BlockOrder(train.num_blocks(tc.seq_len), tc.seed)
    # without FSDP (one process on CPU): autocast gives bf16 compute on fp32 weights; FSDP's policy does it otherwise
    amp = (lambda: torch.autocast(env.device.type, torch.bfloat16)) if env.bf16 and not env.fsdp else nullcontext
    save_steps, save_seconds = save_interval(tc)
    log, last_save = None, time.monotonic()
    with attention_kernels(env.device, torch.bfloat16 if env.bf16 else torch.float32):
        for step in range(start, tc.steps):
            t0 = progress.mark()
            lr = get_lr(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, norm = train_step(model, optimizer, train, order, step, tc, env, amp)
            progress.step(step + 1, loss, norm, lr, t0)
            stopping, due = distributed.any_rank([stop.requested,
                                                  bool(save_seconds) and time.monotonic() - last_save >= save_seconds],
                                                 env)
            evaluate_now = not stopping and (step + 1 == tc.steps or tc.eval_every and (step + 1) % tc.eval_every == 0)
            save_now = stopping or due or (save_steps and (step + 1) % save_steps == 0)
            if evaluate_now or save_now:  # the log is complete up to this step before evaluating or saving
                log = progress.flush()
                if evaluate_now:
                    log["val_loss"] = evaluate(model, val, tc, env, amp)
                progress.write(log)
                if save_now:
                    save(model, optimizer, tc, step + 1, env, progress)
                    last_save = time.monotonic()
            if stopping:
                progress.close()
                return log, step + 1
    progress.close()
    return log, None


@torch.no_grad()
def evaluate(model, val, tc, env, amp):
    """Mean loss over the first --eval-blocks validation sequences, spread over the data-parallel ranks
    (with --cp, each rank of a group adds the mean over its part: equal parts, so the sequence's mean)."""
    n = min(tc.eval_blocks, val.num_blocks(tc.seq_len))
    if n == 0:
        return None
    model.eval()
    dp_rank, dp_world = env.rank // tc.cp, env.world // tc.cp
    total = torch.zeros(2, device=env.device)  # (sum of losses, count)
    for i in range(dp_rank, math.ceil(n / dp_world) * dp_world, dp_world):  # same count everywhere: FSDP all-gathers
        block = val.block(i % n, tc.seq_len).to(env.device)
        with amp():
            loss = model(*context_parallel.inputs_and_targets(block[None], model.context_parallel))
        if i < n:
            total += torch.stack([loss.float(), torch.ones((), device=env.device)])
    if env.world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def save(model, optimizer, tc, step, env, progress):
    """A resumable checkpoint (rundir.save_state); a full disk is one line, and the last complete one stays."""
    try:
        rundir.save_state(model, optimizer, tc, step, env)
    except OSError as e:
        progress.bar.close()
        raise UserError(f"cannot write a checkpoint in {tc.out}: {e.strerror or e}; {rundir.kept(tc.out)}")


# ---- 4) the Hugging Face checkpoint -----------------------------------------------------------------

def export(model, mcfg, tc, tok_files, save_dtype, env):
    """Write the Hugging Face checkpoint into --out: first complete in out/.export (weights, config.json,
    tokenizer files), then published into out (rundir.publish_export), config.json last."""
    if dist.is_initialized():  # a collective: every rank sends its shards, rank 0 gets full CPU tensors
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if not env.master:
        return
    with torch.device("meta"):
        plain = Llama(mcfg)
    plain.load_state_dict({k: v.to("cpu", save_dtype) for k, v in state.items()}, assign=True, strict=False)
    if mcfg.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    staged = os.path.join(tc.out, rundir.EXPORT)
    try:
        plain.save_pretrained(staged, extra_files=tok_files)  # exists only complete
        widen_tokenizer_config(os.path.join(staged, "tokenizer_config.json"), mcfg.context_length)
    except OSError as e:  # a full disk before anything is published: the staged copy goes, an earlier export stays
        shutil.rmtree(staged, ignore_errors=True)
        raise UserError(f"cannot export to {tc.out}: {e.strerror or e}; nothing exported; {rundir.kept(tc.out)}")
    rundir.publish_export(tc.out)  # renames only; stopped halfway, the next run on --out finishes it (rundir.claim)


def layout(plan, tc, env, start):
    """The run's shape in one line: processes, micro-steps, sequences per step."""
    groups = f" ({env.world // tc.cp} data-parallel x --cp {tc.cp})" if tc.cp > 1 else ""
    return (f"{plan.params / 1e6:.1f}M parameters, {env.world} process(es){groups} x "
            f"{tc.batch_size // (env.world // tc.cp * tc.micro_batch)} micro-steps x {tc.micro_batch} = "
            f"{tc.batch_size} sequences per step{f', resuming at step {start}' if start else ''}")


# ---- main: check, claim --out, build, resume, train, export ------------------------------------------

def main(argv=None):
    with one_line_errors(), ExitStack() as cleanup:  # what main holds (the lock on --out) is let go however it ends
        code = run(argv, cleanup)
    if code:  # 143: stopped by SIGTERM, as a process killed by it would report
        sys.exit(code)


def run(argv, cleanup):
    tc = parse_args(argv, __doc__)
    env = distributed.environment(tc.device, tc.dtype)       # 1) who we are: rank, world, device
    tc, mcfg, tok_files, save_dtype, notes = check(tc, env)  # 2) every flag and file, before any memory is set up
    plan = run_plan(tc, mcfg, env, save_dtype)              # 3) what it will cost: printed, and must fit
    if env.master:
        print("\n".join(notes + [plan.text()]), flush=True)
    if tc.dry_run or env.device.type == "cuda" and tc.fit_check:
        check_fits(plan)
    if tc.dry_run:
        return 0
    stop = distributed.StopRequest(cleanup)                 # SIGTERM: finish the step, checkpoint, exit
    distributed.start(env, cleanup)                         # 4) the process group (gloo on CPU, nccl on CUDA)
    cp = context_parallel.setup(tc.cp, tc.seq_len, env)     #    with --cp N, the groups of N sharing a sequence
    rundir.claim(tc, env, cleanup)                          #    and --out, locked for this run
    model = allocate(mcfg, tc, env)                         # 5) model, optimizer, data
    context_parallel.enable(model, cp)
    on_gpu = env.device.type == "cuda" and not tc.cpu_offload  # where AdamW's state and step are
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay,
                                  fused=on_gpu, foreach=None if on_gpu else True)
    data = PackedData(tc.data, "train"), PackedData(tc.data, "val")
    start = rundir.resume(model, optimizer, tc, env)
    if env.master:
        print(layout(plan, tc, env, start), file=sys.stderr)
    progress = Progress(tc, env, start, plan.flops_per_token, plan.peak_flops if env.device.type == "cuda" else None)
    log, stopped = train_loop(model, optimizer, data, tc, env, start, progress, stop)   # 6) the loop
    if stopped:
        if env.master:
            print(f"stopped by SIGTERM after step {stopped}: a checkpoint is in {tc.out}/checkpoints; the same "
                  "command with --resume continues", file=sys.stderr)
    else:
        export(model, mcfg, tc, tok_files, save_dtype, env)                  # 7) the Hugging Face checkpoint
        if env.master:
            val_loss = log["val_loss"] if log else None
            print(f"wrote {tc.out}" + (f"; final val loss {val_loss:.4f}" if val_loss is not None else "") +
                  rundir.left_behind(tc.out), file=sys.stderr)
    if dist.is_initialized():
        distributed.finish()                                # every rank done: the process group ends
    return 128 + signal.SIGTERM if stopped else 0


if __name__ == "__main__":
    distributed.run_and_exit(main)
