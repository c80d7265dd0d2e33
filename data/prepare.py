"""
Tokenize a text corpus into the packed format the trainer reads, the way the YaRN paper does:
every document is tokenized, followed by EOS, and all documents are concatenated into one flat
array of token ids; the trainer cuts that array into fixed blocks, each starting with BOS.

    # with a model's own tokenizer (a tokenizer.model, a tokenizer.json, or the checkpoint dir)
    python data/prepare.py --input books/ --out data/books --tokenizer path/to/Llama-2-7b-hf
    # train a small sentencepiece BPE tokenizer on the training documents instead
    python data/prepare.py --input a.txt b.txt notes.jsonl --out data/mine --train-tokenizer 4096

Inputs: a .txt file is one document; a directory means every .txt file under it (recursively,
sorted), each one document; a .jsonl file holds one document per line under the key "text"
(--text-key to change it). Documents are split into train/val *by document* (seeded shuffle).

Output, in --out:
    train.bin, val.bin  flat token ids, uint16 if the vocabulary fits, else uint32
    tokenizer.model     (or tokenizer.json) a copy of the tokenizer, so the folder stands alone
    meta.json           {"dtype", "vocab_size", "bos_id", "eos_id", "tokenizer",
                         "train": {"tokens", "docs": [[start, end], ...], "names"}, "val": {...}}
                        docs are token offsets into that split's .bin, end exclusive, EOS included.
meta.json is written last and every file goes through a temporary name, so a folder with a
meta.json is always complete.

Python API (train.py, eval.py, sample.py): load_tokenizer, Tokenizer, read_meta, PackedData.
"""

import argparse
import io
import json
import os
import random
import shutil
import sys
from contextlib import contextmanager

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `common`
from common import ArgumentParser, UserError, one_line_errors  # noqa: E402

# Special tokens to try, in order, when a tokenizer.json comes without a config that names them.
BOS_TOKENS = ["<s>", "<|begin_of_text|>"]
EOS_TOKENS = ["</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"]


# -----------------------------------------------------------------------------
# Tokenizers: sentencepiece (Llama 2) or Hugging Face tokenizer.json (Llama 3, SmolLM, Qwen)


class Tokenizer:
    """Text <-> ids. encode() adds no BOS/EOS: packing decides where those go."""

    def __init__(self, backend, vocab_size, bos_id, eos_id, files):
        self.backend = backend  # a SentencePieceProcessor or a tokenizers.Tokenizer
        self.vocab_size = vocab_size
        self.bos_id = bos_id  # -1 when the tokenizer has none
        self.eos_id = eos_id
        self.files = files  # what to copy next to a checkpoint or a prepared dataset

    def encode(self, text):
        if isinstance(self.backend, spm.SentencePieceProcessor):
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        ids = [int(i) for i in ids]  # numpy and torch integers are not accepted by either backend
        if isinstance(self.backend, spm.SentencePieceProcessor):
            return self.backend.decode(ids)
        # sentencepiece drops BOS/EOS when decoding; do the same so both backends read alike
        return self.backend.decode(ids, skip_special_tokens=True)


def load_tokenizer(path):
    """A tokenizer.model, a tokenizer.json, or a directory holding one (tokenizer.model preferred)."""
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if path.endswith(".model"):
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model ({e})") from None
        return Tokenizer(sp, sp.get_piece_size(), sp.bos_id(), sp.eos_id(), [path])
    if path.endswith(".json"):
        return load_hf_tokenizer(path)
    raise ValueError(f"{path}: expected a tokenizer.model, a tokenizer.json or a directory")


def load_hf_tokenizer(path):
    try:
        import tokenizers  # optional: only needed for tokenizer.json checkpoints
    except ImportError:
        raise ValueError(f"reading {path} needs the tokenizers package: pip install tokenizers") from None
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception on bad files
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({e})") from None
    folder = os.path.dirname(path)
    bos_id = special_id(tok, folder, "bos", BOS_TOKENS)
    eos_id = special_id(tok, folder, "eos", EOS_TOKENS)
    files = [path]
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        files.append(os.path.join(folder, "tokenizer_config.json"))  # names BOS/EOS when the copy stands alone
    return Tokenizer(tok, tok.get_vocab_size(with_added_tokens=True), bos_id, eos_id, files)


