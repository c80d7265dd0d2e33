"""
The packed dataset format, written and read, the way the YaRN paper packs its data: every document is
tokenized, followed by EOS, and all documents are concatenated into one flat array of token ids; the
trainer cuts that array into fixed blocks, each starting with BOS.

    docs = find_documents(["books/", "notes.jsonl", "pg19.parquet"])   # (name, load) pairs: nothing is held in memory
    train, val = split_documents(docs, 0.05, seed=0)      # by document, so none is in both
    prepare("data/books", train, val, tokenizer="path/to/Llama-2-7b-hf")   # or vocab_size=4096 to train one
    prepare("data/long", train, val, tokenizer="...", min_tokens=16384, workers=8)   # long documents only
    data = PackedData("data/books", "train")              # data.block(i, seq_len), data.documents()

A prepared directory holds:
    train.bin, val.bin  flat token ids, uint16 if the vocabulary fits, else uint32
    tokenizer.model     (or tokenizer.json) a copy of the tokenizer, so the folder stands alone
    meta.json           {"dtype", "vocab_size", "bos_id", "eos_id", "tokenizer",
                         "train": {"tokens", "docs": [[start, end], ...], "names"}, "val": {...}}
                        docs are token offsets into that split's .bin, end exclusive, EOS included.

What guards it: meta.json is written last and every file goes through a temporary name (publish.new_file),
so a folder with a meta.json is always complete; read_meta checks every value of meta.json and PackedData
checks the .bin files against it, each failure a ValueError naming the file (commands make it one line).
"""

import collections
import functools
import json
import multiprocessing
import os
import random
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from support.common import UserError
from support.jsonfile import loads, read_json
from data.tokenizer import load_tokenizer, train_tokenizer
from support.publish import copy_file, new_dir, new_file


# -----------------------------------------------------------------------------
# Documents: (name, load) pairs, where load() returns the text. Nothing is held in memory, so a
# corpus of any size streams through, one document at a time.


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n becomes \n
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:  # a dangling symbolic link, a file unreadable to us
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def read_jsonl_line(path, offset, lineno, text_key):
    with open(path, "rb") as f:
        f.seek(offset)
        line = f.readline()
    try:
        text = loads(line, f"{path}:{lineno}")[text_key]
    except (ValueError, TypeError, KeyError):  # bad JSON, not an object, or no such key
        raise UserError(f"{path}:{lineno}: expected a JSON object with a string under {text_key!r}")
    return string(text, f"{path}:{lineno}", text_key)


def string(text, name, text_key):
    if not isinstance(text, str):  # a number or a list in JSON; a null or bytes in parquet
        raise UserError(f"{name}: {text_key!r} is not a string")
    try:  # JSON's "\ud800" is a lone surrogate: a str Python holds, but no text a tokenizer can encode
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{name}: {text_key!r} holds {text[e.start]!r} at character {e.start}, a lone surrogate: "
                        "not Unicode text") from None
    return text


def parquet_documents(path, text_key, row_group):
    """(name, load) for each row of a .parquet file, named path:row (rows counted from 0, as pyarrow and
    the datasets library count them). row_group(path, group, text_key) gives a row group's texts."""
    metadata = open_parquet(path, text_key).metadata
    docs = []
    for group in range(metadata.num_row_groups):
        first = len(docs)  # the row number of the group's first row
        for i in range(metadata.row_group(group).num_rows):
            name = f"{path}:{first + i}"
            docs.append((name, lambda g=group, i=i, n=name: string(row_group(path, g, text_key)[i], n, text_key)))
    return docs


def open_parquet(path, text_key):
    try:
        import pyarrow.parquet as pq  # optional: only .parquet inputs need it
    except ImportError:
        raise UserError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        f = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path} is not a parquet file ({e})") from None
    if text_key not in f.schema_arrow.names:
        raise UserError(f"{path} has no column {text_key!r}; its columns: {', '.join(f.schema_arrow.names)}")
    return f


def read_row_group(path, group, text_key):
    """The texts of one row group of a .parquet file, the unit pyarrow reads."""
    try:
        return open_parquet(path, text_key).read_row_group(group, columns=[text_key]).column(0).to_pylist()
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: row group {group} cannot be read ({e})") from None


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

    # documents are read in order, so keeping the last row group read serves a .parquet file's rows one
    # group at a time, and bounds the memory to one group
    row_group = functools.lru_cache(maxsize=1)(read_row_group)
    docs = []
    for path in files:
        if path.endswith(".parquet"):
            docs += parquet_documents(path, text_key, row_group)
        elif path.endswith(".jsonl"):
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


