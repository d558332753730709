"""U-Net with a timm encoder for multi-label lesion segmentation (EX, HE, MA, CWS), plus checkpoint I/O.

    python -c "import model; m = model.build_model(model.ModelConfig(pretrained=False)); print(m)"
    python -c "import model; ms = model.load_models('runs/IDR+MES/s0/best.pt'); print(len(ms))"

Paper section 2.3: U-Net, ImageNet-pretrained SE-ResNet101 encoder (timm `legacy_seresnet101.in1k`), scSE
attention as the optional decoder variant. The decoder follows segmentation_models_pytorch's U-Net layout
(one block per skip plus a final block at input resolution) where the paper is silent, except for a 1x1 head.
"""
import json
import os
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias: BN follows) -> BatchNorm -> ReLU."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (Roy et al. 2018, arXiv:1808.08127)."""

    def __init__(self, ch, reduction=16):
        super().__init__()
        hidden = max(1, ch // reduction)
        self.channel = nn.Sequential(  # cSE: one weight per channel from the global average
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, ch, 1)
        )
        self.spatial = nn.Conv2d(ch, 1, 1)  # sSE: one weight per pixel

    def forward(self, x):
        # x * cSE + x * sSE, with one full-size product instead of two
        return x * (torch.sigmoid(self.channel(x)) + torch.sigmoid(self.spatial(x)))  # (B, C, H, W)


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate it, two ConvBNReLU; scSE after the concat and at the end."""

    def __init__(self, in_ch, skip_ch, out_ch, attention=False):
        super().__init__()
        self.conv1 = ConvBNReLU(in_ch + skip_ch, out_ch)
        self.attention1 = SCSE(in_ch + skip_ch) if attention and skip_ch else nn.Identity()
        self.conv2 = ConvBNReLU(out_ch, out_ch)
        self.attention2 = SCSE(out_ch) if attention else nn.Identity()

    def forward(self, x, skip=None, size=None):
        # NOTE: interpolate to the actual size, never x2: the stem's ceil_mode max-pool rounds odd sizes up.
        x = F.interpolate(x, size=skip.shape[-2:] if skip is not None else size, mode="nearest")
        if skip is not None:
            x = self.attention1(torch.cat([x, skip], dim=1))  # (B, in_ch + skip_ch, h, w)
        return self.attention2(self.conv2(self.conv1(x)))  # (B, out_ch, h, w)


class UNetDecoder(nn.Module):
    """Deepest feature up through every shallower skip, then a final block back to the input size."""

    def __init__(self, encoder_channels, decoder_channels, attention=False):
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(f"decoder_channels needs {len(encoder_channels)} widths, one per encoder feature "
                             f"(got {len(decoder_channels)}: {tuple(decoder_channels)})")
        skips = list(encoder_channels[-2::-1]) + [0]  # deepest skip first; the last block has none
        ins = [encoder_channels[-1]] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o, attention) for i, s, o in zip(ins, skips, decoder_channels)
        )

    def forward(self, features, size):
        x = features[-1]  # (B, C_last, H/32, W/32) for a 5-stage CNN
        for block, skip in zip(self.blocks, features[-2::-1]):
            x = block(x, skip=skip)
        return self.blocks[-1](x, size=size)  # (B, decoder_channels[-1], H, W)


class SegModel(nn.Module):
    """Float images in [0, 1] (B, 3, H, W) -> per-lesion logits (B, classes, H, W), any H and W."""

    def __init__(self, encoder, decoder_channels=(256, 128, 64, 32, 16), attention=False, dropout=0.0, classes=4):
        super().__init__()
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.feature_info.channels(), decoder_channels, attention)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(decoder_channels[-1], classes, 1)
        cfg = getattr(encoder, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN), cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)
        # NOTE: non-persistent: they follow from the encoder's name, so state dicts (and weight averages) hold
        # only learned tensors and buffers.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._nhwc = getattr(encoder, "output_fmt", "NCHW") == "NHWC"  # some transformer encoders
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        features = self.encoder((x - self.mean) / self.std)  # list of (B, C_i, H/r_i, W/r_i)
        if self._nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        x = self.decoder(features, size=x.shape[-2:])  # (B, decoder_channels[-1], H, W)
        return self.head(self.dropout(x))  # (B, classes, H, W)


@dataclass
class ModelConfig:
    encoder: str = "legacy_seresnet101.in1k"  # any timm model that supports features_only
    pretrained: bool = True  # ImageNet weights from the timm hub (downloaded once, then cached)
    decoder_channels: tuple = (256, 128, 64, 32, 16)  # one width per encoder feature, deepest first
    attention: bool = False  # scSE in every decoder block
    dropout: float = 0.0  # channel dropout before the head
    classes: int = 4  # EX, HE, MA, CWS
    encoder_weights: str | None = None  # local weights file; used instead of the hub when given


# What must agree for a checkpoint's weights to load into (or be averaged with) another model of this file;
# pretrained / encoder_weights / dropout do not change the weights' shapes or meaning.
ARCH_FIELDS = ("encoder", "decoder_channels", "attention", "classes")


def architecture(cfg):
    """The ARCH_FIELDS of a model_cfg dict as a comparable tuple (lists and tuples compare equal)."""
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in (cfg.get(f) for f in ARCH_FIELDS))


def config_from_dict(d):
    """ModelConfig from a checkpoint's "model_cfg" dict; ValueError on unknown fields."""
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown model_cfg field {unknown[0]!r} (known: {', '.join(sorted(names))})")
    cfg = ModelConfig(**d)
    cfg.decoder_channels = tuple(int(c) for c in cfg.decoder_channels)
    return cfg


