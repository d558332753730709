"""U-Net with a timm encoder for multi-label lesion segmentation (EX, HE, MA, CWS); its checkpoints.

    python -c "import model; print(model.build_model(model.ModelConfig(pretrained=False)))"
    python -c "import model; print(model.load_models('runs/IDR+MES/s0/best.pt')[0].cfg)"

Paper section 2.3: a U-Net on timm's ImageNet SE-ResNet101 (`legacy_seresnet101.in1k`), scSE as
the optional decoder variant; the decoder follows segmentation_models_pytorch's U-Net (one block per
skip, a final block at the input resolution, a 1x1 head). Needs only torch and timm: copy it into
another project to build, save, load and run the model. Checkpoints are plain dicts ("model",
"model_cfg", "args", "step", ...) that torch.load(path, weights_only=True) reads; model_cfg carries
the model's input contract (the square `resolution` it runs at, the `lesions` it was trained on).
"""
import contextlib
import os
import signal
import threading
import uuid
import zipfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

LESIONS = ("EX", "HE", "MA", "CWS")  # output channels, this order everywhere (= data.ids.LESIONS)
# The authors' released models (authors.py) end in a softmax over these classes (CTW = cotton-wool
# spots); SOFTMAX_LESIONS gives each of LESIONS its softmax channel.
SOFTMAX_CLASSES = ("BG", "CTW", "EX", "HE", "MA")
SOFTMAX_LESIONS = (2, 3, 4, 1)


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
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, ch, 1))
        self.spatial = nn.Conv2d(ch, 1, 1)  # sSE: one weight per pixel

    def forward(self, x):
        # x * cSE + x * sSE, with one full-size product instead of two
        return x * (torch.sigmoid(self.channel(x)) + torch.sigmoid(self.spatial(x)))  # (B, C, H, W)


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concat it, two ConvBNReLU; scSE after the concat and last."""

    def __init__(self, in_ch, skip_ch, out_ch, attention=False):
        super().__init__()
        self.conv1 = ConvBNReLU(in_ch + skip_ch, out_ch)
        self.attention1 = SCSE(in_ch + skip_ch) if attention and skip_ch else nn.Identity()
        self.conv2 = ConvBNReLU(out_ch, out_ch)
        self.attention2 = SCSE(out_ch) if attention else nn.Identity()

    def forward(self, x, skip=None, size=None):
        # NOTE: to the actual size, never x2: the stem's ceil_mode max-pool rounds odd sizes up
        x = F.interpolate(x, size=skip.shape[-2:] if skip is not None else size, mode="nearest")
        if skip is not None:
            x = self.attention1(torch.cat([x, skip], dim=1))  # (B, in_ch + skip_ch, h, w)
        return self.attention2(self.conv2(self.conv1(x)))  # (B, out_ch, h, w)


class FiLM(nn.Module):
    """A style token's per-channel scale and shift (FiLM, Perez et al. 2018, arXiv:1709.07871).
    Offsets from the identity (scale = 1 + gamma, shift = beta, 0 at init): a fresh conditioned
    model computes exactly the unconditioned function, and weight decay pulls towards it."""

    def __init__(self, ch, tokens):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(tokens, ch))
        self.beta = nn.Parameter(torch.zeros(tokens, ch))

    def forward(self, x, mix):
        # mix (B, T): token weights (one-hot, or a mean of tokens); x (B, C, h, w)
        scale, shift = 1 + (mix @ self.gamma).to(x.dtype), (mix @ self.beta).to(x.dtype)  # (B, C)
        return x * scale[:, :, None, None] + shift[:, :, None, None]


class UNetDecoder(nn.Module):
    """Deepest feature up through every shallower skip, then a final block back to the input size.
    tokens > 0: a FiLM after every block (style conditioning); 0 adds no module, parameter or op."""

    def __init__(self, encoder_channels, decoder_channels, attention=False, tokens=0):
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(f"decoder_channels needs {len(encoder_channels)} widths, one per "
                             f"encoder feature (got {len(decoder_channels)}: "
                             f"{tuple(decoder_channels)})")
        skips = list(encoder_channels[-2::-1]) + [0]  # deepest skip first; the last block has none
        ins = [encoder_channels[-1]] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o, attention) for i, s, o in zip(ins, skips, decoder_channels))
        if tokens:
            self.films = nn.ModuleList(FiLM(o, tokens) for o in decoder_channels)

    def forward(self, features, size, mix=None):
        # mix (B, T): style-token weights (SegModel.style_mix); None when unconditioned
        film = (lambda i, x: x) if mix is None else (lambda i, x: self.films[i](x, mix))
        x = features[-1]  # (B, C_last, H/32, W/32) for a 5-stage CNN
        for i, (block, skip) in enumerate(zip(self.blocks, features[-2::-1])):
            x = film(i, block(x, skip=skip))
        return film(len(self.blocks) - 1, self.blocks[-1](x, size=size))  # (B, channels[-1], H, W)


def one_vs_rest_logits(logits):
    """Softmax logits (B, 5, H, W) over SOFTMAX_CLASSES -> (B, 4, H, W) lesion logits whose sigmoid
    is the lesion's softmax probability: l_c - logsumexp(l_j, j != c), exact and stable."""
    logits, out = logits.float(), []  # NOTE: float32 under autocast too: differences of big logits
    for c in SOFTMAX_LESIONS:
        rest = torch.cat([logits[:, :c], logits[:, c + 1:]], dim=1)
        out.append(logits[:, c] - torch.logsumexp(rest, dim=1))
    return torch.stack(out, dim=1)  # (B, 4, H, W)


