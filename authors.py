"""The authors' released models: one torchseg U-Net / SE-ResNeXt50 per training combination on the
Hugging Face hub, read into this project's model.py, and the Dice the authors computed on them.

    python evaluate.py --ckpt hub:IDR+DDR --test MES --dice-argmax  # theirs, trained on IDR+DDR
    python evaluate.py --ckpt hub: --test IDR,MES                   # `hub:` alone: all five
    python authors.py IDR+DDR                                       # download (cached) -> folder

Playout & Cheriet publish a U-Net (torchseg; softmax over BG, CTW, EX, HE, MA; 1024 px) per training
combination in one hub repository: branch `main` holds the model trained on all five datasets, each
other combination the branch named by its sorted dataset names joined with "_" (e.g. `DDR_IDRID`).
Each branch holds config.json and model.safetensors. Their keys are mapped one by one onto
model.py's U-Net (the same timm encoder, a 3x3 head, a softmax, inputs padded to multiples of 32),
so torchseg is not needed. More in docs/EVALUATION.md ("The authors' released models").
"""
import argparse

import utils


def build_parser():
    p = utils.Parser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("combo", help="training combination in our IDs, e.g. IDR+DDR, or ALL (branch "
                                 "main); prints the cached folder, downloading it first if needed")
    return p


utils.start(__name__, build_parser)  # --help before torch loads; a Ctrl-C while it loads: one line

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import weights  # noqa: E402
from data.ids import DATASET_IDS, parse_dataset_ids  # noqa: E402
from model import SOFTMAX_CLASSES, SOFTMAX_LESIONS, ModelConfig  # noqa: E402
from protocol import nanmean  # noqa: E402

REPO = "ClementP/fundus-lesions-segmentation-unet_seresnext50_32x4d"
FILES = ("config.json", "model.safetensors")
PREFIX = "hub:"
RESOLUTION = 1024  # their model card: trained and run at 1024 px
# Our dataset IDs -> the names in the authors' toolkit (its Dataset enum; the `Tags` of reference/)
HUB_NAMES = {"IDR": "IDRID", "DDR": "DDR", "FGA": "FGADR", "RET": "RETLES", "MES": "MESSIDOR"}
# config.json of every released model (huggingface_hub's PyTorchModelHubMixin writes __init__'s
# arguments)
CONFIG = {"arch": "unet", "encoder": "seresnext50_32x4d", "in_channels": 3, "classes": 5}
# torchseg's keys (under "model.") -> ours; a key no rule matches has no counterpart here
TORCHSEG_KEYS = (
    # its TimmEncoder wraps the same timm features_only model
    (r"model\.encoder\.model\.(.+)", r"encoder.\1"),
    (r"model\.decoder\.blocks\.(\d+)\.conv([12])\.0\.weight",
     r"decoder.blocks.\1.conv\2.conv.weight"),
    (r"model\.decoder\.blocks\.(\d+)\.conv([12])\.1\.(.+)", r"decoder.blocks.\1.conv\2.bn.\3"),
    (r"model\.segmentation_head\.0\.(weight|bias)", r"head.\1"),
)


# ---- which model: hub specs and branches ---------------------------------------------------------
def is_spec(path):
    """'hub:IDR+DDR' or 'hub:': one of the authors' released models."""
    return str(path).startswith(PREFIX)


def is_layout(path):
    """A folder holding their config.json and model.safetensors, or such a .safetensors file."""
    path = Path(path)
    return (path.suffix == ".safetensors"
            or (path.is_dir() and (path / "model.safetensors").exists()))


def parse_spec(spec):
    """'hub:IDR+DDR' -> ['IDR', 'DDR'] (canonical order); 'hub:' -> all five."""
    if not is_spec(spec):
        raise ValueError(f"{spec!r} is not a hub spec (hub: or hub:IDR+DDR)")
    body = str(spec)[len(PREFIX):].strip()
    try:
        return parse_dataset_ids(body, own=False) if body else list(DATASET_IDS)
    except ValueError as e:
        raise ValueError(f"--ckpt {spec}: {e}") from None