def _short(e):
    """One line describing an exception, for error messages."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:150]}" if text else type(e).__name__


def _create_encoder(name, pretrained):
    """timm features_only encoder; a failed download becomes one ValueError line."""
    if not timm.is_model(name):
        raise ValueError(f"unknown timm encoder {name!r} (see timm.list_models(); paper: legacy_seresnet101.in1k)")
    if pretrained and not timm.is_model_pretrained(name):
        raise ValueError(f"timm has no pretrained weights for {name!r}; pass --no-pretrained or "
                         f"--encoder-weights PATH (the paper's encoder is legacy_seresnet101.in1k)")
    try:
        return timm.create_model(name, features_only=True, pretrained=pretrained)
    except Exception as e:
        if not pretrained:
            raise ValueError(f"cannot build timm encoder {name!r} with features_only=True ({_short(e)})") from None
        try:  # tell a download failure (offline, proxy, hub down, bad cache) from an unusable encoder
            timm.create_model(name, features_only=True, pretrained=False)
        except Exception as e2:
            raise ValueError(f"cannot build timm encoder {name!r} with features_only=True ({_short(e2)})") from None
        raise ValueError(f"could not download pretrained weights for {name} ({_short(e)}); "
                         f"pass --no-pretrained or --encoder-weights PATH") from None


def _load_encoder_weights(encoder, name, path):
    """Load a local file (timm/torchvision state dict of the classifier or of the features model) strictly.

    NOTE: timm's own route (pretrained_cfg_overlay=dict(file=...)) loads features_only models with
    strict=False, so a file with the wrong keys silently leaves random weights: we match keys ourselves.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--encoder-weights file not found: {path}")
    try:  # handles .safetensors, {"state_dict"|"model"|"state_dict_ema": ...} wrappers, "module." prefixes
        sd = timm.models.load_state_dict(str(path))
    except Exception as e:
        raise ValueError(f"--encoder-weights {path} is not a weights file ({_short(e)})") from None
    sd = strip_prefixes(sd)
    if any(k.startswith("encoder.") for k in sd):  # one of our own checkpoints: take its encoder
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    try:  # the classifier's keys: extra keys a full-model file may hold (head, classifier, ...)
        with torch.device("meta"):
            full_keys = set(timm.create_model(name, pretrained=False).state_dict())
    except Exception:
        full_keys = set()
    # features_only may flatten top-level Sequentials: "stem.conv" in the classifier is "stem_conv" here
    alias = {k.replace(".", "_", 1): k for k in full_keys}
    own = encoder.state_dict()
    mapped, used = {}, set()
    for k, v in own.items():
        src = k if k in sd else alias.get(k)
        if src not in sd:
            if k.endswith("num_batches_tracked"):  # NOTE: old torchvision files lack these counters
                mapped[k] = v
                continue
            missing = sum(1 for k2 in own if k2 not in sd and alias.get(k2) not in sd)
            raise ValueError(f"--encoder-weights {path} does not match encoder {name}: "
                             f"missing key {k!r} ({missing} of {len(own)} missing)")
        if sd[src].shape != v.shape:
            raise ValueError(f"--encoder-weights {path} does not match encoder {name}: key {src!r} has shape "
                             f"{tuple(sd[src].shape)}, expected {tuple(v.shape)}")
        mapped[k] = sd[src]
        used.add(src)
    unexpected = [k for k in sd if k not in used and k not in full_keys]
    if unexpected:
        raise ValueError(f"--encoder-weights {path} does not match encoder {name}: unexpected key "
                         f"{unexpected[0]!r} ({len(unexpected)} unexpected)")
    encoder.load_state_dict(mapped)


def build_model(cfg):
    """SegModel from a ModelConfig: encoder (timm, features_only) + hand-written U-Net decoder + 1x1 head."""
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    local = cfg.encoder_weights is not None
    encoder = _create_encoder(cfg.encoder, cfg.pretrained and not local)
    if local:
        _load_encoder_weights(encoder, cfg.encoder, cfg.encoder_weights)
    return SegModel(encoder, tuple(cfg.decoder_channels), cfg.attention, cfg.dropout, cfg.classes)


# ---- checkpoints: plain Python types and tensors only, so torch.load(weights_only=True) works ----

