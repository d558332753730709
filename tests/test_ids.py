"""data/ids.py: dataset IDs and run names, the labelling styles of style conditioning; and the lazy
data package (data/__init__.py): the IDs load neither numpy nor torch.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_ids.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.ids import DATASET_IDS, combo_name, parse_dataset_ids, style_tokens

ROOT = Path(__file__).resolve().parents[1]


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_dataset_ids_and_combo_names():
    assert parse_dataset_ids("MES,idr") == ["IDR", "MES"]
    assert combo_name(["MES", "IDR", "MES"]) == "IDR+MES"
    # an ID of one's own (2-8 capital letters or digits) comes after the five; 'all' is the five
    assert parse_dataset_ids("abc,MES,idr,AB2") == ["IDR", "MES", "AB2", "ABC"]
    assert parse_dataset_ids(" All ") == list(DATASET_IDS)
    for text, own in (("IDR,X", True), ("IDR,ABC", False), ("IDR,TOOLONG99", True)):
        with pytest.raises(ValueError) as err:
            parse_dataset_ids(text, own=own)
        msg = one_line(err)
        bad = text.split(",")[1]
        assert f"'{bad}'" in msg and "IDR, DDR, FGA, RET, MES" in msg, msg  # the ID and the choices


def test_style_tokens_of_ones_own_dataset_from_its_dataset_json():
    # data.datasets.own_styles reads dataset.json "style"; without one: one line saying what to do
    assert style_tokens("style", ["IDR", "ABC"], own={"ABC": "coarse"}) == (
        ("fine", "coarse"), ("fine", "coarse"), {"IDR": 0, "ABC": 1})
    with pytest.raises(ValueError) as err:
        style_tokens("dataset", ["IDR", "ABC"])
    msg = one_line(err)
    assert "ABC" in msg and '"style"' in msg and "--characterize" in msg, msg


def test_style_tokens_from_the_table_and_from_characterize_json(tmp_path):
    assert style_tokens("off", ["IDR", "RET"]) == ((), (), {})
    assert style_tokens("style", ["IDR", "DDR", "RET", "MES"]) == (
        ("fine", "coarse"), ("fine", "coarse"), {"IDR": 0, "DDR": 0, "RET": 1, "MES": 0})
    assert style_tokens("dataset", ["IDR", "FGA", "RET"]) == (
        ("IDR", "FGA", "RET"), ("fine", "mixed", "coarse"), {"IDR": 0, "FGA": 1, "RET": 2})
    # characterize.py's format: {"datasets": {ID: {"style": ...}}}
    path = tmp_path / "characterize.json"
    path.write_text(json.dumps({"datasets": {"IDR": {"style": "coarse"}, "RET": {"style": "fine"},
                                             "MES": {"style": "undetermined"}}}))
    assert style_tokens("style", ["IDR", "RET"], path) == (
        ("fine", "coarse"), ("fine", "coarse"), {"IDR": 1, "RET": 0})
    with pytest.raises(ValueError) as err:
        style_tokens("style", ["IDR", "MES"], path)
    msg = one_line(err)
    assert str(path) in msg and "MES" in msg and "'undetermined'" in msg, msg
    with pytest.raises(ValueError) as err:
        style_tokens("style", ["DDR"], path)
    msg = one_line(err)
    assert str(path) in msg and "DDR" in msg and "None" in msg, msg
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError) as err:
        style_tokens("style", ["IDR"], missing)
    msg = one_line(err)
    assert "--characterize" in msg and str(missing) in msg, msg


# The data package loads a module on first use of one of its names (PEP 562): scripts that only need
# the IDs or the flags (--help, the Makefile's combos) must not pay for numpy or torch.
@pytest.mark.parametrize("statement", ["import data.ids", "import data.flags",
                                       "from data.ids import LESIONS"])
def test_ids_and_flags_load_neither_numpy_nor_torch(statement):
    loaded = "sorted(m for m in ('numpy', 'torch') if m in sys.modules)"
    code = f"import sys\n{statement}\nprint({loaded})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", (statement, done.stdout)


def test_data_package_names_still_work():
    import data
    from data import prepare_cache  # each loads its module on first use
    found = data.PreparedDataset
    import data.cache
    import data.prepare
    assert prepare_cache is data.prepare.prepare_cache and found is data.cache.PreparedDataset
    for name in data.__all__:  # every name the package offers is found in the module it names
        getattr(data, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        data.no_such_name


def test_parse_lesions_canonical_order_and_errors():
    from data import parse_lesions

    assert parse_lesions("he,ex") == ("EX", "HE")
    assert parse_lesions("MA+CWS") == ("MA", "CWS")
    with pytest.raises(ValueError, match="'SE'"):  # the unknown name
        parse_lesions("SE")
    with pytest.raises(ValueError, match="empty"):
        parse_lesions(" , ")
