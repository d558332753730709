"""U-Net with a timm encoder for multi-label lesion segmentation (EX, HE, MA, CWS), plus checkpoint I/O.

    python -c "import model; m = model.build_model(model.ModelConfig(pretrained=False)); print(m)"
    python -c "import model; ms = model.load_models('runs/IDR+MES/s0/best.pt'); print(len(ms))"
    python -c "import model; ms = model.load_models('hub:IDR+DDR'); print(ms[0].softmax)"   # the authors' model

Paper section 2.3: U-Net, ImageNet-pretrained SE-ResNet101 encoder (timm `legacy_seresnet101.in1k`), scSE
attention as the optional decoder variant. The decoder follows segmentation_models_pytorch's U-Net layout
(one block per skip plus a final block at input resolution) where the paper is silent, except for a 1x1 head.
The authors' released models (torchseg U-Net / SE-ResNeXt50, softmax over 5 classes; hub.py downloads them) load
into the same classes: `load_models("hub:IDR+DDR")` or a folder with their config.json and model.safetensors.
"""
import argparse
import contextlib
import json
import os
import pickle
import re
import signal
import threading
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli


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


class FiLM(nn.Module):
    """Per-channel scale and shift chosen by a style token (FiLM, Perez et al. 2018, arXiv:1709.07871).

    Stored as offsets from the identity, scale = 1 + gamma and shift = beta, both 0 at init: a fresh conditioned
    model computes exactly the unconditioned function, and train.py's weight decay pulls towards it.
    """

    def __init__(self, ch, tokens):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(tokens, ch))
        self.beta = nn.Parameter(torch.zeros(tokens, ch))

    def forward(self, x, mix):
        # mix (B, T): token weights (one-hot for a token, or a mean of tokens); x (B, C, h, w)
        scale, shift = 1 + (mix @ self.gamma).to(x.dtype), (mix @ self.beta).to(x.dtype)  # (B, C)
        return x * scale[:, :, None, None] + shift[:, :, None, None]


class UNetDecoder(nn.Module):
    """Deepest feature up through every shallower skip, then a final block back to the input size.

    tokens > 0: a FiLM after every block (style conditioning); 0 adds no module, parameter or operation.
    """

    def __init__(self, encoder_channels, decoder_channels, attention=False, tokens=0):
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(f"decoder_channels needs {len(encoder_channels)} widths, one per encoder feature "
                             f"(got {len(decoder_channels)}: {tuple(decoder_channels)})")
        skips = list(encoder_channels[-2::-1]) + [0]  # deepest skip first; the last block has none
        ins = [encoder_channels[-1]] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o, attention) for i, s, o in zip(ins, skips, decoder_channels)
        )
        if tokens:
            self.films = nn.ModuleList(FiLM(o, tokens) for o in decoder_channels)

    def forward(self, features, size, mix=None):
        # mix (B, T): style-token weights of a conditioned decoder (SegModel.style_mix); None when unconditioned
        film = (lambda i, x: x) if mix is None else (lambda i, x: self.films[i](x, mix))
        x = features[-1]  # (B, C_last, H/32, W/32) for a 5-stage CNN
        for i, (block, skip) in enumerate(zip(self.blocks, features[-2::-1])):
            x = film(i, block(x, skip=skip))
        return film(len(self.blocks) - 1, self.blocks[-1](x, size=size))  # (B, decoder_channels[-1], H, W)


# The softmax classes of the authors' released models (their toolkit's order; CTW = cotton-wool spots) and, per
# lesion of LESIONS (EX, HE, MA, CWS), its softmax channel.
SOFTMAX_CLASSES = ("BG", "CTW", "EX", "HE", "MA")
SOFTMAX_LESIONS = (2, 3, 4, 1)