def write_split(docs, tok, path, dtype, desc, min_tokens=0, workers=1):
    """Tokenize docs in order, EOS after each, appended to one flat .bin file; a document of fewer than
    min_tokens tokens (EOS not counted) is left out."""
    starts_ends, names, n = [], [], 0
    plain = PlainProgress(desc, len(docs))  # no terminal (a batch job's log): a line a minute instead of the bar
    with new_file(path, "wb") as f:  # a temporary name until the last document is in
        # disable=None: no bar when not a terminal
        for name, ids in tqdm(tokenized(docs, tok, workers), total=len(docs), desc=desc, unit="doc", disable=None):
            plain.update(len(ids))
            if len(ids) < min_tokens:
                continue
            np.append(ids, tok.eos_id).astype(dtype).tofile(f)
            starts_ends.append([n, n + len(ids) + 1])
            names.append(name)
            n += len(ids) + 1
    return {"tokens": n, "docs": starts_ends, "names": names}


class PlainProgress:
    """Where tqdm draws no bar (stderr is no terminal: a batch job's log), a line every `seconds`: documents
    done and tokens, so a log file shows a long run moving."""

    def __init__(self, desc, total, seconds=60.0):
        self.desc, self.total, self.seconds = desc, total, seconds
        self.on = not sys.stderr.isatty()
        self.done, self.tokens, self.last = 0, 0, time.monotonic()

    def update(self, tokens):
        self.done, self.tokens = self.done + 1, self.tokens + tokens
        if self.on and time.monotonic() - self.last >= self.seconds:
            print(f"{self.desc}: {self.done:,}/{self.total:,} documents, {self.tokens:,} tokens", file=sys.stderr,
                  flush=True)
            self.last = time.monotonic()


CHUNK_CHARS = 1 << 20  # a worker's task: about 250k tokens, a fraction of a second, so the hand-offs cost little


def tokenized(docs, tok, workers=1):
    """(name, token ids) of each document, in order. With workers > 1, that many processes tokenize
    chunks of documents while this one reads the next ones and writes: the same ids, in the same order."""
    if workers == 1:
        yield from ((name, encode(tok, load())) for name, load in docs)
        return
    with multiprocessing.Pool(workers, initializer=start_worker, initargs=(tok.files[0],)) as pool:
        pending = collections.deque()  # two chunks a worker at most: Pool.imap would read the corpus ahead into memory
        for chunk in chunks(docs):
            pending.append(([name for name, _ in chunk], pool.apply_async(encode_chunk, ([t for _, t in chunk],))))
            if len(pending) > 2 * workers:
                names, ids = pending.popleft()
                yield from zip(names, ids.get())
        for names, ids in pending:
            yield from zip(names, ids.get())


def chunks(docs):
    """Lists of (name, text) of about CHUNK_CHARS characters, in order (a longer document is a chunk alone)."""
    chunk, size = [], 0
    for name, load in docs:
        chunk.append((name, load()))
        size += len(chunk[-1][1])
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode(tok, text):
    return np.asarray(tok.encode(text), dtype=np.uint32)  # the largest dtype prepare() writes


WORKER_TOKENIZER = None  # in each worker process of tokenized(): its own copy, loaded once by start_worker


def start_worker(tokenizer_path):
    global WORKER_TOKENIZER
    WORKER_TOKENIZER = load_tokenizer(tokenizer_path)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it ends the pool and says one line


def encode_chunk(texts):
    return [encode(WORKER_TOKENIZER, text) for text in texts]


