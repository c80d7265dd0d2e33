"""
Tokenize a text corpus into the packed format the trainer reads, the way the YaRN paper does:
every document is tokenized, followed by EOS, and all documents are concatenated into one flat
array of token ids; the trainer cuts that array into fixed blocks, each starting with BOS.

    # with a model's own tokenizer (a tokenizer.model, a tokenizer.json, or the checkpoint dir)
    python data/prepare.py --input books/ --out data/books --tokenizer path/to/Llama-2-7b-hf
    # train a small sentencepiece BPE tokenizer on the training documents instead
    python data/prepare.py --input a.txt b.txt notes.jsonl --out data/mine --train-tokenizer 4096
    # PG19's parquet files, books of 16k tokens or more only, tokenized by 8 processes
    python data/prepare.py --input pg19/*.parquet --out data/pg19 --tokenizer path/to/Llama-2-7b-hf \
        --min-tokens 16384 --workers 8

Inputs: a .txt file is one document; a directory means every .txt file under it (recursively,
sorted), each one document; a .jsonl file holds one document per line under the key "text"
(--text-key to change it); a .parquet file one document per row in the column "text" (--text-key),
read a row group at a time (needs pyarrow). Documents are split into train/val *by document* (seeded
shuffle); --min-tokens then leaves the short ones out of both, so a document's split never depends on it.

Output, in --out: train.bin, val.bin, a copy of the tokenizer and meta.json, the format data/packed.py
describes (and writes, and reads). --out must be new, empty, or a dataset this command wrote (nothing
else in it), and hold none of the inputs; the new dataset is written whole beside it and swapped in, so
an earlier one stays complete until the new one is.

This command is its flags and one error boundary; the work is in libraries: data/tokenizer.py (load_tokenizer,
train_tokenizer) and data/packed.py (find_documents, split_documents, prepare; read_meta, PackedData).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `common`
from support.common import ArgumentParser, UserError, one_line_errors  # noqa: E402
from data.packed import check_out, find_documents, prepare, split_documents  # noqa: E402


def main(argv=None):
    with one_line_errors():
        run(argv)


def run(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt files, directories of .txt files, .jsonl files, or .parquet files (with pyarrow)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for train.bin, val.bin, meta.json and the tokenizer")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.model, a tokenizer.json, or a checkpoint directory holding one")
    group.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE", help="train a sentencepiece BPE of this size")
    p.add_argument("--text-key", default="text", help="key of the document text in .jsonl lines, its column in .parquet files")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val shuffle and of tokenizer training")
    p.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="leave out the documents of fewer than N tokens (of the tokenizer given, or of the one trained, "
                        "which learns from every training document) from both splits, and say how many; the split is "
                        "made first, so a document's split does not depend on N")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="tokenize in N processes (default 1); the files are the same, byte for byte")
    args = p.parse_args(argv)
    check_ranges(args)
    try:  # before any work: --out is new, empty or a dataset of ours, and holds no input
        check_out(args.out, args.input)
    except ValueError as e:
        raise UserError(str(e)) from None
    docs = find_documents(args.input, args.text_key)
    train, val = split_documents(docs, args.val_fraction, args.seed)
    try:
        meta = prepare(args.out, train, val, args.tokenizer, args.train_tokenizer, args.seed, args.min_tokens,
                       args.workers)
    except (FileNotFoundError, ValueError) as e:  # a failed tokenizer training too (data/packed.py says so)
        raise UserError(str(e))
    except OSError as e:  # --out is a file or read-only, the disk is full: meta.json is not (re)written
        raise UserError(f"cannot write {args.out}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))
    kept_train, kept_val = len(meta["train"]["names"]), len(meta["val"]["names"])
    if args.min_tokens:
        print(f"--min-tokens {args.min_tokens}: left out {len(train) - kept_train} train and {len(val) - kept_val} "
              f"val docs of fewer tokens")
    print(f"{args.out}: {kept_train} train docs, {meta['train']['tokens']:,} tokens; "
          f"{kept_val} val docs, {meta['val']['tokens']:,} tokens; vocab {meta['vocab_size']} ({meta['dtype']})")


def check_ranges(args):
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not 0 <= args.seed < 2**32:  # sentencepiece's seed is an unsigned 32-bit integer
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.min_tokens < 0 or args.workers < 1:
        raise UserError(f"--min-tokens must be >= 0 and --workers >= 1, got {args.min_tokens} and {args.workers}")


if __name__ == "__main__":
    main()  # Ctrl-C: one line and exit code 130 (one_line_errors); an earlier dataset in --out stays whole