def one_vs_rest_logits(logits):
    """Softmax logits (B, 5, H, W) over SOFTMAX_CLASSES -> (B, 4, H, W) lesion logits whose sigmoid is the lesion's
    softmax probability: l_c - logsumexp(l_j, j != c), exact and stable (no log of a rounded probability)."""
    logits, out = logits.float(), []  # NOTE: float32 under autocast too: a difference of two large logits
    for c in SOFTMAX_LESIONS:
        rest = torch.cat([logits[:, :c], logits[:, c + 1:]], dim=1)
        out.append(logits[:, c] - torch.logsumexp(rest, dim=1))
    return torch.stack(out, dim=1)  # (B, 4, H, W)


def argmax_lesions(probs):
    """Lesion probabilities of a softmax model (B, 4, H, W) -> bool (B, 4, H, W): where the lesion is the argmax
    of the 5-way softmax (the background's probability being 1 minus their sum), as the authors' Dice counts.
    Ties go to the first of SOFTMAX_CLASSES, as torch.argmax."""
    bg = 1.0 - probs.sum(dim=1, keepdim=True)  # (B, 1, H, W)
    by_class = [bg] + [probs[:, SOFTMAX_LESIONS.index(c), None] for c in range(1, len(SOFTMAX_CLASSES))]
    winner = torch.cat(by_class, dim=1).argmax(dim=1)  # (B, H, W): an index into SOFTMAX_CLASSES
    return torch.stack([winner == c for c in SOFTMAX_LESIONS], dim=1)


