"""
Synthetic passkey documents to mix into a small model's pretraining, so that it learns the task within
its own context L before any extension: the YaRN paper's Llama 2 already could, our 2.4M-parameter
Shakespeare model cannot (a deviation from the paper, meant to make the demo's passkey table measure
something). bench/passkey_learning.py measures whether it does: within five times the demo's pretraining tokens
the model learns the fixed-distance copy inside the key line but not retrieval, so the demo does not mix
these documents in (README, "Why the demo's passkey is 0%"); `data/shakespeare/prepare.py --passkey-docs N`
still can.

Each document has the shape of the evaluation prompt (eval.py, Mohtashami & Jaggi 2023): the task line,
filler, the key line, filler, the question, and here also the answer. What the evaluation asks is never
seen in training:
- other filler: lines of the training plays, where the evaluation repeats "The grass is green. ...";
- other keys: even five-digit numbers, where eval.py draws odd ones.
"""

import random

from eval import KEY_LINE, QUESTION, TASK


def training_key(rng):
    """An even five-digit key: eval.py's keys are odd, so no evaluation key is ever a training key."""
    return 2 * rng.randint(5000, 49999)


def passkey_document(rng, lines, filler_lines):
    """One document: task, filler, key line, filler, question and answer, with `filler_lines`
    consecutive lines of `lines` (a play) as the filler and the key at a uniformly random depth."""
    start = rng.randrange(max(1, len(lines) - filler_lines))
    filler = [line.strip() for line in lines[start:start + filler_lines] if line.strip()]
    cut = rng.randint(0, len(filler))
    key = training_key(rng)
    parts = [TASK, " ".join(filler[:cut]), KEY_LINE.format(key=key), " ".join(filler[cut:]), f"{QUESTION} {key}."]
    return "\n".join(parts)


def passkey_documents(texts, n, filler_lines=(2, 24), seed=0):
    """n documents from the texts (a list of strings), filler lengths uniform in `filler_lines`."""
    rng = random.Random(seed)
    plays = [t.splitlines() for t in texts]
    return [passkey_document(rng, rng.choice(plays), rng.randint(*filler_lines)) for _ in range(n)]