def special_id(tok, folder, kind, candidates):
    """BOS or EOS id of a tokenizer.json: the checkpoint's configs first, then well-known tokens."""
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(folder, name)) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            continue
        value = cfg.get(f"{kind}_token_id")
        if isinstance(value, list) and value:  # Llama 3.1 instruct lists several EOS ids; the first is the base one
            value = value[0]
        if isinstance(value, int):
            return value
        token = cfg.get(f"{kind}_token")  # tokenizer_config.json names the token, as a string or {"content": ...}
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            return tok.token_to_id(token)
    for token in candidates:
        if tok.token_to_id(token) is not None:
            return tok.token_to_id(token)
    return -1  # no such token: PackedData then starts blocks without BOS


def train_tokenizer(docs, vocab_size, seed=0):
    """A sentencepiece BPE in the manner of Llama 2's, trained on the documents; returns the model file."""

    def sentences():
        # sentencepiece learns from short "sentences": we give it lines, cut to 1000 characters so that
        # none exceeds its max_sentence_length (4192 bytes), past which it silently skips a sentence
        for _, load in docs:
            for line in load().splitlines():
                for i in range(0, len(line), 1000):
                    chunk = line[i : i + 1000]
                    if chunk.strip():
                        yield chunk

    spm.set_random_generator_seed(seed)  # sampling the sentences is the only randomness
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # unseen characters become UTF-8 bytes, never <unk>
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Llama 2's ids
        character_coverage=1.0,
        # identity normalisation and kept whitespace: decode(encode(text)) gives back the text exactly
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        # no dummy space before each text: a word at the start of a line then gets the pieces it was
        # trained with (training sentences are lines), and decoding any slice of ids is plain concatenation
        add_dummy_prefix=False,
        split_digits=True,  # as Llama does: numbers are read digit by digit
        input_sentence_size=2_000_000,  # a random sample of sentences is plenty and bounds time and memory
        shuffle_input_sentence=True,
        num_threads=2,  # the result depends on it (it is stored in the model), so it is fixed
        minloglevel=2,  # sentencepiece's training log is long; keep errors only
    )
    return model.getvalue()


# -----------------------------------------------------------------------------
# Documents: (name, load) pairs, where load() returns the text. Nothing is held in memory, so a
# corpus of any size streams through, one document at a time.


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n becomes \n
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")


def read_jsonl_line(path, offset, lineno, text_key):
    with open(path, "rb") as f:
        f.seek(offset)
        line = f.readline()
    try:
        text = json.loads(line)[text_key]
    except (ValueError, TypeError, KeyError):  # bad JSON, not an object, or no such key
        raise UserError(f"{path}:{lineno}: expected a JSON object with a string under {text_key!r}")
    if not isinstance(text, str):
        raise UserError(f"{path}:{lineno}: {text_key!r} is not a string")
    return text


def find_documents(inputs, text_key="text"):
    """All non-empty documents of the inputs, in order, as (name, load) pairs."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()  # os.walk order is the file system's; sort for a reproducible corpus
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".txt")]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"input not found: {path}")
    if not files:
        raise UserError(f"no documents found in {' '.join(inputs)} (directories are searched for .txt files)")

    docs = []
    for path in files:
        if path.endswith(".jsonl"):
            with open(path, "rb") as f:
                offset, lineno = 0, 0
                for line in f:
                    lineno += 1
                    if line.strip():
                        load = lambda p=path, o=offset, n=lineno: read_jsonl_line(p, o, n, text_key)
                        docs.append((f"{path}:{lineno}", load))
                    offset += len(line)
        else:
            docs.append((path, lambda p=path: read_text(p)))
    # reading every document once here costs a pass, but catches bad lines before anything is written
    docs = [(name, load) for name, load in docs if load().strip()]
    if not docs:
        raise UserError(f"all documents in {' '.join(inputs)} are empty")
    return docs


def split_documents(docs, val_fraction, seed):
    """Train/val split by document, so no document is in both; each keeps the input order."""
    n_val = round(len(docs) * val_fraction)
    if val_fraction > 0 and len(docs) >= 2:
        n_val = min(max(n_val, 1), len(docs) - 1)  # at least one val doc, at least one train doc
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


# -----------------------------------------------------------------------------
# Writing


@contextmanager
def atomic_write(path):
    """Write to path.tmp, then rename: a crash never leaves a half file under the real name."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        yield f
    os.replace(tmp, path)