def local_contrast(x, sigma):
    """Subtract each pixel's local mean (a Gaussian of `sigma` pixels, fundus pixels only) and rescale:
    (B, 3, H, W) in [0, 1] -> same shape, 0.5 + 4 (x - mean), black background kept at 0.5.

    Ben Graham's fundus normalisation (Kaggle DR 2015), as a fixed layer: lesions appear as local departures
    from the fundus colour whatever the photograph's illumination. The mean is a normalised convolution
    (blur of the masked image over blur of the mask), so the FOV edge and a patch's border are not darkened.
    """
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)

    def blur(v):  # separable, zero padding; (B, C, H, W)
        c = int(v.shape[1])  # a constant when traced: ONNX export needs a known kernel shape
        v = F.conv2d(v, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
        return F.conv2d(v, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)

    fov = (x.amax(dim=1, keepdim=True) > 10 / 255).to(x.dtype)  # (B, 1, H, W): not the black background
    mean = blur(x * fov) / blur(fov).clamp(min=1e-3)
    return (0.5 + 4 * (x - mean) * fov).clamp(0, 1)


class SegModel(nn.Module):
    """Float images in [0, 1] (B, 3, H, W) -> per-lesion logits (B, 4, H, W), any H and W.

    softmax=True (the authors' models): the head's `classes` = 5 channels are a softmax over SOFTMAX_CLASSES and
    forward returns one_vs_rest_logits, so sigmoid (protocol.predict) gives each lesion's softmax probability.
    pad_to: inputs padded with black (0, as the prepared images' padding) at the bottom and right to a multiple of
    it, the output cropped back; the authors' decoder upsamples by exactly 2 and only saw multiples of 32.
    style_tokens: the names of the style tokens of a conditioned decoder (FiLM after every block; style.py), and
    token_styles each token's labelling style; empty = unconditioned, the paper's model.
    """

    def __init__(self, encoder, decoder_channels=(256, 128, 64, 32, 16), attention=False, dropout=0.0, classes=4,
                 head_kernel=1, softmax=False, pad_to=1, local_contrast=0.0, style_tokens=(), token_styles=()):
        super().__init__()
        self.local_contrast = local_contrast  # sigma in pixels of the input; 0 = off (the paper)
        self.style_tokens, self.token_styles = tuple(style_tokens), tuple(token_styles or style_tokens)
        if len(self.token_styles) != len(self.style_tokens):
            raise ValueError(f"token_styles {self.token_styles} needs one style per token of {self.style_tokens}")
        # the style used when forward gets none: fine where a token is fine (what the test sets are labelled in)
        self.default_style = None if not style_tokens else "fine" if "fine" in self.token_styles else \
            self.token_styles[0]
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.feature_info.channels(), decoder_channels, attention, len(style_tokens))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(decoder_channels[-1], classes, head_kernel, padding=head_kernel // 2)
        self.softmax, self.pad_to = softmax, pad_to
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

    def styles(self):
        """The style names forward accepts: its tokens, then the labelling styles of dataset tokens."""
        return tuple(dict.fromkeys(self.style_tokens + self.token_styles))

    def style_mix(self, style, batch):
        """forward's `style` -> token weights (B, T), None for an unconditioned model given no style.

        None: the default style; a LongTensor (B,): one token index per sample (training); a name: a token
        (fine, coarse, IDR, ...), or a labelling style of dataset tokens = the mean of its datasets' tokens.
        """
        if not self.style_tokens:
            if style is not None:
                raise ValueError("the model is not style-conditioned (train.py --style-condition)")
            return None
        # NOTE: in the FiLM weights' dtype, so a model cast with .double() (interop's check) works
        gamma = self.decoder.films[0].gamma
        T, device, dtype = len(self.style_tokens), gamma.device, gamma.dtype
        if isinstance(style, torch.Tensor):
            return F.one_hot(style.to(device, torch.long), T).to(dtype)  # (B, T)
        name = str(self.default_style if style is None else style).lower()
        hits = [i for i, tokens in enumerate(zip(self.style_tokens, self.token_styles))
                if name in (t.lower() for t in tokens)]
        if not hits:
            raise ValueError(f"style {style!r} is not one of the model's: {', '.join(self.styles())}")
        mix = torch.zeros(T, device=device, dtype=dtype)
        mix[hits] = 1 / len(hits)
        return mix.expand(batch, T)  # (B, T)

    def forward(self, x, style=None):
        H, W = x.shape[-2:]
        mix = self.style_mix(style, x.shape[0])  # (B, T) or None
        if self.pad_to > 1:
            x = F.pad(x, (0, -W % self.pad_to, 0, -H % self.pad_to))  # (B, 3, H', W'), multiples of pad_to
        if self.local_contrast > 0:
            x = local_contrast(x, self.local_contrast)
        features = self.encoder((x - self.mean) / self.std)  # list of (B, C_i, H/r_i, W/r_i)
        if self._nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        x = self.decoder(features, size=x.shape[-2:], mix=mix)  # (B, decoder_channels[-1], H', W')
        logits = self.head(self.dropout(x))  # (B, classes, H', W')
        if self.softmax:
            logits = one_vs_rest_logits(logits)  # (B, 4, H', W')
        return logits[..., :H, :W] if self.pad_to > 1 else logits


@dataclass
class ModelConfig:
    encoder: str = "legacy_seresnet101.in1k"  # any timm model that supports features_only
    pretrained: bool = True  # ImageNet weights from the timm hub (downloaded once, then cached)
    decoder_channels: tuple = (256, 128, 64, 32, 16)  # one width per encoder feature, deepest first
    attention: bool = False  # scSE in every decoder block
    dropout: float = 0.0  # channel dropout before the head
    classes: int = 4  # EX, HE, MA, CWS
    encoder_weights: str | None = None  # local weights file; used instead of the hub when given
    head_kernel: int = 1  # the head conv's kernel (the authors' torchseg models: 3)
    softmax: bool = False  # head = softmax over SOFTMAX_CLASSES (needs classes=5; the authors' models)
    pad_to: int = 1  # pad inputs to a multiple of this (the authors' models: 32)
    local_contrast: float = 0.0  # sigma (pixels) of the local-mean subtraction of the input; 0 = off (model.local_contrast)
    style_tokens: tuple = ()  # style-conditioned decoder: token names (style.py); () = off, the paper
    token_styles: tuple = ()  # each token's labelling style (fine / mixed / coarse)


# What must agree for a checkpoint's weights to load into (or be averaged with) another model of this file;
# pretrained / encoder_weights / dropout / pad_to do not change the weights' shapes or meaning.
ARCH_FIELDS = ("encoder", "decoder_channels", "attention", "classes", "local_contrast", "head_kernel", "softmax",
               "style_tokens", "token_styles")


def architecture(cfg):
    """The ARCH_FIELDS of a model_cfg dict as a comparable tuple (lists and tuples compare equal)."""
    defaults = {f.name: f.default for f in fields(ModelConfig)}  # checkpoints older than a field lack it
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else v
                 for v in (cfg.get(f, defaults[f]) for f in ARCH_FIELDS))


