"""
eval.py's flag checks, kept out of the lesson: the parsers of --lengths, --depths and --rope METHOD:FACTOR, the
checks of each task's own flags (one line and exit code 2 for a mistake, before any weights are read), and
the note of how many documents ppl scores.

    lengths = int_list("4096,8192")          # argparse type=: sorted, no duplicates, each in [2, 2^24]
    check_task_flags(args)                   # ppl's --stride/--max-docs/--max-tokens, passkey's --trials, ruler's
"""

import argparse

from support.common import MAX_POSITIONS, UserError, note


def int_list(s):
    try:
        values = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not values or min(values) < 2 or max(values) > MAX_POSITIONS:
        raise argparse.ArgumentTypeError(f"expected lengths in [2, {MAX_POSITIONS}], got {s!r}")
    return sorted(set(values))


def float_list(s):
    try:
        values = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"depths are fractions in [0, 1], got {s!r}")
    return sorted(set(values))


def parse_rope_spec(spec, default_factor):
    """'yarn:8' -> ('yarn', 8.0); 'dynamic-yarn' -> ('dynamic-yarn', default_factor)."""
    method, _, factor = spec.partition(":")
    if not factor:
        return method, default_factor
    try:
        return method, float(factor)
    except ValueError:
        raise UserError(f"--rope {spec}: the factor after ':' must be a number") from None


def check_task_flags(args):
    """The flags of ppl, passkey or ruler that need nothing read to be checked."""
    lengths = args.lengths
    if args.task == "ppl":
        if args.stride is not None and not 1 <= args.stride < lengths[0]:
            raise UserError(f"--stride must be at least 1 and less than the shortest length {lengths[0]}, got "
                            f"{args.stride}")
        if args.max_docs is not None and args.max_docs < 1:
            raise UserError(f"--max-docs must be >= 1, got {args.max_docs}")
        if args.max_tokens is not None and args.stride is None:
            raise UserError("--max-tokens applies to --stride windows (without it documents are truncated to each "
                            "length)")
        if args.max_tokens is not None and args.max_tokens < lengths[-1]:
            raise UserError(f"--max-tokens must be at least the longest length {lengths[-1]}, got {args.max_tokens}")
    elif args.task == "passkey" and args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    elif args.task == "ruler":
        check_ruler_flags(args)


def check_ruler_flags(args):
    from data.ruler import TASKS
    from support.samples import check_samples
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise UserError(f"--tasks: unknown task {unknown[0]!r}; RULER's are {', '.join(TASKS)}")
    if args.samples < 1 or args.batch_size < 1:
        raise UserError(f"--samples and --batch-size must be >= 1, got {args.samples} and {args.batch_size}")
    needs = [t for t in args.tasks if TASKS[t].needs_haystack]
    if needs and not args.haystack:
        raise UserError(f"--haystack FILE is needed by {', '.join(needs)} (RULER's essays; or leave them out of "
                        "--tasks)")
    check_samples(args.save_samples, args.resume, inputs=(args.haystack or []) + (args.qa_file or []))


def note_documents(docs, chosen, per_length):
    """How many documents ppl scores, and how many are too short: one line, or one per length."""
    for n in chosen if per_length else [max(chosen)]:
        usable = sum(len(ids) >= n for _, ids in docs)
        if not usable:
            note(f"warning: length {n}: no document has {n} tokens; skipped")
            continue
        what = f"length {n}: {len(chosen[n])} documents" if per_length else \
            f"{len(chosen[n])} documents of at least {n} tokens, each scored at every length"
        note(what + (f" ({len(docs) - usable} shorter ones skipped)" if usable < len(docs) else ""))