def strip_prefixes(state_dict):
    """Drop DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") wrappers from state dict keys."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".")] = v  # a compiled submodule
    return out


def _to_cpu(obj):
    """Every tensor of a nested dict/list on the CPU, so plain torch.load works on a machine without a GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path, ckpt):
    """Write ckpt atomically (path.tmp in the same folder, then os.replace) with unwrapped model keys and
    every tensor on the CPU."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = _to_cpu(ckpt)
    if "model" in ckpt:
        ckpt["model"] = strip_prefixes(ckpt["model"])
    if "members" in ckpt:
        ckpt["members"] = [{**m, "model": strip_prefixes(m["model"])} if "model" in m else m for m in ckpt["members"]]
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old file or the new one
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_members(ckpt, where):
    if not isinstance(ckpt, dict):
        raise ValueError(f"{where} is not a checkpoint (a {type(ckpt).__name__}, expected a dict)")
    if ckpt.get("kind") == "ensemble":
        if not isinstance(ckpt.get("members"), list) or not ckpt["members"]:
            raise ValueError(f"{where} is an ensemble file without a non-empty 'members' list")
        members = ckpt["members"]
    else:
        members = [ckpt]
    for i, m in enumerate(members):
        for key in ("model", "model_cfg"):
            if not isinstance(m, dict) or key not in m:
                member = f" (member {i})" if m is not ckpt else ""
                raise ValueError(f"{where}{member} is not a model checkpoint: missing key {key!r}")
    return members


def read_manifest(path):
    """An ensemble manifest {"kind": "ensemble", "members": [paths relative to the manifest's folder], ...}
    -> (the manifest dict, the member paths resolved). Writes nothing, loads no weights."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"ensemble manifest {path} is not readable JSON ({_short(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "ensemble":
        raise ValueError(f"ensemble manifest {path} lacks \"kind\": \"ensemble\"")
    members = manifest.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise ValueError(f"ensemble manifest {path} needs a non-empty \"members\" list of checkpoint paths")
    return manifest, [path.parent / m for m in members]


def _load_manifest(path, seen):
    """The ensemble a manifest names, as one ensemble dict whose members are the loaded training checkpoints
    (a member that is itself an ensemble contributes its members)."""
    key = os.path.abspath(path)
    if key in seen:
        raise ValueError(f"ensemble manifest {path} lists itself (through its members)")
    manifest, paths = read_manifest(path)
    members = []
    for name, member in zip(manifest["members"], paths):
        if not member.is_file():
            raise FileNotFoundError(f"ensemble manifest {path}: member {name} not found ({member})")
        ckpt = _load_manifest(member, seen | {key}) if member.suffix == ".json" else load_checkpoint(member)
        members += ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt]
    # NOTE: the first member's training args (resolution, combination, data flags) describe the ensemble,
    # as they did in the older ensemble files that embedded every member's weights.
    return {"kind": "ensemble", "members": members, "args": members[0].get("args") or {},
            "provenance": manifest.get("provenance") or {}, "version": manifest.get("version", 1)}


def load_checkpoint(path):
    """torch.load(weights_only=True) on CPU; one-line errors naming the path. An ensemble manifest (.json,
    written by `average.py ensemble`) comes back as {"kind": "ensemble", "members": [checkpoints], ...}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".json":
        return _load_manifest(path, frozenset())
    try:
        # mmap: tensors are read lazily, so peeking at "args" is cheap; only zip-format files (torch >= 1.6) allow it
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise ValueError(f"{path} is not a torch checkpoint loadable with weights_only=True ({_short(e)})") from None
    _check_members(ckpt, str(path))
    return ckpt


def load_models(path_or_ckpt, device="cpu", where=None):
    """[SegModel] in eval mode: one for a training checkpoint, one per member for an ensemble (a manifest .json,
    or an older ensemble .pt that embeds its members). where: the name errors give a loaded dict."""
    if isinstance(path_or_ckpt, dict):
        ckpt, where = path_or_ckpt, where or "checkpoint"
    else:
        ckpt, where = load_checkpoint(path_or_ckpt), str(path_or_ckpt)
    models = []
    for i, m in enumerate(_check_members(ckpt, where)):
        name = where if "members" not in ckpt else f"{where} (member {i})"
        try:
            cfg = config_from_dict(m["model_cfg"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: bad model_cfg ({_short(e)})") from None
        cfg.pretrained, cfg.encoder_weights = False, None  # the checkpoint holds every weight
        model = build_model(cfg)
        sd, own = strip_prefixes(m["model"]), model.state_dict()
        bad = [f"missing key {k!r}" for k in own if k not in sd]
        bad += [f"unexpected key {k!r}" for k in sd if k not in own]
        bad += [f"key {k!r} has shape {tuple(sd[k].shape)}, model has {tuple(v.shape)}"
                for k, v in own.items() if k in sd and sd[k].shape != v.shape]
        if bad:
            raise ValueError(f"{name}: state dict does not match its model_cfg (encoder {cfg.encoder}): "
                             f"{bad[0]} ({len(bad)} problems)")
        # NOTE: a diverged run's NaN weights would score a silent 0.000; refuse them instead
        broken = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise ValueError(f"{name}: {len(broken)} weight tensor(s) hold NaN or inf (first {broken[0]!r}): "
                             f"the run diverged; use an earlier checkpoint (its best.pt or snapshots/)")
        model.load_state_dict(sd)
        models.append(model.to(device).eval())
    return models