def config_from_dict(d):
    """ModelConfig from a checkpoint's "model_cfg" dict; ValueError on unknown fields."""
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown model_cfg field {unknown[0]!r} (known: {', '.join(sorted(names))})")
    cfg = ModelConfig(**d)
    cfg.decoder_channels = tuple(int(c) for c in cfg.decoder_channels)
    cfg.style_tokens, cfg.token_styles = tuple(cfg.style_tokens), tuple(cfg.token_styles)
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
    if not pretrained:
        try:
            return timm.create_model(name, features_only=True, pretrained=False)
        except Exception as e:
            raise ValueError(f"cannot build timm encoder {name!r} with features_only=True ({_short(e)})") from None
    import hub  # NOTE: imported here: only downloads need it (and huggingface_hub)

    try:  # from the Hugging Face hub or a URL (hub.timm_source): one try when it does not answer
        create = lambda: timm.create_model(name, features_only=True, pretrained=True)  # noqa: E731
        return hub.fetch_pretrained(name, create)
    except Exception as e:
        try:  # tell a download failure (offline, proxy, hub down, bad cache) from an unusable encoder
            timm.create_model(name, features_only=True, pretrained=False)
        except Exception as e2:
            raise ValueError(f"cannot build timm encoder {name!r} with features_only=True ({_short(e2)})") from None
        fix = "pass --no-pretrained or --encoder-weights PATH (a local weights file)"
        raise ValueError(hub.pretrained_error(name, e, fix)) from None


def _unsafe_globals(path, e):
    """What a weights_only load refused in the file at path: its pickled classes and functions
    other than tensors and plain types ([] when the file is not a torch file at all)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # torch >= 2.5
    except Exception:
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    return [n for n in names if n != "argparse.Namespace"]


def _read_weights_file(path):
    """A user's weights file -> its state dict, never running code pickled in it (torch.load with
    weights_only=True, or safetensors). Takes a state dict, or one wrapped as timm's load_state_dict
    unwraps it ({"state_dict_ema"|"model_ema"|"state_dict"|"model": ...}, first found)."""
    where = f"--encoder-weights {path}"
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # noqa: PLC0415
        except ImportError:
            raise ImportError(f"{where} needs safetensors: pip install safetensors") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ValueError(f"{where} is not a weights file ({_short(e)})") from None
    try:
        # NOTE: not timm.models.load_state_dict: timm 1.0.9-1.0.25 unpickle with weights_only=False,
        # so a file could run code. argparse.Namespace: the args in timm's train.py checkpoints.
        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, e)
        if unsafe:
            raise ValueError(f"{where}: refused: it holds pickled {', '.join(unsafe[:3])}, which "
                             f"loading could run as code; pass a state dict of tensors or a "
                             f".safetensors file") from None
        raise ValueError(f"{where} is not a weights file ({_short(e)})") from None
    except Exception as e:
        raise ValueError(f"{where} is not a weights file ({_short(e)})") from None
    if isinstance(ckpt, dict):
        key = next((k for k in ("state_dict_ema", "model_ema", "state_dict", "model")
                    if isinstance(ckpt.get(k), dict)), None)
        ckpt = ckpt[key] if key else ckpt
    if not isinstance(ckpt, dict) or not all(isinstance(k, str) for k in ckpt):
        raise ValueError(f"{where} is not a weights file (no state dict in it)")
    return ckpt


def _load_encoder_weights(encoder, name, path):
    """Load a local file (timm/torchvision state dict of the classifier or of the features model) strictly.

    NOTE: timm's own route (pretrained_cfg_overlay=dict(file=...)) loads features_only models with
    strict=False, so a file with the wrong keys silently leaves random weights: we match keys ourselves.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--encoder-weights file not found: {path}")
    sd = strip_prefixes(_read_weights_file(path))  # "module." / "_orig_mod." prefixes
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
    if cfg.softmax and cfg.classes != len(SOFTMAX_CLASSES):
        raise ValueError(f"a softmax head needs classes={len(SOFTMAX_CLASSES)} ({', '.join(SOFTMAX_CLASSES)}), "
                         f"got {cfg.classes}")
    if cfg.head_kernel < 1 or cfg.head_kernel % 2 == 0 or cfg.pad_to < 1:
        raise ValueError(f"head_kernel must be odd and pad_to >= 1, got {cfg.head_kernel} and {cfg.pad_to}")
    local = cfg.encoder_weights is not None
    encoder = _create_encoder(cfg.encoder, cfg.pretrained and not local)
    if local:
        _load_encoder_weights(encoder, cfg.encoder, cfg.encoder_weights)
    return SegModel(encoder, tuple(cfg.decoder_channels), cfg.attention, cfg.dropout, cfg.classes,
                    cfg.head_kernel, cfg.softmax, cfg.pad_to, cfg.local_contrast, cfg.style_tokens, cfg.token_styles)


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


