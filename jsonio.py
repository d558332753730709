"""JSON files of results: NaN written as null, number lists on one line, atomic replacement. No torch needed.

    from jsonio import write_json, null_nan
    write_json("runs/IDR/s0/results.json", report)   # a NaN (lesion absent from a test set) becomes null

JSON has no NaN or inf; the results files of this project write null there, and readers take null as NaN.
"""
import json
import math
import re

from cli import write_atomic


def null_nan(obj):
    """NaN / inf -> None, recursively through dicts, lists and tuples."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: null_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [null_nan(v) for v in obj]
    return obj


def _one_line(match):
    return "[" + ", ".join(v.strip() for v in match.group()[1:-1].split(",")) + "]"


def write_json(path, obj):
    """Write obj to path (parents created) through a temporary file renamed into place (cli.write_atomic)."""
    text = json.dumps(null_nan(obj), indent=1, allow_nan=False)
    # one line per list of numbers ("tp": [11 ints]); "[" + newline never occurs inside a JSON string
    text = re.sub(r"\[\n[-+0-9.eE,\s]+\]", _one_line, text)
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))  # a sweep interrupted here leaves no half file
