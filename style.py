"""Labelling-style tokens for a style-conditioned model (train.py --style-condition; model.FiLM).

    python train.py --train IDR,DDR,RET,MES --style-condition style ...          # tokens fine, coarse (the table below)
    python train.py --train IDR,DDR,RET,MES --style-condition style --characterize report/characterize/characterize.json
    python train.py --train IDR,DDR,RET,MES --style-condition dataset ...        # tokens IDR, DDR, RET, MES
    python evaluate.py --ckpt runs/IDR+DDR+RET+MES/s0/best.pt --test IDR --style coarse   # default: fine

The paper (Playout & Cheriet, section 2.1 and Figure 2) finds that the datasets' labels follow different styles:
IDRiD, DDR and MAPLES-DR outline lesions finely, Retinal-Lesions coarsely (merged, dilated blobs), FGADR mixes
both. A conditioned model gets a token per training patch: its dataset's style (`style`), or its dataset
(`dataset`); at test time one asks for a style, by default `fine`. Standard library only.
"""
import json
from pathlib import Path

STYLES = ("fine", "mixed", "coarse")  # token order of --style-condition style
# The datasets' labelling styles as the paper (Figure 2) and the README's characterization found them; a
# characterize.json (characterize.py) replaces this table with measured styles.
STYLE_TABLE = {"IDR": "fine", "DDR": "fine", "FGA": "mixed", "RET": "coarse", "MES": "fine"}
MODES = ("off", "style", "dataset")


def read_styles(path):
    """characterize.json (characterize.py) -> {dataset ID: 'fine' | 'mixed' | 'coarse' | 'undetermined'}."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--characterize file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"--characterize {path} is not readable JSON ({type(e).__name__})") from None
    datasets = report.get("datasets") if isinstance(report, dict) else None
    if not isinstance(datasets, dict):
        raise ValueError(f"--characterize {path} is not a characterize.json (no 'datasets' object)")
    return {ds: v.get("style") for ds, v in datasets.items() if isinstance(v, dict)}


def dataset_styles(train_ids, characterize=None):
    """{dataset ID: style} of the training sets, from characterize.json or STYLE_TABLE; one error line when
    a training set has no usable style there."""
    styles = read_styles(characterize) if characterize else STYLE_TABLE
    where = f"--characterize {characterize}" if characterize else "style.STYLE_TABLE"
    for ds in train_ids:
        if styles.get(ds) not in STYLES:
            raise ValueError(f"{where} gives training set {ds} the style {styles.get(ds)!r}, not one of "
                             f"{', '.join(STYLES)} (characterize.py needs two or more datasets, one of them fine)")
    return {ds: styles[ds] for ds in train_ids}


def style_tokens(mode, train_ids, characterize=None):
    """The conditioning of a run -> (tokens, token_styles, token of each training set), model_cfg's two fields.

    style: one token per labelling style present in training (STYLES order); dataset: one per training set.
    token_styles[i] is token i's labelling style (the token itself under `style`). off: empty tuples.
    """
    if mode not in MODES:
        raise ValueError(f"--style-condition must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return (), (), {}
    styles = dataset_styles(train_ids, characterize)
    if mode == "style":
        tokens = tuple(s for s in STYLES if s in styles.values())
        return tokens, tokens, {ds: tokens.index(styles[ds]) for ds in train_ids}
    tokens = tuple(train_ids)
    return tokens, tuple(styles[ds] for ds in tokens), {ds: i for i, ds in enumerate(tokens)}