@contextlib.contextmanager
def ctrl_c_deferred():
    """Hold back Ctrl-C (SIGINT) until the block is done, then deliver it to the handler that was in place.

    torch.save interrupted half-way turns the KeyboardInterrupt into a RuntimeError from its zip writer
    ("unexpected pos ..."), a traceback instead of the one-line exit; held back, the file is written whole
    and the interrupt arrives after it. A second Ctrl-C does not wait (a write stuck on a slow disk can still
    be stopped). Blocks nest; off the main thread (where Python handles no signals), or under a handler
    installed outside Python, it does nothing. A block that raises drops a held-back Ctrl-C: its own error
    ends the work anyway."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    caught = []

    def hold(signum, frame):
        if caught:  # the second Ctrl-C: now
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        caught.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        signal.raise_signal(signal.SIGINT)  # now: the previous handler raises KeyboardInterrupt (or ignores it)


def save_checkpoint(path, ckpt):
    """Write ckpt atomically (cli.write_atomic, synced to disk before the rename) with unwrapped model keys and
    every tensor on the CPU. A Ctrl-C during the write takes effect once the file is complete; a full disk is
    one OSError naming `path`."""
    ckpt = _to_cpu(ckpt)
    if "model" in ckpt:
        ckpt["model"] = strip_prefixes(ckpt["model"])
    if "members" in ckpt:
        ckpt["members"] = [{**m, "model": strip_prefixes(m["model"])} if "model" in m else m for m in ckpt["members"]]

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old file or the new one
    try:
        with ctrl_c_deferred():
            cli.write_atomic(path, write)
    except (OSError, RuntimeError) as e:
        # NOTE: torch's zip writer often replaces a failed write's OSError (a full disk) with its own
        # RuntimeError ("unexpected pos ..."): the OSError, naming the checkpoint, is what the user can act on.
        cause = e
        while cause is not None and not isinstance(cause, (OSError, KeyboardInterrupt)):
            cause = cause.__context__
        if cause is None:
            raise
        if isinstance(cause, KeyboardInterrupt):  # a second Ctrl-C stopped the write (ctrl_c_deferred)
            raise KeyboardInterrupt from None
        raise OSError(cause.errno, f"cannot write the checkpoint ({cause.strerror or cause})", str(path)) from None


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
        member = f" (member {i})" if m is not ckpt else ""
        for key in ("model", "model_cfg"):
            if not isinstance(m, dict) or key not in m:
                raise ValueError(f"{where}{member} is not a model checkpoint: missing key {key!r}")
        if not isinstance(m["model_cfg"], dict):
            raise ValueError(f"{where}{member}: 'model_cfg' is a {type(m['model_cfg']).__name__}, not a dict")
        sd = m["model"]
        if not isinstance(sd, dict):
            raise ValueError(f"{where}{member}: 'model' is a {type(sd).__name__}, not a state dict "
                             f"(a dict of named tensors)")
        bad = next((k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        if bad is not None:
            raise ValueError(f"{where}{member}: 'model' entry {bad!r} is a {type(sd[bad]).__name__}, not a tensor")
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
    return manifest, [m if is_hub_spec(m) else path.parent / m for m in members]


def _load_manifest(path, seen):
    """The ensemble a manifest names, as one ensemble dict whose members are the loaded training checkpoints
    (a member that is itself an ensemble contributes its members)."""
    key = os.path.abspath(path)
    if key in seen:
        raise ValueError(f"ensemble manifest {path} lists itself (through its members)")
    manifest, paths = read_manifest(path)
    members = []
    for name, member in zip(manifest["members"], paths):
        if not is_hub_spec(member) and not member.exists():
            raise FileNotFoundError(f"ensemble manifest {path}: member {name} not found ({member})")
        manifest_member = not is_hub_spec(member) and member.suffix == ".json"
        ckpt = _load_manifest(member, seen | {key}) if manifest_member else load_checkpoint(member)
        members += ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt]
    # NOTE: the first member's training args (resolution, combination, data flags) describe the ensemble,
    # as they did in the older ensemble files that embedded every member's weights.
    return {"kind": "ensemble", "members": members, "args": members[0].get("args") or {},
            "provenance": manifest.get("provenance") or {}, "version": manifest.get("version", 1)}


# ---- the authors' released models: torchseg's U-Net in the Hugging Face hub layout ----

AUTHORS_RESOLUTION = 1024  # their model card: trained and run at 1024 px
# config.json of every released model (huggingface_hub's PyTorchModelHubMixin writes the __init__ arguments)
AUTHORS_CONFIG = {"arch": "unet", "encoder": "seresnext50_32x4d", "in_channels": 3, "classes": 5}
# torchseg's keys (under "model.") -> ours; a key no rule matches has no counterpart here
TORCHSEG_KEYS = (
    (r"model\.encoder\.model\.(.+)", r"encoder.\1"),  # its TimmEncoder wraps the same timm features_only model
    (r"model\.decoder\.blocks\.(\d+)\.conv([12])\.0\.weight", r"decoder.blocks.\1.conv\2.conv.weight"),
    (r"model\.decoder\.blocks\.(\d+)\.conv([12])\.1\.(.+)", r"decoder.blocks.\1.conv\2.bn.\3"),
    (r"model\.segmentation_head\.0\.(weight|bias)", r"head.\1"),
)


def is_hub_spec(path):
    """'hub:IDR+DDR' or 'hub:': one of the authors' models, downloaded by hub.py."""
    return str(path).startswith("hub:")