def write_split(docs, tok, path, dtype, desc):
    """Tokenize docs one at a time, EOS after each, appended to one flat .bin file."""
    starts_ends, names, n = [], [], 0
    with atomic_write(path) as f:
        for name, load in tqdm(docs, desc=desc, unit="doc", disable=None):  # disable=None: no bar when not a terminal
            ids = tok.encode(load()) + [tok.eos_id]
            np.asarray(ids, dtype=dtype).tofile(f)
            starts_ends.append([n, n + len(ids)])
            names.append(name)
            n += len(ids)
    return {"tokens": n, "docs": starts_ends, "names": names}


def prepare(out, train_docs, val_docs, tokenizer=None, vocab_size=None, seed=0):
    """Tokenizer, train.bin, val.bin and meta.json in out. Give tokenizer (a path) or vocab_size."""
    # 1) the tokenizer first: a bad path or a failed training leaves out as it was
    if tokenizer is None:
        model = train_tokenizer(train_docs, vocab_size, seed)  # on the training documents only
    else:
        tok = load_tokenizer(tokenizer)
        if tok.eos_id < 0:
            raise ValueError(f"{tokenizer} has no EOS token, so document ends cannot be marked")
    # 2) a stale meta.json would vouch for the half-written files of this run: remove it
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "meta.json")):
        os.remove(os.path.join(out, "meta.json"))
    # 3) the tokenizer file(s) into out, so the folder stands alone
    if tokenizer is None:
        with atomic_write(os.path.join(out, "tokenizer.model")) as f:
            f.write(model)
        tok = load_tokenizer(os.path.join(out, "tokenizer.model"))
    else:
        for src in tok.files:
            dst = os.path.join(out, os.path.basename(src))
            if not (os.path.exists(dst) and os.path.samefile(src, dst)):
                with open(src, "rb") as fsrc, atomic_write(dst) as fdst:
                    shutil.copyfileobj(fsrc, fdst)
    # 4) the two splits, then meta.json last
    dtype = "uint16" if tok.vocab_size <= 65535 else "uint32"
    meta = {
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "tokenizer": os.path.basename(tok.files[0]),
        "train": write_split(train_docs, tok, os.path.join(out, "train.bin"), dtype, "train"),
        "val": write_split(val_docs, tok, os.path.join(out, "val.bin"), dtype, "val"),
    }
    with atomic_write(os.path.join(out, "meta.json")) as f:
        f.write(json.dumps(meta).encode())
    return meta


# -----------------------------------------------------------------------------
# Reading: what the trainer and the evaluation use


DTYPES = {"uint16": 65536, "uint32": 2**32}  # what prepare() writes, and how many ids each holds


