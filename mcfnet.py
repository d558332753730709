r"""MCF-Net: retinal image quality (Good / Usable / Reject) from RGB, HSV and LAB views of a fundus
photograph.

Fu et al., "Evaluation of Retinal Image Quality Assessment Networks in Different Color-spaces",
MICCAI 2019. Written from the paper and from reading the authors' public code (github.com/HzFu/EyeQ,
MCF_Net/) so that their published checkpoint (DenseNet121_v3_v1.tar) loads into it unchanged.

    python -c "import mcfnet, numpy as np; from data.datasets import load_image; \
        m = mcfnet.load_mcfnet('DenseNet121_v3_v1.tar'); \
        views = mcfnet.colour_views(np.asarray(load_image('eye.png'))); \
        print(mcfnet.predict_grades(m, views[None]))"
    python characterize.py --datasets IDR --data-root data_raw --out report/characterize \
        --quality-weights DenseNet121_v3_v1.tar
"""
import pickle
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageCms

GRADES = ("Good", "Usable", "Reject")
INPUT_SIZE = 224  # the authors' Resize(224) + CenterCrop(224) at test time
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DenseNetBranch(nn.Module):
    """One colour space: a DenseNet-121 whose classifier ends in a sigmoid (an output per grade)."""

    def __init__(self, n_class=3):
        super().__init__()
        # NOTE: the attribute name `densenet121` is what the published state_dict keys use.
        self.densenet121 = torchvision.models.densenet121(weights=None)
        width = self.densenet121.classifier.in_features  # 1024
        self.densenet121.classifier = nn.Sequential(nn.Linear(width, n_class), nn.Sigmoid())

    def pooled(self, x):
        """Global features exactly as torchvision's DenseNet computes them before its classifier."""
        f = F.relu(self.densenet121.features(x))  # (B, 1024, H/32, W/32)
        return torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)  # (B, 1024)


class MCFNet(nn.Module):
    """Three DenseNet-121 branches (RGB, HSV, LAB) fused twice (paper section 2.2):
    feature level: the three pooled 1024-d features -> Linear -> sigmoid;
    prediction level: the three branch predictions + the feature-level one -> Linear -> sigmoid
    (the output).
    forward(rgb, hsv, lab), each (B, 3, H, W) -> five (B, 3) sigmoid outputs, the last being
    MCF-Net's grade.
    """

    def __init__(self, n_class=3):
        super().__init__()
        # NOTE: submodule names mirror the published checkpoint's keys. Their model also holds a
        # fourth, unused DenseNet-121 (`densenet121`, with its 1000-class ImageNet head) and
        # registers each branch's `features` a second time as `classA/B/C`; both appear in the
        # checkpoint (and in its 28.86M parameter count), so they are kept here for a strict load.
        # `densenet121` is never run.
        self.densenet121 = torchvision.models.densenet121(weights=None)
        self.featureA, self.featureB, self.featureC = (DenseNetBranch(n_class) for _ in range(3))
        self.classA = self.featureA.densenet121.features  # aliases: same tensors, second key name
        self.classB = self.featureB.densenet121.features
        self.classC = self.featureC.densenet121.features
        width = self.densenet121.classifier.in_features
        # prediction-level fusion (combine1) and feature-level fusion (combine2)
        self.combine1 = nn.Sequential(nn.Linear(4 * n_class, n_class), nn.Sigmoid())
        self.combine2 = nn.Sequential(nn.Linear(3 * width, n_class), nn.Sigmoid())

    def forward(self, rgb, hsv, lab):
        branches = (self.featureA, self.featureB, self.featureC)
        # Each branch's features run once; the authors ran them twice (whole DenseNet + `classX`),
        # same result.
        pooled = [b.pooled(x) for b, x in zip(branches, (rgb, hsv, lab))]  # 3 x (B, 1024)
        preds = [b.densenet121.classifier(p) for b, p in zip(branches, pooled)]  # 3 x (B, 3)
        feature_fusion = self.combine2(torch.cat(pooled, 1))  # (B, 3)
        final = self.combine1(torch.cat(preds + [feature_fusion], 1))  # (B, 3)
        return preds[0], preds[1], preds[2], feature_fusion, final