def torchseg_model_cfg(config, where):
    """A hub config.json dict -> our model_cfg: the same U-Net with a 3x3 head, a softmax, inputs padded to 32."""
    unknown = sorted(set(config) - set(AUTHORS_CONFIG))
    if unknown:
        raise ValueError(f"{where}: key {unknown[0]!r} is not read here (known: {', '.join(AUTHORS_CONFIG)})")
    if str(config.get("arch", "")).lower() != "unet":
        raise ValueError(f"{where}: arch {config.get('arch')!r}: only torchseg's unet maps onto this U-Net")
    if config.get("in_channels", 3) != 3 or config.get("classes") != len(SOFTMAX_CLASSES):
        raise ValueError(f"{where}: needs in_channels 3 and classes {len(SOFTMAX_CLASSES)} "
                         f"({', '.join(SOFTMAX_CLASSES)}), got {config.get('in_channels')} and {config.get('classes')}")
    name = config.get("encoder")
    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"{where}: encoder {name!r} is not a timm model")
    # NOTE: torchseg's TimmEncoder.fix_padding() pads 3x3 convs and max-pools that timm leaves unpadded (Inception
    # nets); with such an encoder our model would compute another function, so it is refused.
    with torch.device("meta"):
        modules = timm.create_model(name, features_only=True).modules()
    if any((isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.padding == (0, 0))
           or (isinstance(m, nn.MaxPool2d) and m.padding == 0) for m in modules):
        raise ValueError(f"{where}: torchseg re-pads encoder {name} (unpadded 3x3 convs or max-pools); not supported")
    return asdict(ModelConfig(encoder=name, pretrained=False, classes=len(SOFTMAX_CLASSES), head_kernel=3,
                              softmax=True, pad_to=32))


