r"""Train / validation / test splits of the five datasets, under the paper's protocol or the
authors' code.

    python -c "from data.splits import authors_draw; \
        print(authors_draw([f'img{k:04d}' for k in range(1842)], 0.8))"
    python -c "from data.datasets import *; from data.splits import make_splits; \
        print(make_splits(list_samples('RET', dataset_root('RET', 'data_raw')), 'RET', \
        protocol='authors'))"

paper (section 2.4; docs/PROTOCOL.md, "splits"): IDR and DDR official; FGA, RET, MES a seeded 30 %
test, the rest 85 % train / 15 % validation; ids sorted first. NOTE: Retinal-Lesions images are
named <kaggleid>_<left|right> and 88 patients have both eyes: the paper draw keeps a patient's eyes
together.

authors (ClementPla/fundus-data-toolkit on ClementPla/NNTools, read for this file): ids sorted by
file stem (SegmentationDataset.list_files argsorts the stems); FGA and RET are split by
nntools.random_split(dataset, [0.8, 0.2], torch.Generator().manual_seed(42)): perm = randperm(N),
train(+val) = ids[perm[:int(0.8 N)]] in that permuted order, test = ids[perm[int(0.8 N):]].
FundusDatamodule.create_valid_set then calls random_split(train, [n - int(0.15 n), int(0.15 n)])
with a fresh seed-42 generator over that train part in its permuted order (Dataset.subset indexes
with the permutation, keeping its order): the first n - int(0.15 n) stay train, the rest is
validation. IDR and MES validation is drawn the same way from the official train folder (sorted);
DDR has an official valid folder; MES is official 138/60. The authors' draw is per image (RET eyes
may be split).
"""
import json
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val", "test")
PROTOCOLS = ("paper", "authors")
# paper section 2.4: 30% test, rest 85% train / 15% validation
TEST_FRACTION, VAL_FRACTION = 0.30, 0.15
# fundus-data-toolkit: random_split([0.8, 0.2]), seed 42
AUTHORS_TRAIN_FRACTION, AUTHORS_SEED = 0.8, 42
# the datasets whose distributed split is the default, per protocol
OFFICIAL = {"paper": ("IDR", "DDR"), "authors": ("IDR", "DDR", "MES")}


def patient_id(dataset_id, image_id):
    """Retinal-Lesions '<kaggleid>_left' / '_right' -> '<kaggleid>'; every other image is its own
    patient."""
    if dataset_id == "RET":
        stem, _, eye = image_id.rpartition("_")
        if stem and eye in ("left", "right"):
            return stem
    return image_id


def hold_out(ids, fraction, seed, group=None):
    """Seeded hold-out of about round(fraction * n) ids, whole groups at a time: (rest, held), both
    sorted.

    group(id) -> key: ids sharing a key land on the same side (default: each id alone). Groups are
    drawn in the order of a seeded permutation of the sorted keys until round(fraction * n) ids are
    held (at least one group when there are two or more, never all of them).
    """
    ids = sorted(ids)  # the draw depends on the ids, never on the order they were listed in
    keys = [group(x) if group else x for x in ids]
    groups = sorted(set(keys))
    size = {g: keys.count(g) for g in groups} if group else dict.fromkeys(groups, 1)  # ids a group
    n = round(fraction * len(ids))  # ids to hold out
    if len(ids) >= 2:  # at least one, never all
        n = min(max(n, 1), len(ids) - 1)
    held, count = set(), 0
    # whole groups in a seeded order until n ids are held: RET's held-out sizes may exceed n by one
    for k in np.random.default_rng(seed).permutation(len(groups)).tolist():
        if count >= n or len(held) == len(groups) - 1:
            break
        held.add(groups[k])
        count += size[groups[k]]
    return ([x for x, g in zip(ids, keys) if g not in held],
            [x for x, g in zip(ids, keys) if g in held])


def authors_draw(ids, first_fraction=None, first=None):
    """nntools.random_split of `ids` (in the given order) with a fresh torch seed-42 generator:
    (first part, second part), both in the permuted order. first_fraction: the first part is
    int(first_fraction * N); first: its size as a number."""
    N = len(ids)
    n_first = int(first_fraction * N) if first is None else int(first)  # int(): rounds down
    # NOTE: torch's generator, as nntools.random_split: numpy's would give another permutation
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(AUTHORS_SEED)).tolist()
    return [ids[k] for k in perm[:n_first]], [ids[k] for k in perm[n_first:]]