_SRGB_TO_LAB = None  # the littleCMS transform, built on first use


def colour_views(image, fov=None, size=INPUT_SIZE):
    """One fundus image -> the three network inputs, as the authors prepared them.

    image: uint8 (H, W, 3) RGB, best cropped to the FOV and padded square first (our prepared
    cache or data.preprocess_image; the authors' EyeQ preprocessing does the same, black outside a
    circular FOV). fov: optional bool (H, W); pixels outside it are set to black as in their
    preprocessing. Returns float32 (3, 3, size, size): RGB, HSV, LAB. PIL does the colour
    conversions (HSV: 0..255 per channel; LAB via littleCMS sRGB -> LAB, a*/b* stored as signed
    bytes), like the authors' loader.
    """
    global _SRGB_TO_LAB
    if _SRGB_TO_LAB is None:
        _SRGB_TO_LAB = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    if fov is not None:
        image = np.where(fov[..., None], image, 0).astype(np.uint8)
    pil = Image.fromarray(image, "RGB")
    # Resize(224) + CenterCrop(224) as the authors: short side to `size` (bilinear), then the
    # central square.
    w, h = pil.size
    w, h = ((size, max(size, int(size * h / w))) if w <= h
            else (max(size, int(size * w / h)), size))
    left, top = (w - size) // 2, (h - size) // 2
    pil = pil.resize((w, h), Image.BILINEAR).crop((left, top, left + size, top + size))
    views = [np.asarray(pil), np.asarray(pil.convert("HSV")),
             np.asarray(ImageCms.applyTransform(pil, _SRGB_TO_LAB))]
    # (3 views, 3, size, size)
    x = torch.from_numpy(np.stack(views).astype(np.float32)).permute(0, 3, 1, 2)
    # NOTE: the authors feed float32 arrays to ToTensor, which does not divide float input by 255,
    # then Normalize with ImageNet statistics: their network saw values in 0..255 minus mean over
    # std. Kept as is.
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_grades(model, views):
    """views: float (B, 3 views, 3, S, S) from colour_views -> grade probabilities (B, 3), rows
    summing to 1 (the authors normalise the final sigmoid outputs the same way in their inference
    script)."""
    out = model(views[:, 0], views[:, 1], views[:, 2])[-1]  # (B, 3) independent sigmoids
    return out / out.sum(1, keepdim=True).clamp_min(1e-12)


def _clean_keys(state_dict):
    """Unwrap DataParallel ("module.") / torch.compile ("_orig_mod.") prefixes and rename pre-0.3
    torchvision DenseNet keys ("denselayer1.norm.1.weight" -> "denselayer1.norm1.weight")."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        out[re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", key)] = value
    return out


def _load_tensors_only(path):
    """torch.load(weights_only=True), also admitting numpy scalars: the authors' file stores its
    best validation loss beside the state_dict, and that may be a numpy float."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5
            raise
    # numpy 2 moved numpy.core to numpy._core; pickles may name either
    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    allowed = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype,
               type(np.dtype(np.float64)), type(np.dtype(np.float32))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(model, path):
    """Load an MCF-Net checkpoint (the authors' {"state_dict": ...} file or a bare state_dict) into
    model. Raises FileNotFoundError / ValueError with one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quality weights not found: {path}")
    try:
        ckpt = _load_tensors_only(path)
    except Exception as e:  # random bytes, truncated file, pickled objects beyond tensors
        raise ValueError(f"{path}: not a readable PyTorch checkpoint "
                         f"({type(e).__name__})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise ValueError(f"{path}: not an MCF-Net state_dict (expected a dict of tensors, or one "
                         f"under 'state_dict')")
    state = _clean_keys(ckpt)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ValueError(f"{path}: not an MCF-Net checkpoint ({len(missing)} missing keys, "
                         f"{len(unexpected)} unexpected keys, e.g. {example!r})")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"{path}: MCF-Net checkpoint with other shapes ({wrong[0]!r}: "
                         f"{tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})")
    model.load_state_dict(state)
    return model


def load_mcfnet(path, device="cpu"):
    """Build MCF-Net, load the weights file, return it in eval mode on device."""
    return load_weights(MCFNet(n_class=len(GRADES)), path).to(device).eval()