def prepare(out, train_docs, val_docs, tokenizer=None, vocab_size=None, seed=0, min_tokens=0, workers=1, extra=None):
    """Tokenizer, train.bin, val.bin and meta.json in out. Give tokenizer (a path) or vocab_size. Documents
    of fewer than min_tokens tokens are left out of both splits (the tokenizer is trained on all the
    training documents: a length in tokens needs the tokenizer first); workers processes tokenize. `extra`
    ({relative path: text}) is written beside them. All of it goes into a directory staged beside out and
    swapped in when complete (publish.new_dir): a dataset that was there stays whole until then."""
    # 1) the tokenizer first: a bad path or a failed training leaves out as it was
    if tokenizer is None:
        model = trained_tokenizer(train_docs, vocab_size, seed)  # on the training documents only
    else:
        tok = load_tokenizer(tokenizer)  # its BOS and EOS ids inside its vocabulary (load_tokenizer checks)
        if tok.eos_id < 0:
            raise ValueError(f"{tokenizer} has no EOS token, so document ends cannot be marked")
    with new_dir(out) as tmp:
        # 2) the tokenizer file(s), so the folder stands alone
        if tokenizer is None:
            with new_file(os.path.join(tmp, "tokenizer.model"), "wb") as f:
                f.write(model)
            tok = load_tokenizer(os.path.join(tmp, "tokenizer.model"))
        else:
            for src in tok.files:
                copy_file(src, os.path.join(tmp, os.path.basename(src)))
        # 3) the two splits, then meta.json
        dtype = "uint16" if tok.vocab_size <= 65535 else "uint32"
        meta = {
            "dtype": dtype,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "tokenizer": os.path.basename(tok.files[0]),
            "train": write_split(train_docs, tok, os.path.join(tmp, "train.bin"), dtype, "train", min_tokens, workers),
            "val": write_split(val_docs, tok, os.path.join(tmp, "val.bin"), dtype, "val", min_tokens, workers),
        }
        if not (meta["train"]["docs"] or meta["val"]["docs"]):
            raise ValueError(f"every document is shorter than {min_tokens} tokens, the minimum asked")
        for name, text in (extra or {}).items():
            with new_file(os.path.join(tmp, name), "wb") as f:
                f.write(text.encode())
        with new_file(os.path.join(tmp, "meta.json")) as f:
            f.write(json.dumps(meta))  # compact, not write_json's indented form: docs holds two offsets a document
    return meta


def trained_tokenizer(docs, vocab_size, seed):
    """train_tokenizer, with sentencepiece's refusal (a vocabulary too small or too large for the corpus) as a
    ValueError that says the training failed; nothing else is called a failed training."""
    try:
        return train_tokenizer(docs, vocab_size, seed)
    except RuntimeError as e:
        raise ValueError(f"tokenizer training failed: {str(e).strip().splitlines()[-1]}") from None


DATASET_FILES = ("train.bin", "val.bin", "meta.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "heldout")


def check_out(out, inputs):
    """--out of a command that writes a dataset: new, empty, or a dataset of ours (a meta.json, and nothing
    but what prepare writes: an earlier run's), and none of the command's `inputs` inside it. Raises
    ValueError, the one line for the user."""
    out = os.path.realpath(out)  # through symbolic links: an input reached by a link into --out is inside it
    for path in inputs:
        path = os.path.realpath(path)
        if os.path.commonpath([path, out]) == out:
            raise ValueError(f"--input {path} is inside --out {out}: writing the dataset there would replace it")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ValueError(f"cannot write --out {out}: it is a file, not a directory")
    names = [n for n in os.listdir(out) if not (n.startswith(".") and ".tmp-" in n)]  # a crashed run's debris
    if not names:
        return
    try:
        ours = DATASET_FILES + (read_meta(out)["tokenizer"],)
    except (OSError, ValueError):
        raise ValueError(f"--out {out} is not a dataset (no readable meta.json) and not empty: refusing to replace "
                         "what it holds; pick a new or empty directory") from None
    foreign = sorted(n for n in names if n not in ours)
    if foreign:
        raise ValueError(f"--out {out} holds {foreign[0]!r}, which data/prepare.py did not write: refusing to replace "
                         "the folder; pick a new or empty directory")


# -----------------------------------------------------------------------------
# Reading: what the trainer and the evaluation use


DTYPES = {"uint16": 65536, "uint32": 2**32}  # what prepare() writes, and how many ids each holds


def read_meta(dir):
    """meta.json of a prepared dataset, every value checked (ValueError naming the file and key)."""
    if os.path.exists(dir) and not os.path.isdir(dir):
        raise ValueError(f"--data {dir} is a file: give the directory written by data/prepare.py")
    path = os.path.join(dir, "meta.json")
    try:
        meta = read_json(path)
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