def local_contrast(x, sigma):
    """Ben Graham's fundus normalisation (Kaggle DR 2015) as a fixed layer: (B, 3, H, W) in [0, 1]
    -> 0.5 + 4 (x - local mean), a Gaussian of `sigma` px over fundus pixels; background stays 0.5.
    Lesions stand out from the fundus colour whatever the illumination. The mean is a normalised
    convolution (blur of the masked image over blur of the mask): the FOV edge and a patch's border
    are not darkened."""
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)

    def blur(v):  # separable, zero padding; (B, C, H, W)
        c = int(v.shape[1])  # a constant when traced: ONNX export needs a known kernel shape
        v = F.conv2d(v, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
        return F.conv2d(v, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)

    fov = (x.amax(dim=1, keepdim=True) > 10 / 255).to(x.dtype)  # (B, 1, H, W): the fundus
    mean = blur(x * fov) / blur(fov).clamp(min=1e-3)
    return (0.5 + 4 * (x - mean) * fov).clamp(0, 1)


@dataclass
class ModelConfig:
    encoder: str = "legacy_seresnet101.in1k"  # any timm model that supports features_only
    pretrained: bool = True  # start from the encoder's ImageNet weights (timm downloads them once)
    decoder_channels: tuple = (256, 128, 64, 32, 16)  # one width per encoder feature, deepest first
    attention: bool = False  # scSE in every decoder block
    dropout: float = 0.0  # channel dropout before the head
    classes: int = 4  # EX, HE, MA, CWS
    head_kernel: int = 1  # the head conv's kernel (the authors' torchseg models: 3)
    softmax: bool = False  # head = softmax over SOFTMAX_CLASSES (needs classes=5; the authors')
    pad_to: int = 1  # pad inputs to a multiple of this (the authors' models: 32)
    local_contrast: float = 0.0  # sigma (px) of the input's local-mean subtraction; 0 = off (paper)
    style_tokens: tuple = ()  # style-conditioned decoder: token names; () = off, the paper's model
    token_styles: tuple = ()  # each token's labelling style (fine / mixed / coarse)
    # the input contract: the square size images are prepared at, the lesions it learned
    resolution: int | None = None
    lesions: tuple = LESIONS


# What must agree for weights to load into (or be averaged with) another model; pretrained, dropout,
# pad_to and the input contract change neither the weights' shapes nor their meaning.
ARCH_FIELDS = ("encoder", "decoder_channels", "attention", "classes", "local_contrast",
               "head_kernel", "softmax", "style_tokens", "token_styles")
OBSOLETE_FIELDS = ("encoder_weights",)  # older model_cfg keys, ignored (the weights are in "model")


def config_from_dict(d, args=None):
    """ModelConfig from a checkpoint's "model_cfg" (ValueError on an unknown field). Checkpoints
    older than the input contract take it from their training `args` (resolution, lesions)."""
    names = {f.name for f in fields(ModelConfig)}
    d = {k: v for k, v in d.items() if k not in OBSOLETE_FIELDS}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown model_cfg field {unknown[0]!r} "
                         f"(known: {', '.join(sorted(names))})")
    args = args if isinstance(args, dict) else {}
    if d.get("resolution") is None:  # absent, or None (made without one): the training args'
        d["resolution"] = args.get("resolution")
    d.setdefault("lesions", args.get("lesions") or LESIONS)
    cfg = ModelConfig(**d)
    cfg.decoder_channels = tuple(int(c) for c in cfg.decoder_channels)
    cfg.style_tokens, cfg.token_styles = tuple(cfg.style_tokens), tuple(cfg.token_styles)
    cfg.lesions = tuple(str(x) for x in cfg.lesions)
    if cfg.resolution is not None:
        try:
            number = int(cfg.resolution)
            bad = number < 1 or str(number) != str(cfg.resolution).strip().removesuffix(".0")
        except (TypeError, ValueError):
            bad = True
        if bad:
            raise ValueError(f"resolution {cfg.resolution!r} is not a whole number of pixels >= 1")
        cfg.resolution = number
    unknown = [x for x in cfg.lesions if x not in LESIONS]
    if unknown or not cfg.lesions:
        raise ValueError(f"lesions {list(cfg.lesions)}: choose among {', '.join(LESIONS)}")
    return cfg


