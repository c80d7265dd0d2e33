"""
What the commands (train.py, sample.py, eval.py) share: one exception type for the user's mistakes and
the boundary that turns it into one line, the device and dtype, and the RoPE method asked on the
command line. Read it after model.py: it teaches how a command stays quiet about its own plumbing.

    from support.common import UserError, one_line_errors
    def main(argv=None):
        with one_line_errors():   # UserError -> "error: ..." and exit code 2; Ctrl-C -> exit code 130
            ...

A bug is not a UserError: it keeps its traceback.
"""

import argparse
import contextlib
import errno
import os
import sys

import torch

from rope import DYNAMIC_METHODS, MAX_POSITIONS, METHODS  # noqa: F401 (MAX_POSITIONS: the commands' bound on --ctx)


class UserError(Exception):
    """A mistake in what the user gave (a flag, a file, a checkpoint); the message is one line meant for them."""


@contextlib.contextmanager
def one_line_errors():
    """A command's one error boundary: a UserError is one line on stderr (from rank 0 only under torchrun)
    and exit code 2, never a traceback; Ctrl-C is one line and exit code 130 (the shell's code for SIGINT)."""
    try:
        yield
    except UserError as e:
        print0(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        print0("interrupted")
        sys.exit(130)
    except BrokenPipeError:  # `| head`: the reader is gone; end quietly, as a Unix tool killed by SIGPIPE
        quiet_stdout()
        sys.exit(128 + 13)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        quiet_stdout()  # stdout may be the full file: nothing more goes there
        print0(f"error: cannot write {e.filename or 'the output'}: {e.strerror}")
        sys.exit(2)


def quiet_stdout():
    """Point stdout at /dev/null, so that the interpreter's last flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (a test's capture): nothing to flush there
        pass


def check_seed(seed, flag="--seed"):
    if not 0 <= seed < 2**63:
        raise UserError(f"{flag} must be in [0, 2^63), got {seed}")


def print0(msg):
    """A line on stderr, from rank 0 only: under torchrun every rank runs the same checks."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, file=sys.stderr, flush=True)


def note(msg):
    print(msg, file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors as a UserError too (one line, instead of the usage text --help shows), and
    help that shows each flag's default once."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; "(default: X)" after a flag's help, unless the help already says its
    default or there is none to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or \
                not action.option_strings:  # `is`: a default of 0 is shown (0 == False)
            return text
        return text + " (default: %(default)s)"


# ---- the flags every command shares: one vocabulary ------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # the long spellings, accepted too


def dtype_flag(value):
    """--dtype: auto, bf16, fp16, fp32 (or bfloat16, float16, float32), as the short name."""
    name = DTYPE_NAMES.get(value, value)
    if name != "auto" and name not in DTYPES:
        raise argparse.ArgumentTypeError(f"choose auto, bf16, fp16 or fp32 (or bfloat16, float16, float32), "
                                         f"got {value!r}")
    return name


def add_engine_flags(parser, what="weights and KV cache"):
    """--device and --dtype, the same in every command."""
    parser.add_argument("--device", default="auto", metavar="auto|cuda|cpu",
                        help="where to run: cuda (or cuda:N), cpu; auto: cuda if there is one (default: auto)")
    parser.add_argument("--dtype", default="auto", type=dtype_flag, metavar="auto|bf16|fp16|fp32",
                        help=f"{what} dtype; auto: bf16 on CUDA, fp32 on CPU (default: auto)")


def add_rope_flags(parser, repeatable=False):
    """--rope METHOD, --rope-factor S, --yarn-scale S (= --rope yarn --rope-factor S), --original-ctx L: the same
    in every command (eval.py's --rope takes METHOD:FACTOR too, and repeats: one row per method)."""
    if repeatable:
        parser.add_argument("--rope", action="append", default=None, metavar="METHOD[:S]",
                            help="RoPE method, with its factor after a colon, repeatable: one table row each "
                                 f"(default: model, the checkpoint's own; methods: {', '.join(METHODS)})")
    else:
        parser.add_argument("--rope", default="model", metavar="METHOD",
                            help=f"RoPE method in place of the checkpoint's: model (its own), {', '.join(METHODS)}")
    parser.add_argument("--rope-factor", type=float, default=None, metavar="S",
                        help="scale s of --rope: the new context is s*L (default: the longest length asked / L for "
                             "static methods, 1 for dynamic ones)")
    parser.add_argument("--yarn-scale", type=float, default=None, metavar="S",
                        help="the same as --rope yarn --rope-factor S")
    parser.add_argument("--original-ctx", type=int, default=None, metavar="L",
                        help="L, the context the checkpoint was pretrained at, which a --rope METHOD scales from "
                             "(default: its config.json's, said in one line when it names none)")


def yarn_scale(args):
    """--yarn-scale S into --rope yarn --rope-factor S (one or the other)."""
    if args.yarn_scale is None:
        return
    ropes = args.rope if isinstance(args.rope, list) else [args.rope]
    if any(r not in (None, "model", "yarn") for r in ropes) or args.rope_factor not in (None, args.yarn_scale):
        raise UserError("--yarn-scale S means --rope yarn --rope-factor S: give one or the other")
    args.rope = "yarn" if isinstance(args.rope, str) else ["yarn"]  # eval.py's --rope is a list (one row a method)
    args.rope_factor = args.yarn_scale


# ---- device, dtype ------------------------------------------------------------------------------------

def pick_device(name=None):
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:  # a name torch does not know
        raise UserError(str(e)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here")
    return device


def pick_dtype(name, device):
    if name in (None, "auto"):  # bf16 where it is fast and flash attention wants it, fp32 on CPU
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[DTYPE_NAMES.get(name, name)]


def attention_kernels(device, dtype):
    """The attention kernels of every command (train.py, sample.py, eval.py). On CUDA in bf16/fp16: flash
    attention (which also does grouped-query attention), then memory-efficient attention, and no fallback to
    the math kernel, which would materialise (T, T) attention weights: a case neither can handle then fails
    loudly instead of silently using memory quadratic in the context. (fp32 has no flash kernel: any.)"""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], set_priority=True)


# ---- the RoPE method of --rope ------------------------------------------------------------------------

def rope_config(base, method="model", factor=None, target_len=None, L=None):
    """The RopeConfig for `method` on a checkpoint whose own is `base`: "model" keeps the checkpoint's
    (with `factor` if given), "none" is plain RoPE; any other method of rope.py keeps the checkpoint's
    theta. L (default: the checkpoint's) is the original context it scales from. Static methods default
    to factor target_len / L, so they reach the context asked for; dynamic ones to 1 (they scale with the
    text). Raises UserError."""
    L = L or base.original_max_position_embeddings
    if method == "model":
        if factor is not None and base.method == "none":
            raise UserError("--rope-factor needs a --rope METHOD: this checkpoint uses plain RoPE")
        if factor is None and L == base.original_max_position_embeddings:
            return base
        return checked(base.replace, factor=float(factor or base.factor), original_max_position_embeddings=L)
    if method not in METHODS:
        raise UserError(f"unknown RoPE method {method!r}; choose model or one of {', '.join(METHODS)}")
    fresh = dict(attention_factor=None, mscale=None, mscale_all_dim=None, original_max_position_embeddings=L)
    if method == "none":
        return base.replace(method="none", factor=1.0, **fresh)
    if factor is None:
        factor = 1.0 if method in DYNAMIC_METHODS or target_len is None else max(1.0, target_len / L)
        if method not in DYNAMIC_METHODS and factor == 1.0:  # the lengths fit in L: the method changes nothing
            note(f"note: --rope {method} without a factor: s = the longest length / L = 1 (every length fits in "
                 f"L={L}), which is plain RoPE; give {method}:S (or --rope-factor S) for another s")
    return checked(base.replace, method=method, factor=float(factor), **fresh)


def checked(replace, **kw):
    """rope.py checks every value it is given (ValueError): here those values came from the user."""
    try:
        return replace(**kw)
    except ValueError as e:
        raise UserError(str(e)) from None


def describe(rope):
    """A short label: 'yarn s=8 (L=4096)', 'dynamic-yarn (L=4096)', 'none (L=4096)'."""
    s = "" if rope.method in ("none", "dynamic-yarn") or (rope.is_dynamic and rope.factor == 1) \
        else f" s={rope.factor:g}"
    return f"{rope.method}{s} (L={rope.original_max_position_embeddings})"


def reading(fn, *args, prefix=""):
    """fn(*args), a reader of files the user named (data/prepare.py's tokenizer and dataset readers,
    a prompt file): the ValueError or OSError it raises for a missing or damaged file is the user's,
    and becomes a UserError. Only around such calls, so a bug elsewhere keeps its traceback."""
    try:
        return fn(*args)
    except (ValueError, OSError) as e:
        raise UserError(f"{prefix}{e}") from None
