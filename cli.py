"""How the scripts end on a user's error, and how they write their outputs: the folder checked before any
work, each file written whole or not at all.

    if __name__ == "__main__":
        cli.run(main, interrupted="interrupted: ...")   # every script's entry point

Each script calls early_ctrl_c(__name__ == "__main__") first thing, before its imports of torch and
the like (seconds): a Ctrl-C there ends in one line too, where Python would print 16-40 lines from
inside the imports.

run() turns a ValueError, an OSError (a missing or unreadable file, a full disk, a folder that cannot be
written) or an ImportError (an optional package not installed) into one line on stderr, "error: ...", exit
status 1, and Ctrl-C into one line, exit status 130 (as a shell reports it); any other exception is a bug and
keeps its traceback. write_atomic() writes a file
through a temporary one renamed into place: a full disk or a Ctrl-C never leaves half a PNG or JSON file, and
the OSError names the file. Standard library only.
"""
import contextlib
import fcntl
import os
import signal
import sys
import uuid
from pathlib import Path


def message(e):
    """One line for exception e: an OSError as "FILE: reason". An error re-raised from a DataLoader worker
    carries the worker's traceback in its message: its last line is the error itself."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
        return f"{where}: {e.strerror}" if where else e.strerror
    text = str(e).strip()
    if "Traceback" in text:
        return text.splitlines()[-1]
    return text or type(e).__name__


def _interrupted_early(signum, frame):
    # NOTE: os.write and os._exit: safe at any point of an import; nothing started needs cleaning up
    os.write(2, b"interrupted while starting: nothing was done\n")
    os._exit(130)


def early_ctrl_c(is_main):
    """Where is_main (the calling script runs as __main__, not imported by another: tune.py imports
    train.py), Ctrl-C from now until run() calls main() ends the process in one line, exit status
    130. Called at the top of a script, before its slow imports. Where Ctrl-C is ignored (`cmd &`),
    it stays ignored."""
    if is_main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_early)


def run(main, interrupted="interrupted"):
    """Call main(); a user's error or Ctrl-C ends the process in one line (see the module docstring).
    A KeyboardInterrupt that carries a message (train.py's says how to resume) prints that message."""
    if signal.getsignal(signal.SIGINT) is _interrupted_early:  # from here on main() handles Ctrl-C
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except (ValueError, OSError, ImportError) as e:
        sys.exit(f"error: {message(e)}")
    except KeyboardInterrupt as e:
        print(str(e) or interrupted, file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT


def writable_folder(path, flag, what="write there"):
    """Create the folder `path` (and its parents) and check a file can be written in it, before any work:
    an OSError becomes one ValueError naming the `flag` -> Path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{flag} {path}: cannot {what} (a file, not a folder, is in the way)") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot {what} ({e.strerror or e})") from None
    return path


def write_atomic(path, write):
    """Write the file `path` (parents created) whole or not at all: write(tmp) fills a temporary file beside it,
    renamed into place -> Path. The temporary name ends in .tmp, so no glob for *.png or *.json sees it: writers
    that choose the format by the suffix must be given it (PIL's format=, matplotlib's format=). On failure the
    temporary file is removed and an OSError with an errno (a full disk) names `path`: "PATH: No space left on
    device"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path, **savefig):
    """A matplotlib figure as the file `path` through write_atomic, in the format of its suffix -> Path."""
    path = Path(path)
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig))


@contextlib.contextmanager
def locked(path, waiting=None):
    """Hold an exclusive flock on the file `path` (created on demand) for the block; the file is removed on
    release, while still held, so a waiter that wakes on a removed file retries on the new one.
    waiting: note printed when another process holds the lock."""
    path = Path(path)
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder vanished (a failed preparation tidied up): try again
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting:
                    print(waiting, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:  # removed by the holder that just released it
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
