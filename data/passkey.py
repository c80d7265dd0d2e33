"""
The passkey task of Mohtashami & Jaggi (2023), which the YaRN paper uses unchanged to test whether a model
retrieves a key hidden deep in its context: the prompt, the keys, the accuracy, and documents to learn it from.

    rng = random.Random(0)
    ids = passkey_prompt(tok, 8192, 0.5, passkey_key(rng, odd=True))       # at most 8192 tokens, key halfway
    acc = passkey_accuracy(model, tok, [4096, 8192], [0, 0.5, 1], trials=10)   # {length: {depth: fraction}}
    docs = passkey_documents(plays, 1000)                                    # training text, even keys

The prompt is five lines: the task, filler ("The grass is green. ..." repeated), the key line, more filler,
and the question; the key line sits after a fraction `depth` of the filler sentences, and as many sentences
as fit make the prompt. Decoding is greedy, and an answer is correct when its first integer is the key.
`eval.py passkey` runs it on a checkpoint. What guards it: passkey_prompt refuses a length too short for
the prompt's fixed lines (a ValueError), and passkey_key keeps evaluation and training keys apart.

Training documents, to mix into a small model's pretraining so that it learns the task within its own
context L before any extension: the YaRN paper's Llama 2 already could, our 2.4M-parameter Shakespeare
model cannot (a deviation from the paper, meant to make the demo's passkey table measure something).
bench/passkey_learning.py measures whether it does: within five times the demo's pretraining tokens the
model learns the fixed-distance copy inside the key line but not retrieval, so the demo does not mix these
documents in (docs/passkey.md); `data/shakespeare/prepare.py --passkey-docs N` still
can. Each document has the shape of the evaluation prompt, and here also the answer; what the evaluation
asks is never seen in training:
- other filler: lines of the training plays, where the evaluation repeats "The grass is green. ...";
- other keys: even five-digit numbers, where the evaluation draws odd ones (passkey_key).
"""

import random
import re
import sys

from tqdm import tqdm

from generation import generate


# ---- the prompt ---------------------------------------------------------------------------------------

# the passkey prompt of Mohtashami & Jaggi (2023), character for character as the YaRN paper uses it
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
PASSKEY_NEW_TOKENS = 8  # enough for " 12345" in digit tokens, and a little more


def passkey_text(n_filler, depth, key):
    """The five lines of the reference prompt: task, filler, key line, filler, question. As in the
    reference, an empty filler is an empty line (depth 0 or 1)."""
    before = round(depth * n_filler)
    lines = [TASK, " ".join([FILLER] * before), KEY_LINE.format(key=key), " ".join([FILLER] * (n_filler - before)),
             QUESTION]
    return "\n".join(lines)


def passkey_prompt(tokenizer, length, depth, key):
    """Token ids (BOS first if any) of the passkey prompt with as many filler sentences as fit in
    `length` tokens (never more), the key line after a fraction `depth` of them."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []

    def ids(n):
        return bos + tokenizer.encode(passkey_text(n, depth, key))

    base, per = len(ids(0)), len(ids(2)) - len(ids(1))  # tokens without filler, and per filler sentence
    if base > length:
        raise ValueError(f"passkey length {length} is too short: the task line, key line and question alone take "
                         f"{base} tokens")
    n = (length - base) // max(per, 1)  # a near guess: tokenization is almost additive
    while n > 0 and len(ids(n)) > length:
        n -= 1
    while len(ids(n + 1)) <= length:
        n += 1
    return ids(n)


def passkey_key(rng, odd):
    """A five-digit key from the random.Random rng: odd ones for the evaluation, even ones for the training
    documents, so no evaluation key is ever a training key."""
    return 2 * rng.randint(5000, 49999) + (1 if odd else 0)


# ---- the measurement ----------------------------------------------------------------------------------

def passkey_accuracy(model, tokenizer, lengths, depths, trials, seed=0):
    """{length: {depth: fraction correct}} over `trials` random keys each, greedy decoding."""
    rng = random.Random(seed)
    if model.cache is None or model.cache.max_len < max(lengths) + PASSKEY_NEW_TOKENS:
        model.setup_cache(1, max(lengths) + PASSKEY_NEW_TOKENS)
    results = {}
    with tqdm(total=len(lengths) * len(depths) * trials, desc="passkey", unit="prompt", leave=False,
              disable=None) as bar:
        for length in lengths:
            results[length] = {}
            for depth in depths:
                correct = 0
                for _ in range(trials):
                    key = passkey_key(rng, odd=True)  # training keys are even: none was seen in training
                    new, _ = generate(model, passkey_prompt(tokenizer, length, depth, key), PASSKEY_NEW_TOKENS,
                                      temperature=0.0, eos_id=tokenizer.eos_id, vocab=tokenizer.vocab_size)
                    correct += first_integer(tokenizer.decode(new)) == key
                    bar.update()
                results[length][depth] = correct / trials
            if not sys.stderr.isatty():  # a batch job's log, where no bar is drawn: a line a length
                print(f"passkey @ {length}: {sum(results[length].values()) / len(depths):.0%} over {len(depths)} "
                      f"depths x {trials} keys", file=sys.stderr, flush=True)
    model.cache = None
    return results


def first_integer(text):
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


# ---- documents to learn the task from -----------------------------------------------------------------

def passkey_document(rng, lines, filler_lines):
    """One document: task, filler, key line, filler, question and answer, with `filler_lines`
    consecutive lines of `lines` (a play) as the filler and the key at a uniformly random depth."""
    start = rng.randrange(max(1, len(lines) - filler_lines))
    filler = [line.strip() for line in lines[start:start + filler_lines] if line.strip()]
    cut = rng.randint(0, len(filler))
    key = passkey_key(rng, odd=False)
    parts = [TASK, " ".join(filler[:cut]), KEY_LINE.format(key=key), " ".join(filler[cut:]), f"{QUESTION} {key}."]
    return "\n".join(parts)


def passkey_documents(texts, n, filler_lines=(2, 24), seed=0):
    """n documents from the texts (a list of strings), filler lengths uniform in `filler_lines`."""
    rng = random.Random(seed)
    plays = [t.splitlines() for t in texts]
    return [passkey_document(rng, rng.choice(plays), rng.randint(*filler_lines)) for _ in range(n)]
