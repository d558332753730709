"""data/flags.py: the data flags shared by every script, and the one syntax of the dataset-list
flags.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_flags.py
"""
import argparse

import pytest

from data.flags import add_data_args, add_dataset_list, data_options
from data.ids import DATASET_IDS


def test_data_flags(monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/somewhere")
    parser = add_data_args(argparse.ArgumentParser())
    args = parser.parse_args(["--root", "idr=/x/IDRiD", "--mask-threshold", "FGA=127", "--splits",
                              "MES=official", "--ret-he", "all", "--split-seed", "3"])
    assert args.data_root == "/somewhere" and args.cache == "cache"
    assert data_options(args) == {"roots": {"IDR": "/x/IDRiD"}, "thresholds": {"FGA": 127},
                                  "split_files": {"MES": "official"}, "ret_he": "all",
                                  "split_seed": 3, "split_protocol": "paper"}
    for argv, names in ((["--root", "IDRiD"], ("--root", "'IDRiD'", "ID=VALUE")),
                        (["--root", "X=/x"], ("--root", "'X'", "your own")),
                        (["--mask-threshold", "FGA=high"], ("--mask-threshold FGA=high",)),
                        (["--root", "ABC=/a", "--root", "abc=/b"],
                         ("--root ABC", "twice", "/a", "/b")),
                        (["--root", "all=/x"], ("--root all=/x", "the five datasets", "one ID"))):
        with pytest.raises(ValueError) as err:
            data_options(parser.parse_args(argv))
        msg = str(err.value)
        assert all(n in msg for n in names) and "\n" not in msg, (argv, msg)


# The same dataset list, however it is typed (`--test` of evaluate.py and fig4.py, `--train` of
# tune.py, `--datasets` of characterize.py, `--dataset` of data.prepare): what each spelling must
# give.
DATASET_LISTS = [
    (["IDR,DDR", "MES"], ["IDR", "DDR", "MES"]),  # commas and spaces
    (["IDR+DDR"], ["IDR", "DDR"]),  # a run name
    # any case, duplicates dropped, canonical order
    (["mes", "idr+Ddr,MES"], ["IDR", "DDR", "MES"]),
    (["all"], list(DATASET_IDS)),
]


def parse_list(flag, argv, **kw):
    parser = argparse.ArgumentParser()
    add_dataset_list(parser, flag, "sets", **kw)
    return getattr(parser.parse_args(argv), flag[2:])


@pytest.mark.parametrize("words, ids", DATASET_LISTS)
def test_dataset_list_syntax(words, ids):
    assert parse_list("--test", ["--test", *words]) == ids
    # the last one wins, as for any flag
    assert parse_list("--test", ["--test", "RET", "--test", *words]) == ids


def test_dataset_list_default_and_errors():
    # a list given replaces the default
    assert parse_list("--test", ["--test", "MES"], default=list(DATASET_IDS)) == ["MES"]
    assert parse_list("--test", [], default=list(DATASET_IDS)) == list(DATASET_IDS)
    # each error names the flag and what is wrong: the unknown ID (and the choices), an empty list,
    # a folder typed after the list (it belongs before the flag)
    for argv, names in ((["--test", "IDR,X"], ("'X'", "IDR, DDR, FGA, RET, MES")),
                        (["--test", ","], ("empty",)),
                        (["--test", "IDR", "runs/X"], ("'runs/X'", "before"))):
        with pytest.raises(ValueError) as e:
            parse_list("--test", argv)
        msg = str(e.value)
        assert msg.startswith("--test") and all(n in msg for n in names) and "\n" not in msg, msg
    with pytest.raises(SystemExit):  # required and absent: argparse's own message
        parse_list("--train", [], required=True)