def architecture(cfg):
    """The ARCH_FIELDS of a model_cfg dict as a comparable tuple (lists equal tuples)."""
    defaults = {f.name: f.default for f in fields(ModelConfig)}  # older checkpoints lack new fields
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else v
                 for v in (cfg.get(f, defaults[f]) for f in ARCH_FIELDS))


class SegModel(nn.Module):
    """Float images in [0, 1] (B, 3, H, W) -> per-lesion logits (B, 4, H, W), any H and W.

    cfg.softmax (the authors' models): the head's 5 channels are a softmax over SOFTMAX_CLASSES,
    forward returns one_vs_rest_logits. cfg.pad_to: inputs padded with black at the bottom and
    right to a multiple of it, the output cropped back. cfg.style_tokens: a conditioned decoder
    (FiLM after every block); forward(x, style) picks the style (default: fine).
    """

    def __init__(self, encoder, cfg):
        super().__init__()
        self.cfg = cfg
        self.local_contrast = cfg.local_contrast
        self.style_tokens = tuple(cfg.style_tokens)
        self.token_styles = tuple(cfg.token_styles or cfg.style_tokens)
        if len(self.token_styles) != len(self.style_tokens):
            raise ValueError(f"token_styles {self.token_styles} needs one style per token of "
                             f"{self.style_tokens}")
        # forward's style when given none: fine where a token is (the test sets' labelling style)
        self.default_style = (None if not self.style_tokens
                              else "fine" if "fine" in self.token_styles else self.token_styles[0])
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.feature_info.channels(), tuple(cfg.decoder_channels),
                                   cfg.attention, len(self.style_tokens))
        self.dropout = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(cfg.decoder_channels[-1], cfg.classes, cfg.head_kernel,
                              padding=cfg.head_kernel // 2)
        self.softmax, self.pad_to = cfg.softmax, cfg.pad_to
        pretrained = getattr(encoder, "pretrained_cfg", None) or {}
        mean = pretrained.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)
        std = pretrained.get("std", timm.data.IMAGENET_DEFAULT_STD)
        # NOTE: non-persistent: they follow from the encoder's name, so state dicts (and weight
        # averages) hold only learned tensors and buffers
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self._nhwc = getattr(encoder, "output_fmt", "NCHW") == "NHWC"  # some transformer encoders
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def styles(self):
        """The style names forward accepts: its tokens, then the styles of dataset tokens."""
        return tuple(dict.fromkeys(self.style_tokens + self.token_styles))

    def style_mix(self, style, batch):
        """forward's `style` -> token weights (B, T), None for an unconditioned model given none.
        style None: the default; a LongTensor (B,): one token per sample (training); a name: a
        token (fine, coarse, IDR, ...), or a style of dataset tokens (the mean of its datasets')."""
        if not self.style_tokens:
            if style is not None:
                raise ValueError("the model is not style-conditioned (train.py --style-condition)")
            return None
        T, gamma = len(self.style_tokens), self.decoder.films[0].gamma
        if isinstance(style, torch.Tensor):
            return F.one_hot(style.to(gamma.device, torch.long), T).to(gamma.dtype)  # (B, T)
        name = str(self.default_style if style is None else style).lower()
        hits = [i for i, tokens in enumerate(zip(self.style_tokens, self.token_styles))
                if name in (t.lower() for t in tokens)]
        if not hits:
            raise ValueError(f"style {style!r} is not one of the model's: "
                             f"{', '.join(self.styles())}")
        # NOTE: the weights' dtype (a .double() model: interop.py checks an export in float64)
        mix = torch.zeros(T, device=gamma.device, dtype=gamma.dtype)
        mix[hits] = 1 / len(hits)
        return mix.expand(batch, T)  # (B, T)

    def forward(self, x, style=None):
        H, W = x.shape[-2:]
        mix = self.style_mix(style, x.shape[0])  # (B, T) or None
        if self.pad_to > 1:
            x = F.pad(x, (0, -W % self.pad_to, 0, -H % self.pad_to))  # (B, 3, H', W')
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


