"""What every script shares: one-line errors, files written whole, JSON results, the device.
Standard library only (torch is imported where a function needs it): report.py and --help stay fast.

    utils.start(__name__, build_parser)       # atop a script, before torch: --help answers at once
    utils.run(main)                           # its entry point: errors in one line, Ctrl-C: 130
    utils.write_json("results.json", report)  # atomic; NaN written as null

run() turns a ValueError, an OSError (a missing or unreadable file, a full disk, a folder that
cannot be written) or an ImportError (an optional package not installed) into one line on stderr,
"error: ...", exit status 1, and Ctrl-C into one line, exit status 130 (as a shell reports it); any
other exception is a bug and keeps its traceback. write_atomic() writes through a temporary file
renamed into place: a full disk or a Ctrl-C never leaves half a PNG or JSON file; the OSError names
the file.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import signal
import sys
import uuid
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")  # --dtype choices: autocast (float16 adds a GradScaler)


# ---- one line per error --------------------------------------------------------------------------
def message(e):
    """The line a script ends with for exception e: an OSError as "FILE: reason". An error re-raised
    from a DataLoader worker carries the worker's traceback in its message: its last line is it."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
        return f"{where}: {e.strerror}" if where else e.strerror
    text = str(e).strip()
    if "Traceback" in text:
        return text.splitlines()[-1]
    return text or type(e).__name__


def reason(e):
    """Why something failed, as a short phrase inside our own message: the root cause's type and the
    first sentence of its text ("ConnectError: [Errno 111] Connection refused")."""
    # the root cause: e.g. huggingface_hub's LocalEntryNotFoundError raised from a ConnectError
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _interrupted_early(signum, frame):
    # NOTE: os.write and os._exit: safe at any point of an import; nothing started needs cleaning up
    os.write(2, b"interrupted while starting: nothing was done\n")
    os._exit(130)


def start(name, build_parser=None):
    """Call at the top of a script, before its slow imports (torch: seconds), with its __name__:
    run as __main__ (not imported, as tune.py imports train.py), --help is answered at once from
    build_parser(), and a Ctrl-C until run() calls main() ends the process in one line, exit status
    130. Where Ctrl-C is ignored (`cmd &`), it stays ignored."""
    if name != "__main__":
        return
    if build_parser is not None and {"-h", "--help"} & set(sys.argv[1:]):
        build_parser().parse_args()  # prints the help (of a subcommand too) and exits
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_early)


def run(main, interrupted="interrupted"):
    """Call main(); a user's error or Ctrl-C ends the process in one line (the module docstring).
    A KeyboardInterrupt that carries a message (train.py's says how to resume) prints it."""
    if signal.getsignal(signal.SIGINT) is _interrupted_early:  # from here on main() handles Ctrl-C
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except (ValueError, OSError, ImportError) as e:
        sys.exit(f"error: {message(e)}")
    except KeyboardInterrupt as e:
        print(str(e) or interrupted, file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT


class Parser(argparse.ArgumentParser):
    """argparse whose errors (a bad or missing flag, a value out of range) are one ValueError naming
    the flag, which run() prints as one `error:` line like any user error (not usage + exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise ValueError(message)

    def parse_known_args(self, args=None, namespace=None):
        # a flag whose check needs the other flags (data.flags.DatasetList: --root) checks here
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if hasattr(action, "after_parse"):
                action.after_parse(namespace)
        return namespace, extras


def check_range(kind, low=None, high=None, low_open=False, what=None):
    """An argparse type= that converts with `kind` and checks low <= value (< if low_open) <= high:
    `type=check_range(float, 0, low_open=True)` for a positive number. NaN is always refused."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {what or kind.__name__}, got {text!r}") from None
        if value != value or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and value > high):  # value != value: NaN
            bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
                      f"<= {high}" if high is not None else ""]
            raise argparse.ArgumentTypeError(
                f"must be {' and '.join(b for b in bounds if b)}, got {text}")
        return value
    convert.__name__ = what or kind.__name__  # argparse names the type in its messages
    return convert


# ---- files written whole -------------------------------------------------------------------------
def writable_folder(path, flag, what="write there", room=0):
    """Create the folder `path` (and its parents) and check that `room` bytes can be written in it,
    before any work: an OSError becomes one ValueError naming the `flag` -> Path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        try:
            probe.write_bytes(b"\0" * room)  # a full disk fails here, not after the work
        finally:
            probe.unlink(missing_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(
            f"{flag} {path}: cannot {what} (a file, not a folder, is in the way)") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot {what} ({e.strerror or e})") from None
    return path


def write_atomic(path, write):
    """Write the file `path` (parents created) whole or not at all: write(tmp) fills a temporary
    file beside it, renamed into place -> Path. NOTE: the temporary name ends in .tmp, so no glob
    for *.png or *.json sees it: writers that choose the format by the suffix must be given it
    (PIL's format=, matplotlib's format=). On failure the temporary file is removed and an OSError
    with an errno (a full disk) names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is None:  # not an I/O error (no errno to keep): re-raised as it is
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path, **savefig):
    """A matplotlib figure as the file `path` (write_atomic), in its suffix's format -> Path."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig))


@contextlib.contextmanager
def locked(path, waiting=None):
    """Hold an exclusive flock on the file `path` (created on demand) for the block; the file is
    removed on release, while still held, so a waiter that wakes on a removed file retries on the
    new one. waiting: a note printed when another process holds the lock."""
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
            if os.path.samestat(os.fstat(fd), os.stat(path)):  # still the file at `path`: ours
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


# ---- JSON results: NaN written as null, number lists on one line ---------------------------------
def null_nan(obj):
    """NaN / inf -> None, through dicts, lists and tuples (JSON has no NaN; readers read null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: null_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [null_nan(v) for v in obj]
    return obj


def _numbers_on_one_line(match):
    return "[" + ", ".join(v.strip() for v in match.group()[1:-1].split(",")) + "]"


def write_json(path, obj):
    """Write obj to path (parents created) through a temporary file renamed into place."""
    text = json.dumps(null_nan(obj), indent=1, allow_nan=False)
    # one line per list of numbers ("tp": [11 ints]); "[" + newline never occurs in a JSON string
    text = re.sub(r"\[\n[-+0-9.eE,\s]+\]", _numbers_on_one_line, text)
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))  # interrupted: no half file


# ---- the device ----------------------------------------------------------------------------------
def default_device():
    import torch  # noqa: PLC0415 (here: report.py and --help never load torch)

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name):
    """--device value -> torch.device; a one-line ValueError when it is unknown or absent here."""
    import torch  # noqa: PLC0415

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here; pass --device cpu")
    if (device.type == "cuda" and device.index is not None
            and device.index >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are "
                         f"visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; pass --device cpu")
    return device


def torch_dtype(name):
    """--dtype name (DTYPES) or a torch.dtype -> the torch.dtype; one-line ValueError otherwise."""
    import torch  # noqa: PLC0415

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)