def torchseg_state_dict(sd, where):
    """torchseg Unet keys -> ours, every key mapped or one error; load_models then checks names and shapes."""
    out = {}
    for k, v in sd.items():
        for pattern, target in TORCHSEG_KEYS:
            if re.fullmatch(pattern, k):
                out[re.sub(pattern, target, k)] = v
                break
        else:
            raise ValueError(f"{where}: key {k!r} has no counterpart in this U-Net (torchseg's unet without "
                             f"decoder attention, centre block or auxiliary head maps onto it)")
    return out


def load_hub_layout(path, train=None, source=None):
    """The authors' layout (a folder with config.json and model.safetensors whose torchseg keys lie under
    "model.", or that .safetensors file; a file without config.json beside it is read as AUTHORS_CONFIG)
    -> a training-format checkpoint dict, args {"resolution": 1024, "train": train}, method "authors"."""
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config_path = weights.parent / "config.json"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors (expected the hub layout: config.json and "
                                f"model.safetensors)")
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{config_path} is not readable JSON ({_short(e)})") from None
    elif path.is_dir():
        raise FileNotFoundError(f"{path}: no config.json (expected the hub layout: config.json and model.safetensors)")
    else:
        config = AUTHORS_CONFIG
    model_cfg = torchseg_model_cfg(config if isinstance(config, dict) else {}, config_path)
    try:
        from safetensors.torch import load_file  # installed with timm

        sd = load_file(weights)
    except Exception as e:
        raise ValueError(f"{weights} is not a safetensors file ({_short(e)})") from None
    return {"model": torchseg_state_dict(sd, weights), "model_cfg": model_cfg,
            # NOTE: trained on the authors' own splits (data.splits, protocol "authors"): evaluate.py reads
            # their test images unless told otherwise
            "args": {"resolution": AUTHORS_RESOLUTION, "train": train, "split_protocol": "authors"},
            "method": "authors",
            "provenance": {"method": "authors", "source": source or str(path)}, "version": 1}


def load_checkpoint(path):
    """torch.load(weights_only=True) on CPU; one-line errors naming the path. An ensemble manifest (.json,
    written by `average.py ensemble`) comes back as {"kind": "ensemble", "members": [checkpoints], ...}; the
    authors' models (a hub spec such as hub:IDR+DDR, a hub-layout folder or .safetensors) as load_hub_layout."""
    if is_hub_spec(path):
        import hub  # NOTE: imported here: only downloads need it (and huggingface_hub)

        folder, ids, source = hub.resolve(str(path))
        return load_hub_layout(folder, ids, source)
    path = Path(path)
    if path.is_dir() and not (path / "model.safetensors").exists() and \
            any((path / name).exists() for name in ("best.pt", "last.pt", "args.json")):
        raise ValueError(f"{path} is a training run's folder, not a checkpoint: pass {path / 'best.pt'}")
    if path.is_dir() or path.suffix == ".safetensors":
        return load_hub_layout(path)
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
