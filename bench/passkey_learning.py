"""
Does a small model pretrained from scratch learn the passkey task? A measurement for the demo (issue 12).

The YaRN paper's passkey numbers need a base model that can already retrieve a key within its own
context L (Llama 2 can). This trains the demo's base model shape on a mix of the corpus and synthetic
passkey documents (data/passkey.py: the paper's prompt shape, the corpus's own lines as filler, even
keys) and follows, every --every steps, what it has learnt:

    repeat  teacher-forced accuracy of the key's second copy in "The pass key is N. Remember it. N is ...":
            a copy from a fixed distance, which relative position alone can do
    first   the answer's first digit after "What is the pass key? The pass key is": a copy from a
            distance that depends on the filler, which needs content-based lookup (an induction head)
    answer  all five answer digits, teacher-forced
    eval@L  `eval.py passkey`'s greedy accuracy (data/passkey.py) at length L on the paper's own prompt
            (other filler, odd keys)

The first three are measured on documents the run never trains on (another seed).

    python data/shakespeare/prepare.py --out /tmp/shk
    python bench/passkey_learning.py --data /tmp/shk                        # the demo's shape, 30% passkey rows
    python bench/passkey_learning.py --data /tmp/shk --passkey-share 1 --filler-lines 0,2 --lr 6e-3 --n-kv-head 6
"""

import argparse
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.packed import PackedData  # noqa: E402
from data.passkey import passkey_accuracy, passkey_document  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402
from support.publish import new_file  # noqa: E402
from rope import RopeConfig  # noqa: E402


def corpus_lines(tok, tokens, rng, n=20):
    """Lines of text to use as filler: n random stretches of the corpus, decoded."""
    out = []
    for _ in range(n):
        j = rng.randrange(max(1, len(tokens) - 20000))
        out.append([line for line in tok.decode(tokens[j:j + 20000].tolist()).splitlines() if line.strip()])
    return out


def passkey_row(tok, rng, lines, filler, length):
    """length + 1 ids: BOS, then passkey documents (each ending with EOS) packed end to end, as prepare.py
    packs them into the train stream."""
    ids = [tok.bos_id]
    while len(ids) < length + 1:
        ids += tok.encode(passkey_document(rng, rng.choice(lines), rng.randint(*filler))) + [tok.eos_id]
    return torch.tensor(ids[:length + 1])


@torch.no_grad()
def copy_accuracy(model, tok, docs):
    """Teacher-forced accuracy of the key line's second copy, of the answer's first digit, of all its digits."""
    hits = np.zeros(3)
    for text in docs:
        ids = [tok.bos_id] + tok.encode(text)
        key = tok.encode(re.findall(r"\d+", text)[-1])  # the answer ends the document
        at = [i for i in range(len(ids)) if ids[i:i + len(key)] == key]  # the key, its copy, the answer
        pred = model(torch.tensor([ids]))[0].argmax(-1).tolist()
        right = [[pred[i + j - 1] == ids[i + j] for j in range(len(key))] for i in at[-2:]]
        hits += [np.mean(right[0]), right[1][0], np.mean(right[1])]
    return hits / len(docs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a prepared dataset (data/prepare.py), its train split and tokenizer")
    p.add_argument("--seq-len", type=int, default=256, help="L, the context of pretraining")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-kv-head", type=int, default=2)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8, help="rows of --seq-len tokens per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (warmup 30 steps, cosine to 10%%)")
    p.add_argument("--passkey-share", type=float, default=0.3, help="fraction of each batch's rows that are passkey documents")
    p.add_argument("--filler-lines", default="2,24", help="LO,HI: lines of filler per passkey document")
    p.add_argument("--every", type=int, default=100, help="measure every this many steps")
    p.add_argument("--probe-docs", type=int, default=50, help="held-out passkey documents for the copy accuracies")
    p.add_argument("--trials", type=int, default=4, help="keys per depth (0, 0.5, 1) for eval@L")
    p.add_argument("--json", default=None, help="write the measurements here")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    tok, train = load_tokenizer(a.data), PackedData(a.data, "train")
    filler = tuple(int(x) for x in a.filler_lines.split(","))
    rng, probe_rng = random.Random(0), random.Random(1)
    tokens = np.asarray(train.tokens)
    lines = corpus_lines(tok, tokens, rng)
    probe = [passkey_document(probe_rng, probe_rng.choice(lines), probe_rng.randint(*filler)) for _ in range(a.probe_docs)]
    cfg = LlamaConfig(vocab_size=train.meta["vocab_size"], hidden_size=a.n_embd, num_hidden_layers=a.n_layer,
                      intermediate_size=256 * math.ceil(8 * a.n_embd / 3 / 256), num_attention_heads=a.n_head,
                      num_key_value_heads=a.n_kv_head,
                      rope=RopeConfig(original_max_position_embeddings=a.seq_len, head_dim=a.n_embd // a.n_head))
    model = Llama(cfg)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    n_blocks, n_passkey = train.num_blocks(a.seq_len), round(a.passkey_share * a.batch)
    print(f"{model.num_params() / 1e6:.2f}M parameters, {a.batch} x {a.seq_len} tokens per step, "
          f"{n_passkey} of {a.batch} rows passkey documents with {filler[0]}-{filler[1]} filler lines\n")
    print("| step | tokens | loss | repeat | first | answer | eval@L | s |\n|---|---|---|---|---|---|---|---|")
    log, t0 = [], time.time()
    for step in range(1, a.steps + 1):
        lr = a.lr * min(1, step / 30) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        rows = [train.block(rng.randrange(n_blocks), a.seq_len) for _ in range(a.batch - n_passkey)]
        rows += [passkey_row(tok, rng, lines, filler, a.seq_len) for _ in range(n_passkey)]
        batch = torch.stack(rows)
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.every == 0 or step == a.steps:
            model.eval()
            repeat, first, answer = copy_accuracy(model, tok, probe)
            with torch.no_grad():
                acc = passkey_accuracy(model, tok, [a.seq_len], [0, 0.5, 1], a.trials, seed=1)[a.seq_len]
            model.train()
            row = dict(step=step, tokens=step * a.batch * a.seq_len, loss=loss.item(), repeat=repeat, first=first,
                       answer=answer, eval_at_L=float(np.mean(list(acc.values()))),
                       eval_at_L_by_depth={str(d): v for d, v in acc.items()}, seconds=time.time() - t0)
            log.append(row)
            print(f"| {step} | {row['tokens'] / 1e6:.2f}M | {row['loss']:.3f} | {repeat:.0%} | {first:.0%} | "
                  f"{answer:.0%} | {row['eval_at_L']:.0%} | {row['seconds']:.0f} |", flush=True)
    if a.json:
        with new_file(a.json) as f:
            json.dump({"args": vars(a), "log": log}, f, indent=1)


if __name__ == "__main__":
    main()