def _draw_test(ids, dataset_id, protocol, seed):
    """(train part, test) of a dataset without an official split; the train part in the protocol's
    order."""
    if protocol == "authors":
        return authors_draw(sorted(ids), AUTHORS_TRAIN_FRACTION)
    # [seed, 0]: the test draw's own stream; the validation draw uses [seed, 1]
    return hold_out(ids, TEST_FRACTION, [seed, 0], group=lambda x: patient_id(dataset_id, x))


def _draw_val(train, dataset_id, protocol, seed):
    """(train, val) from a train part (paper: seeded 15 %, patients together; authors:
    int(0.15 n), seed 42)."""
    if protocol == "authors":  # the last int(0.15 n) of the permutation are validation
        return authors_draw(list(train), first=len(train) - int(VAL_FRACTION * len(train)))
    return hold_out(train, VAL_FRACTION, [seed, 1], group=lambda x: patient_id(dataset_id, x))


def read_split_file(path, dataset_id, ids):
    """A user split file {split: [ids]} checked against the dataset's ids; "valid"/"validation" mean
    "val", and a "protocol" entry (splits.json records one) is ignored."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"split file {path} not found "
                                f"(--splits {dataset_id}=FILE)") from None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"split file {path} is not valid JSON "
                         f"({' '.join(str(e).split())})") from None
    if isinstance(raw, dict):  # DDR's folder is "valid": both spellings accepted
        raw = {("val" if k in ("valid", "validation") else k): v for k, v in raw.items()
               if not (k == "protocol" and isinstance(v, str))}
    if (not isinstance(raw, dict) or set(raw) - set(SPLITS)
            or not all(isinstance(v, list) for v in raw.values())
            or not all(isinstance(x, str) for v in raw.values() for x in v)):  # ids: strings
        raise ValueError(f"split file {path} must be a JSON object "
                         f"{{\"train\": [ids], \"val\": [ids], \"test\": [ids]}}")
    known = set(ids)
    unknown = [(x, name) for name, members in raw.items() for x in members if x not in known]
    if unknown:  # all of them in the one line: a renamed or removed image is rarely alone
        (x, name), rest = unknown[0], unknown[1:]
        more = ", ".join(f"{y!r} in {n!r}" for y, n in rest[:5]) + (", ..." if rest[5:] else "")
        more = f"; {len(rest)} more: {more}" if rest else ""
        raise ValueError(f"split file {path}: unknown {dataset_id} image id {x!r} in {name!r} "
                         f"(no image of that name{more})")
    twice = in_two_splits(raw)  # an id twice would be trained on and scored on
    if twice:
        raise ValueError(f"split file {path}: image id {twice[0]!r} is in more than one split")
    return {k: sorted(v) for k, v in raw.items()}


def in_two_splits(splits):
    """{split: [ids]} -> (id, its first split, another split) for the first id listed in two
    splits (or twice in one), else None."""
    first = {}
    for name, members in splits.items():
        for x in members:
            if x in first:
                return x, first[x], name
            first[x] = name
    return None


def make_splits(samples, dataset_id, seed=0, split_file=None, protocol="paper"):
    """{"train", "val", "test"} -> sorted ids.

    samples: objects with .id and .split (the distributed split folder, None when there is none).
    split_file: None (the protocol's default), "official" (the distributed folders, also for MES),
    "seeded" (the protocol's random test draw), or a JSON file {split: [ids]}. A missing validation
    split is drawn from train by the protocol (IDR, MES official, files without val).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"--split-protocol must be one of {', '.join(PROTOCOLS)}, "
                         f"got {protocol!r}")
    ids = sorted(s.id for s in samples)
    mode = split_file or ("official" if dataset_id in OFFICIAL[protocol] else "seeded")
    if mode == "official":  # the distributed folders (Sample.split)
        folder = {s.id: s.split for s in samples}
        if any(v is None for v in folder.values()):
            raise ValueError(f"--splits {dataset_id}=official: {dataset_id} has no official split "
                             f"(give a file)")
        splits = {name: [x for x in ids if folder[x] == name] for name in SPLITS}
    elif mode == "seeded":
        train, test = _draw_test(ids, dataset_id, protocol, seed)
        splits = {"train": train, "test": test}
    else:
        splits = read_split_file(split_file, dataset_id, ids)
    if not splits.get("val"):  # IDR and MES official, files without val: drawn from train
        splits["train"], splits["val"] = _draw_val(splits.get("train", []), dataset_id, protocol,
                                                   seed)
    if not splits.get("test"):
        where = (f"split file {split_file}" if mode not in ("official", "seeded")
                 else f"the {mode} split")
        raise ValueError(f"{dataset_id}: the test split has no images ({where}; check the dataset "
                         f"folders or --splits {dataset_id}=FILE)")
    return {name: sorted(splits.get(name, [])) for name in SPLITS}