def read_meta(dir):
    """meta.json of a prepared dataset, every value checked (ValueError naming the file and key)."""
    if os.path.exists(dir) and not os.path.isdir(dir):
        raise ValueError(f"--data {dir} is a file: give the directory written by data/prepare.py")
    path = os.path.join(dir, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run data/prepare.py first") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is corrupt ({e}): run data/prepare.py again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is corrupt (not a JSON object): run data/prepare.py again")
    missing = [k for k in ("dtype", "vocab_size", "bos_id", "eos_id", "tokenizer", "train", "val") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: run data/prepare.py again")

    def bad(key, what):
        return ValueError(f"{path}: {key} must be {what}, got {meta_value(meta, key)!r}")

    if meta["dtype"] not in DTYPES:
        raise bad("dtype", f"one of {', '.join(DTYPES)}")
    vocab = meta["vocab_size"]
    if not is_int(vocab) or not 1 <= vocab <= DTYPES[meta["dtype"]]:
        raise bad("vocab_size", f"an integer in [1, {DTYPES[meta['dtype']]}] for {meta['dtype']}")
    for key in ("bos_id", "eos_id"):
        if not is_int(meta[key]) or not -1 <= meta[key] < vocab:
            raise bad(key, f"an integer in [-1, {vocab}) (-1: none)")
    if not isinstance(meta["tokenizer"], str) or os.path.basename(meta["tokenizer"]) != meta["tokenizer"] \
            or meta["tokenizer"] in ("", ".", ".."):
        raise bad("tokenizer", "a file name in the dataset directory")
    for split in ("train", "val"):
        s = meta[split]
        if not isinstance(s, dict) or not is_int(s.get("tokens")) or s["tokens"] < 0:
            raise bad(split, 'an object with "tokens" >= 0, "docs" and "names"')
        docs, names = s.get("docs"), s.get("names")
        if not isinstance(docs, list) or not isinstance(names, list) or len(docs) != len(names):
            raise bad(f"{split}.docs", "a list of [start, end] as long as names")
        if not all(isinstance(d, list) and len(d) == 2 and is_int(d[0]) and is_int(d[1])
                   and 0 <= d[0] < d[1] <= s["tokens"] for d in docs):
            raise bad(f"{split}.docs", f"[start, end] token offsets with 0 <= start < end <= {s['tokens']}")
    return meta


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def meta_value(meta, key):
    value = meta
    for k in key.split("."):
        value = value.get(k) if isinstance(value, dict) else None
    return value if len(repr(value)) < 80 else repr(value)[:77] + "..."


class PackedData:
    """One split of a prepared dataset: documents packed end to end, read as fixed blocks."""

    def __init__(self, dir, split):
        self.meta = read_meta(dir)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.split = self.meta[split]
        path = os.path.join(dir, f"{split}.bin")
        dtype = np.dtype(self.meta["dtype"])
        size = os.path.getsize(path) // dtype.itemsize if os.path.exists(path) else -1
        if size != self.split["tokens"]:
            raise ValueError(f"{path} holds {size} tokens, meta.json says {self.split['tokens']}: run data/prepare.py again")
        # a memory map: the OS pages in what is read, so a corpus larger than RAM is fine
        self.tokens = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        self.bos_id = self.meta["bos_id"]
        # one pass over the ids (the OS reads the file at disk speed): an id outside the vocabulary would
        # otherwise surface hours into training as an IndexError in the embedding
        top = int(self.tokens.max()) if size else -1
        if top >= self.meta["vocab_size"]:
            raise ValueError(f"{path} holds token id {top}, outside the vocabulary of {self.meta['vocab_size']} "
                             f"in meta.json: the file is damaged or from another tokenizer; run data/prepare.py again")

    def __len__(self):
        return len(self.tokens)

    def num_blocks(self, seq_len):
        """Complete blocks only; the tail shorter than a block is never read."""
        if self.bos_id >= 0:
            return len(self) // seq_len
        return max(len(self) - 1, 0) // seq_len  # without BOS a block needs one more token of the stream

    def block(self, i, seq_len):
        """seq_len + 1 ids: [BOS] + tokens[i*seq_len : (i+1)*seq_len]; inputs = [:-1], targets = [1:].
        Without a BOS the block is tokens[i*seq_len : (i+1)*seq_len + 1] instead."""
        import torch  # only here: preparing data does not need it, and it is slow to import

        if not 0 <= i < self.num_blocks(seq_len):
            raise IndexError(f"block {i} out of range: {self.num_blocks(seq_len)} blocks of {seq_len} tokens")
        start = i * seq_len
        if self.bos_id >= 0:
            ids = np.concatenate([[self.bos_id], self.tokens[start : start + seq_len]])
        else:
            ids = self.tokens[start : start + seq_len + 1]
        return torch.from_numpy(ids.astype(np.int64))

    def documents(self):
        """(name, token ids ending with EOS) for each document, for per-document evaluation."""
        for name, (start, end) in zip(self.split["names"], self.split["docs"]):
            yield name, np.asarray(self.tokens[start:end])


# -----------------------------------------------------------------------------


def main(argv=None):
    with one_line_errors():
        run(argv)


def run(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".txt files, directories of .txt files, or .jsonl files")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for train.bin, val.bin, meta.json and the tokenizer")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.model, a tokenizer.json, or a checkpoint directory holding one")
    group.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE", help="train a sentencepiece BPE of this size")
    p.add_argument("--text-key", default="text", help="key of the document text in .jsonl lines")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val shuffle and of tokenizer training")
    args = p.parse_args(argv)

    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    docs = find_documents(args.input, args.text_key)
    train, val = split_documents(docs, args.val_fraction, args.seed)
    try:
        meta = prepare(args.out, train, val, args.tokenizer, args.train_tokenizer, args.seed)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e))
    except RuntimeError as e:  # sentencepiece refuses a vocabulary too small or too large for the corpus
        raise UserError(f"tokenizer training failed: {str(e).strip().splitlines()[-1]}")
    except OSError as e:  # --out is a file or read-only, the disk is full: meta.json is not (re)written
        raise UserError(f"cannot write {args.out}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))
    print(f"{args.out}: {len(train)} train docs, {meta['train']['tokens']:,} tokens; "
          f"{len(val)} val docs, {meta['val']['tokens']:,} tokens; vocab {meta['vocab_size']} ({meta['dtype']})")


if __name__ == "__main__":
    main()  # Ctrl-C: one line and exit code 130 (one_line_errors); meta.json is written last