def create_encoder(name, pretrained=False):
    """timm's features_only model `name` (ImageNet weights: downloaded by timm, then cached)."""
    if not timm.is_model(name):
        raise ValueError(f"unknown timm encoder {name!r} (see timm.list_models(); "
                         f"paper: legacy_seresnet101.in1k)")
    try:
        return timm.create_model(name, features_only=True, pretrained=pretrained)
    except Exception as e:
        raise ValueError(f"cannot build timm encoder {name!r} with features_only=True "
                         f"({_short(e)})") from None


def build_model(cfg, encoder=None):
    """SegModel of a ModelConfig. encoder: a features_only model to use (weights.py builds one
    from a download or a weights file); None: create_encoder's."""
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.softmax and cfg.classes != len(SOFTMAX_CLASSES):
        raise ValueError(f"a softmax head needs classes={len(SOFTMAX_CLASSES)} "
                         f"({', '.join(SOFTMAX_CLASSES)}), got {cfg.classes}")
    if cfg.head_kernel < 1 or cfg.head_kernel % 2 == 0 or cfg.pad_to < 1:
        raise ValueError(f"head_kernel must be odd and pad_to >= 1, got {cfg.head_kernel} and "
                         f"{cfg.pad_to}")
    encoder = encoder if encoder is not None else create_encoder(cfg.encoder, cfg.pretrained)
    return SegModel(encoder, cfg)


# ---- checkpoints -------------------------------------------------------------------------------
def strip_prefixes(state_dict):
    """Drop DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") wrappers from the keys."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".")] = v  # a compiled submodule
    return out


def _to_cpu(obj):
    """Every tensor of a nested dict/list on the CPU: torch.load then works without a GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@contextlib.contextmanager
def ctrl_c_deferred():
    """Hold back Ctrl-C (SIGINT) until the block is done, then deliver it to the previous handler.

    NOTE: torch.save interrupted half-way turns the KeyboardInterrupt into a RuntimeError from its
    zip writer ("unexpected pos ..."); held back, the file is written whole first. A second Ctrl-C
    does not wait. Blocks nest; off the main thread, or under a handler installed outside Python,
    it does nothing. A block that raises drops a held-back Ctrl-C: its own error ends the work.
    """
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
        signal.raise_signal(signal.SIGINT)  # the previous handler: KeyboardInterrupt (or ignored)


