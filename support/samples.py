"""
eval.py ruler's --save-samples file: one JSON line per sample scored ({method, task, length, index,
input_ids, answers, output_ids, output, score}), so anyone can audit a score; and the run's resumable state:
each batch's lines are appended (publish.append_lines) as soon as they are scored, and `--resume` skips the
samples already there.

    done, append = open_samples("out/ruler.jsonl", resume=True)   # {(method, task, length, index): line}
    append([line, ...])

What guards it: check_samples refuses, before the run, a file that is not such a log (never replaced);
a last line cut short by a crash is dropped (it is decoded again); a broken line elsewhere is a UserError.
"""

import json
import os

from support.common import UserError
from support.publish import append_lines, check_target, new_file

KEYS = ("task", "length", "index", "input_ids", "output_ids", "score")


def is_samples(path):
    """A samples file of ours: empty, or its first line a JSON object with the keys we write."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        return not first or all(k in json.loads(first) for k in KEYS)
    except (OSError, ValueError, TypeError):
        return False


def check_samples(path, resume, inputs=()):
    if resume and not path:
        raise UserError("--resume continues a --save-samples FILE: give the file of the run to resume")
    if path:
        check_target(path, "--save-samples", is_samples, "a samples file of eval.py ruler", inputs)
    if resume and not os.path.exists(path):
        raise UserError(f"--resume: {path} does not exist (nothing to resume; drop --resume to start)")


def read_samples(path):
    """The complete lines of a samples file: a last line cut short by a crash is dropped."""
    with open(path, encoding="utf-8") as f:
        raw = f.read().split("\n")
    lines = []
    for i, text in enumerate(raw):
        if not text:
            continue
        try:
            line = json.loads(text)
            if not all(k in line for k in KEYS + ("method",)):
                raise ValueError
        except (ValueError, TypeError):
            if i == len(raw) - 1:  # no newline after it: the line a crash cut
                break
            raise UserError(f"{path}:{i + 1}: not a line of eval.py ruler --save-samples") from None
        lines.append(line)
    return lines


def open_samples(path, resume):
    """({(method, task, length, index): line} done already, append(lines)): with resume the file's complete lines
    (rewritten without a cut last line), else an empty file."""
    lines = read_samples(path) if resume else []
    with new_file(path) as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    done = {(line["method"], line["task"], line["length"], line["index"]): line for line in lines}
    return done, lambda new: append_lines(path, [json.dumps(line) for line in new])