def branch(ids):
    """A combination's hub branch: 'main' for all five, else e.g. ['IDR', 'DDR'] -> 'DDR_IDRID'."""
    ids = parse_dataset_ids(",".join(ids), own=False)  # the authors trained on the five only
    return "main" if len(ids) == len(DATASET_IDS) else "_".join(sorted(HUB_NAMES[i] for i in ids))


def download(branch_name, repo_id=REPO):
    """Folder holding FILES of repo_id at branch_name: the cache's, else a download into it."""
    hf = weights.hf()
    what = f"the authors' model {repo_id}@{branch_name}"
    get = lambda: hf.snapshot_download(  # noqa: E731
        repo_id, revision=branch_name, allow_patterns=list(FILES))
    try:  # NOTE: the released branches never change: a cached copy is used without asking the hub
        with weights.hf_offline_mode():
            return Path(get())
    except Exception:
        pass
    try:
        folder = Path(weights.hub_call(get, repo_id))
    except hf.errors.RevisionNotFoundError:
        raise ValueError(f"{what}: the repository has no branch {branch_name!r}") from None
    except hf.errors.RepositoryNotFoundError:
        raise ValueError(f"{what}: the repository is not on the hub (moved or private)") from None
    except Exception as e:
        fix = f"pass --ckpt a local folder holding {' and '.join(FILES)}"
        raise ValueError(weights.hub_error(what, e, fix)) from None
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{what}: the download lacks {missing[0]} (in {folder})")
    return folder


# ---- their files -> our checkpoint --------------------------------------------------------------
def model_cfg(config, where):
    """A hub config.json dict -> our model_cfg: the U-Net, a 3x3 head, a softmax, padding to 32."""
    unknown = sorted(set(config) - set(CONFIG))
    if unknown:
        raise ValueError(f"{where}: key {unknown[0]!r} is not read here "
                         f"(known: {', '.join(CONFIG)})")
    if str(config.get("arch", "")).lower() != "unet":
        raise ValueError(f"{where}: arch {config.get('arch')!r}: only torchseg's unet maps onto "
                         f"this U-Net")
    if config.get("in_channels", 3) != 3 or config.get("classes") != len(SOFTMAX_CLASSES):
        raise ValueError(f"{where}: needs in_channels 3 and classes {len(SOFTMAX_CLASSES)} "
                         f"({', '.join(SOFTMAX_CLASSES)}), got {config.get('in_channels')} and "
                         f"{config.get('classes')}")
    name = config.get("encoder")
    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"{where}: encoder {name!r} is not a timm model")
    # NOTE: torchseg's TimmEncoder.fix_padding() pads 3x3 convs and max-pools that timm leaves
    # unpadded (Inception nets); with such an encoder our model would compute another function.
    with torch.device("meta"):
        modules = timm.create_model(name, features_only=True).modules()
    if any((isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.padding == (0, 0))
           or (isinstance(m, nn.MaxPool2d) and m.padding == 0) for m in modules):
        raise ValueError(f"{where}: torchseg re-pads encoder {name} (unpadded 3x3 convs or "
                         f"max-pools); not supported")
    return asdict(ModelConfig(encoder=name, pretrained=False, classes=len(SOFTMAX_CLASSES),
                              head_kernel=3, softmax=True, pad_to=32, resolution=RESOLUTION))


def state_dict(sd, where):
    """torchseg Unet keys -> ours, every key mapped or one error (load_models checks shapes)."""
    out = {}
    for k, v in sd.items():
        for pattern, target in TORCHSEG_KEYS:
            if re.fullmatch(pattern, k):
                out[re.sub(pattern, target, k)] = v
                break
        else:
            raise ValueError(f"{where}: key {k!r} has no counterpart in this U-Net (torchseg's "
                             f"unet without decoder attention, centre block or auxiliary head "
                             f"maps onto it)")
    return out