def save_checkpoint(path, ckpt):
    """Write ckpt whole or not at all (unwrapped keys, tensors on the CPU, a temporary file synced
    then renamed): a Ctrl-C lands once the file is whole; a full disk: one OSError naming `path`."""
    path = Path(path)
    ckpt = _to_cpu(ckpt)
    if "model" in ckpt:
        ckpt["model"] = strip_prefixes(ckpt["model"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # .tmp: no *.pt glob sees it
    try:
        with ctrl_c_deferred():
            with open(tmp, "wb") as f:
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old or the new
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # NOTE: torch's zip writer often replaces a failed write's OSError (a full disk) with its
        # own RuntimeError ("unexpected pos ..."): the OSError is what the user can act on
        cause = e
        while cause is not None and not isinstance(cause, (OSError, KeyboardInterrupt)):
            cause = cause.__context__
        if cause is None:
            raise
        if isinstance(cause, KeyboardInterrupt):  # a second Ctrl-C stopped the write
            raise KeyboardInterrupt from None
        raise OSError(cause.errno, f"cannot write the checkpoint ({cause.strerror or cause})",
                      str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def _short(e):
    """One line describing an exception, for error messages."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    line = text[0] if len(text[0]) <= 150 else text[0][:150].rsplit(" ", 1)[0] + " ..."  # a word
    return f"{type(e).__name__}: {line}"


def check_checkpoint(ckpt, where):
    """The models of a checkpoint dict: [ckpt], or an older ensemble file's "members"; a ValueError
    naming `where` unless each is {"model": {name: tensor}, "model_cfg": dict, ...}."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{where} is not a checkpoint (a {type(ckpt).__name__}, expected a dict)")
    members = ckpt.get("members") if ckpt.get("kind") == "ensemble" else [ckpt]
    if not isinstance(members, list) or not members:
        raise ValueError(f"{where} is an ensemble file without a non-empty 'members' list")
    for i, m in enumerate(members):
        member = f" (member {i})" if m is not ckpt else ""
        for key in ("model", "model_cfg"):
            if not isinstance(m, dict) or key not in m:
                raise ValueError(f"{where}{member} is not a model checkpoint: missing key {key!r}")
        if not isinstance(m["model_cfg"], dict):
            raise ValueError(f"{where}{member}: 'model_cfg' is a {type(m['model_cfg']).__name__}, "
                             f"not a dict")
        sd = m["model"]
        if not isinstance(sd, dict):
            raise ValueError(f"{where}{member}: 'model' is a {type(sd).__name__}, not a state dict "
                             f"(a dict of named tensors)")
        bad = next((k for k, v in sd.items()
                    if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        if bad is not None:
            raise ValueError(f"{where}{member}: 'model' entry {bad!r} is a "
                             f"{type(sd[bad]).__name__}, not a tensor")
    return members


def load_checkpoint(path):
    """torch.load(weights_only=True) on the CPU, checked (check_checkpoint); errors name `path`."""
    path = Path(path)
    if path.is_dir() and any((path / n).exists() for n in ("best.pt", "last.pt", "args.json")):
        raise ValueError(f"{path} is a training run's folder, not a checkpoint: "
                         f"pass {path / 'best.pt'}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # mmap (zip-format files only, torch >= 1.6): tensors read lazily, a peek at "args" is cheap
        ckpt = torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise ValueError(f"{path} is not a torch checkpoint loadable with weights_only=True "
                         f"({_short(e)})") from None
    check_checkpoint(ckpt, str(path))
    return ckpt


def load_models(path_or_ckpt, device="cpu", where=None):
    """[SegModel] in eval mode, each with its ModelConfig as .cfg: one for a training checkpoint,
    one per member of an older ensemble file. where: the name errors give a checkpoint dict."""
    if isinstance(path_or_ckpt, dict):
        ckpt, where = path_or_ckpt, where or "checkpoint"
    else:
        ckpt, where = load_checkpoint(path_or_ckpt), str(path_or_ckpt)
    models = []
    for i, m in enumerate(check_checkpoint(ckpt, where)):
        name = where if "members" not in ckpt else f"{where} (member {i})"
        try:
            cfg = config_from_dict(m["model_cfg"], m.get("args") or ckpt.get("args"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: bad model_cfg ({_short(e)})") from None
        model = build_model(replace(cfg, pretrained=False))  # the checkpoint holds every weight
        sd, own = strip_prefixes(m["model"]), model.state_dict()
        bad = [f"missing key {k!r}" for k in own if k not in sd]
        bad += [f"unexpected key {k!r}" for k in sd if k not in own]
        bad += [f"key {k!r} has shape {tuple(sd[k].shape)}, model has {tuple(v.shape)}"
                for k, v in own.items() if k in sd and sd[k].shape != v.shape]
        if bad:
            raise ValueError(f"{name}: state dict does not match its model_cfg (encoder "
                             f"{cfg.encoder}): {bad[0]} ({len(bad)} problems)")
        # NOTE: a diverged run's NaN weights would score a silent 0.000; refuse them instead
        broken = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise ValueError(f"{name}: {len(broken)} weight tensor(s) hold NaN or inf (first "
                             f"{broken[0]!r}): the run diverged; use an earlier checkpoint (its "
                             f"best.pt or snapshots/)")
        model.load_state_dict(sd)
        models.append(model.to(device).eval())
    return models
