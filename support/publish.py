"""
How every file and directory of ours is written: aside first, then renamed into place, so that a crash,
a full disk or Ctrl-C never leaves half of one under its real name, and an old one is only ever replaced
by a complete new one. Every writer calls these: checkpoint.save, train.py's export and resumable state,
data/prepare.py's datasets, eval.py's results, tables and plots.

    with new_file("out/ppl.json") as f:          # written to out/.ppl.json.tmp-XXXX, renamed when the block ends
        json.dump(results, f)
    with new_dir("out/llama-yarn") as tmp:       # a directory staged beside the target, swapped in at the end
        save_file(tensors, os.path.join(tmp, "model.safetensors"))

If the block raises, the temporary file or directory is removed and the target is untouched. Renames
within one directory are atomic on POSIX file systems; that is the whole trick.
"""

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile

from support.common import UserError


def temporary_name(path, kind="tmp"):
    """A fresh hidden name beside `path`, in the same directory (so a rename onto path is atomic)."""
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.{kind}-", dir=folder)
    os.close(fd)
    os.remove(tmp)
    return tmp


@contextlib.contextmanager
def new_file(path, mode="w"):
    """`with new_file(path) as f:` a file object on a temporary name beside `path`; when the block ends
    the data is flushed to disk and the file renamed onto `path`. mode "w" (UTF-8 text) or "wb". A symbolic
    link is written through: its target is replaced, the link stays."""
    path = os.path.realpath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600: give the usual mode
        os.replace(tmp, path)
    except OSError as e:  # a full disk in write() or flush() names no file: the one line names ours
        if e.filename is None:
            raise OSError(e.errno, e.strerror, path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with new_file(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def append_lines(path, lines):
    """Append whole lines to a log of ours and wait until they are on disk. A crash can cut only the last line
    short; its reader drops such a line (support/samples.py), so the log holds what was finished."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def save_tensors(tensors, path, metadata=None):
    """safetensors' save_file, with its I/O errors as the OSError they are: a full disk is a SafetensorError
    ("Error while serializing: I/O error: No space left on device (os error 28)"), which no `except OSError`
    of a writer would see."""
    from safetensors.torch import save_file
    try:
        save_file(tensors, path, metadata=metadata)
    except Exception as e:
        io = re.search(r"I/O error: (.*?)(?: \(os error (\d+)\))?$", str(e).strip())
        if type(e).__name__ != "SafetensorError" or not io:
            raise
        code = int(io.group(2)) if io.group(2) else errno.EIO
        raise OSError(code, os.strerror(code) if io.group(2) else io.group(1), path) from None


def copy_file(src, dst):
    with open(src, "rb") as fsrc, new_file(dst, "wb") as fdst:
        shutil.copyfileobj(fsrc, fdst)


@contextlib.contextmanager
def new_dir(path):
    """`with new_dir(path) as tmp:` a new directory beside `path` to write into; when the block ends it
    is put in place of `path` (publish_dir). If the block raises, it is removed and `path` is untouched. A
    symbolic link to a directory (on another disk) is written through: staged beside its target, which is
    replaced; the link stays."""
    path = os.path.realpath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        yield tmp
        publish_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once in place; else the debris of a failure


def stage_dir(tmp):
    """Make the empty staging directory `tmp` (what an earlier crash left there goes first). Several
    processes writing one directory (train.py's ranks) agree on a fixed name and call this on one."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish_dir(tmp, path):
    """Give the finished directory `tmp` the usual permissions and put it in place of `path`. Where the
    system can, the two are exchanged in one atomic step, so `path` is at every instant the old one or the
    new one. Elsewhere, two renames: the old `path` is first moved aside to .NAME.old-XXXX beside it,
    where it stays if the process dies before the second rename."""
    path = os.path.abspath(path)
    mask = umask()
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700 directories and safetensors 0600 files
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), (0o777 if os.path.isdir(os.path.join(tmp, name)) else 0o666) & ~mask)
    if os.path.isdir(path) and exchange_dirs(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old one
        return
    old = temporary_name(path, "old") if os.path.exists(path) else None
    if old:
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def exchange_dirs(a, b):
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2, at_fdcwd, rename_exchange = getattr(libc, "renameat2", None), -100, 2
    return bool(renameat2) and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def move_into(staged, folder, last):
    """Move every file of the complete directory `staged` into `folder`, which holds other things too (so
    it cannot be swapped whole), the file named `last` after all the others, then remove `staged`. A
    reader that trusts `folder` only when `last` is there never sees a mix. Killed halfway, `staged`
    still holds the rest, and calling this again finishes the job."""
    names = sorted(os.listdir(staged), key=lambda n: n == last)
    for name in names:
        os.replace(os.path.join(staged, name), os.path.join(folder, name))
    os.rmdir(staged)


def remove_dir(path):
    """Delete a directory of ours: renamed to a hidden name first, so a half-deleted one never looks real."""
    trash = temporary_name(path, "trash")
    os.rename(path, trash)
    shutil.rmtree(trash)


def check_writable(path, flag):
    """`path` (which may not exist yet) must be a directory we can create files in: checked before
    the work whose result goes there, not after it. Raises UserError naming `flag`."""
    if not path:  # "" is no directory: os.makedirs("") fails only after the work
        raise UserError(f"{flag} is empty: give a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e})") from None


def check_target(path, flag, ours, what, inputs=()):
    """The one rule for a file a command is about to write, checked before the work: `path` is new, or a
    file of ours of the same kind (ours(path) says; `what` names the kind), and never one of the
    command's `inputs`. Anything else (a checkpoint's config.json, a user's picture) is refused in one
    line and stays as it is."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory: give a file name")
    check_writable(os.path.dirname(os.path.abspath(path)), flag)
    if not os.path.exists(path):
        return
    if any(os.path.exists(i) and os.path.samefile(path, i) for i in inputs):
        raise UserError(f"{flag} {path} is an input of this command: refusing to write over it")
    if not ours(path):
        raise UserError(f"{flag} {path} exists and is not {what}: refusing to replace it (give a new name, "
                        "or move it away)")


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