def load_layout(path, train=None, source=None):
    """Their layout (a folder with config.json and model.safetensors whose torchseg keys lie under
    "model.", or that .safetensors file; one without config.json beside it is read as CONFIG) -> a
    training-format checkpoint: args {"resolution": 1024, "train": train, "split_protocol":
    "authors"}, method "authors"."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    config_path = file.parent / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors (expected the hub layout: "
                                f"config.json and model.safetensors)")
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{config_path} is not readable JSON ({utils.reason(e)})") from None
    elif path.is_dir():
        raise FileNotFoundError(f"{path}: no config.json (expected the hub layout: config.json "
                                f"and model.safetensors)")
    else:
        config = CONFIG
    cfg = model_cfg(config if isinstance(config, dict) else {}, config_path)
    try:
        from safetensors.torch import load_file  # noqa: PLC0415 (installed with timm)

        sd = load_file(file)
    except Exception as e:
        raise ValueError(f"{file} is not a safetensors file ({utils.reason(e)})") from None
    return {"model": state_dict(sd, file), "model_cfg": cfg,
            # NOTE: trained on their own splits (data.splits, protocol "authors"): evaluate.py
            # reads their test images unless told otherwise
            "args": {"resolution": RESOLUTION, "train": train, "split_protocol": "authors"},
            "method": "authors", "provenance": {"method": "authors", "source": source or str(path)},
            "version": 1}


def load(spec_or_path):
    """hub:COMBO (downloaded once, then cached), a hub-layout folder or a .safetensors file ->
    checkpoint dict."""
    if is_spec(spec_or_path):
        ids = parse_spec(spec_or_path)
        name = branch(ids)
        return load_layout(download(name), ids, f"{REPO}@{name}")
    return load_layout(spec_or_path)


# ---- the authors' Dice: the argmax of the softmax (evaluate.py --dice-argmax) --------------------
def argmax_lesions(probs):
    """Lesion probabilities of a softmax model (B, 4, H, W) -> bool (B, 4, H, W): where the lesion
    is the argmax of the 5-way softmax (the background's probability being 1 minus their sum), as
    the authors' Dice counts. Ties go to the first of SOFTMAX_CLASSES, as torch.argmax."""
    bg = 1.0 - probs.sum(dim=1, keepdim=True)  # (B, 1, H, W)
    by_class = [bg] + [probs[:, SOFTMAX_LESIONS.index(c), None]
                       for c in range(1, len(SOFTMAX_CLASSES))]  # SOFTMAX_CLASSES order
    winner = torch.cat(by_class, dim=1).argmax(dim=1)  # (B, H, W): an index into SOFTMAX_CLASSES
    return torch.stack([winner == c for c in SOFTMAX_LESIONS], dim=1)


def argmax_counts(probs, items, roi):
    """TP and FP per lesion (2, 4) of the authors' Dice: a pixel is the lesion its softmax argmax
    names."""
    pred = argmax_lesions(probs)  # (B, 4, H, W) bool
    masks = torch.from_numpy(np.stack([it["masks"] for it in items])).to(probs.device)  # bool
    # NOTE: without roi, count_dataset set p = 0 outside the FOV already: the background wins there
    if roi:
        pred &= torch.from_numpy(np.stack([it["fov"] for it in items])).to(probs.device)[:, None]
    return torch.stack([(pred & masks).sum((0, 2, 3)), (pred & ~masks).sum((0, 2, 3))])


def add_dice_argmax(block, tp, fp):
    """Per lesion "dice_argmax" = 2 TP / (TP + FP + P) beside the protocol's dice (NaN where dice
    is), and its mean."""
    for c, v in enumerate(block["lesions"].values()):
        v["dice_argmax"] = (float("nan") if math.isnan(v["dice"])
                            else 2 * tp[c] / (tp[c] + fp[c] + v["pos"]))
    block["mean_dice_argmax"] = nanmean([v["dice_argmax"] for v in block["lesions"].values()])


def main(argv=None):
    args = build_parser().parse_args(argv)
    ids = parse_spec(PREFIX + ("" if args.combo.upper() == "ALL" else args.combo))
    print(download(branch(ids)))


if __name__ == "__main__":
    utils.run(main,
              interrupted="interrupted: rerun the same command (what is in the cache is kept)")
