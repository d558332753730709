"""Weights from elsewhere, each failure in one line and fast offline: timm's ImageNet encoders, a
local weights file, and the Hugging Face downloads of the authors' released models (authors.py).

    python -c "import weights; print(weights.encoder_source('legacy_seresnet101.in1k'))"  # where
    python train.py --train IDR --encoder-weights seresnet101.pth ...                     # a file

timm takes an encoder's pretrained weights from the Hugging Face hub when the model has a hub id
(test_resnet, seresnext50_32x4d), into the Hugging Face cache; otherwise from a URL on GitHub, into
torch's hub cache $TORCH_HOME/hub/checkpoints (the paper's legacy_seresnet101.in1k). Before a
download, one request with a 5 s timeout asks whether the source answers: when it does not (offline,
a proxy, the hub down), a cached copy is used without asking again (huggingface_hub's own offline
mode), else one line names the source and the cache. HF_HUB_OFFLINE=1 keeps both off the network.
"""
import contextlib
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import timm
import torch

import model
from utils import reason

TIMEOUT = 5.0  # seconds one probe of a download source may take


# ---- the Hugging Face hub ------------------------------------------------------------------------
def hf():
    """huggingface_hub (installed with timm), or one line saying how to install it."""
    try:
        import huggingface_hub  # noqa: PLC0415
    except ImportError:
        raise ImportError("the authors' models and pretrained weights download through "
                          "huggingface_hub, which is not installed: pip install huggingface_hub"
                          ) from None
    return huggingface_hub


def hf_offline():
    """HF_HUB_OFFLINE as huggingface_hub reads it (also without huggingface_hub)."""
    try:
        return bool(hf().constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_answers(repo_id):
    """Whether the hub answers one request about repo_id within TIMEOUT (an HTTP error answers)."""
    try:
        hf().HfApi().model_info(repo_id, timeout=TIMEOUT)
    except hf().errors.HfHubHTTPError:  # an answer: the download itself says what is wrong
        pass
    except Exception:
        return False
    return True


@contextlib.contextmanager
def hf_offline_mode(on=True):
    """huggingface_hub's offline mode (HF_HUB_OFFLINE) for the block: files from its cache only."""
    constants = hf().constants
    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = was or on  # huggingface_hub reads it at each call
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def hub_call(call, repo_id):
    """call() (a download from repo_id) when the hub answers; when it does not, or HF_HUB_OFFLINE is
    set, call() in offline mode: from the cache, or an error at once (not minutes of retries)."""
    offline = hf_offline() or not hub_answers(repo_id)
    with hf_offline_mode(offline):
        return call()


def hub_error(what, e, fix):
    """The line for a failed hub download of `what`: why, the cache, HF_HUB_OFFLINE, `fix`."""
    offline = hf_offline()
    why = ("HF_HUB_OFFLINE is set" if offline
           else f"the hub did not answer in {TIMEOUT:g} s, or {reason(e)}")
    tail = "" if offline else "; HF_HUB_OFFLINE=1 uses the cache without asking the hub"
    return (f"could not download {what} ({why}; not in the Hugging Face cache "
            f"{hf().constants.HF_HUB_CACHE}); {fix}{tail}")


# ---- timm's pretrained encoders ------------------------------------------------------------------
def encoder_source(name):
    """Where timm takes the pretrained weights of `name` from -> ("hf-hub", repo id, None) or
    ("url", URL, the file of torch's hub cache that timm reads, or downloads into)."""
    cfg = timm.models.get_pretrained_cfg(name)
    # NOTE: timm takes the hub wherever the model has a hub id (timm.models._builder's
    # _resolve_pretrained_source)
    if cfg.hf_hub_id or not cfg.url:
        return "hf-hub", cfg.hf_hub_id, None
    file = os.path.basename(urllib.parse.urlparse(cfg.url).path)
    return "url", cfg.url, Path(torch.hub.get_dir()) / "checkpoints" / file


def url_answers(url):
    """One HEAD request within TIMEOUT (the user's proxy settings apply, no retries); OSError if
    nobody answers."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT).close()
    except urllib.error.HTTPError:
        pass  # an answer: the download itself says what is wrong


def pretrained_encoder(name):
    """timm's features_only encoder `name` with its ImageNet weights, downloaded once and cached;
    one line when they cannot be had (source, why, cache, what to pass instead)."""
    if not timm.is_model(name):
        raise ValueError(f"unknown timm encoder {name!r} (see timm.list_models(); "
                         f"paper: legacy_seresnet101.in1k)")
    if not timm.is_model_pretrained(name):
        raise ValueError(f"timm has no pretrained weights for {name!r}; pass --no-pretrained or "
                         f"--encoder-weights PATH (the paper's encoder is legacy_seresnet101.in1k)")
    source, where, cached = encoder_source(name)
    create = lambda: timm.create_model(name, features_only=True, pretrained=True)  # noqa: E731
    fix = "pass --no-pretrained or --encoder-weights PATH (a local weights file)"
    try:
        if source == "hf-hub":
            return hub_call(create, where)
        if not cached.is_file():
            if hf_offline():
                raise ConnectionError("HF_HUB_OFFLINE is set")
            # NOTE: torch's download has no timeout: a blocked network would hang for minutes
            url_answers(where)
        return create()
    except Exception as e:
        model.create_encoder(name)  # an unusable encoder (not a download failure): its own line
        if source == "hf-hub":
            raise ValueError(hub_error(f"pretrained weights for {name} from the Hugging Face hub "
                                       f"repository {where}", e, fix)) from None
        raise ValueError(f"could not download pretrained weights for {name} from {where} "
                         f"({reason(e)}; not in torch's hub cache: {cached}); {fix}") from None


def create_encoder(name, pretrained=True, weights_file=None):
    """The encoder of a new model: from a local weights file (read_weights_file, strict), with its
    ImageNet weights (pretrained_encoder), or random."""
    if weights_file is not None:
        encoder = model.create_encoder(name)
        load_encoder_weights(encoder, name, weights_file)
        return encoder
    return pretrained_encoder(name) if pretrained else model.create_encoder(name)


# ---- a local weights file: never run what it pickles --------------------------------------------
def _unsafe_globals(path, e):
    """What a weights_only load refused in the file: its pickled classes and functions other than
    tensors and plain types ([] when the file is not a torch file at all)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # torch >= 2.5
    except Exception:
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    return [n for n in names if n != "argparse.Namespace"]


def read_weights_file(path):
    """A user's weights file -> its state dict, never running code pickled in it (torch.load with
    weights_only=True, or safetensors). A state dict, or one wrapped as timm wraps them
    ({"state_dict_ema"|"model_ema"|"state_dict"|"model": ...}, the first found)."""
    import argparse  # noqa: PLC0415 (the args of timm's train.py checkpoints)

    where = f"--encoder-weights {path}"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415 (installed with timm)

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ValueError(f"{where} is not a weights file ({reason(e)})") from None
    try:
        # NOTE: not timm.models.load_state_dict: timm 1.0.9-1.0.25 unpickle with weights_only=False
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, e)
        if unsafe:
            raise ValueError(f"{where}: refused: it holds pickled {', '.join(unsafe[:3])}, which "
                             f"loading could run as code; pass a state dict of tensors or a "
                             f".safetensors file") from None
        raise ValueError(f"{where} is not a weights file ({reason(e)})") from None
    except Exception as e:
        raise ValueError(f"{where} is not a weights file ({reason(e)})") from None
    if isinstance(ckpt, dict):
        key = next((k for k in ("state_dict_ema", "model_ema", "state_dict", "model")
                    if isinstance(ckpt.get(k), dict)), None)
        ckpt = ckpt[key] if key else ckpt
    if not isinstance(ckpt, dict) or not all(isinstance(k, str) for k in ckpt):
        raise ValueError(f"{where} is not a weights file (no state dict in it)")
    return ckpt


def load_encoder_weights(encoder, name, path):
    """Load a local file (a timm / torchvision state dict of the classifier or of the features
    model, or one of our checkpoints' encoder) into `encoder`, every key matched.

    NOTE: timm's own route (pretrained_cfg_overlay=dict(file=...)) loads features_only models with
    strict=False, so a file with the wrong keys would silently leave random weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--encoder-weights file not found: {path}")
    sd = model.strip_prefixes(read_weights_file(path))  # "module." / "_orig_mod." prefixes
    if any(k.startswith("encoder.") for k in sd):  # one of our own checkpoints: take its encoder
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    try:  # the classifier's keys: the extra keys a full-model file may hold (head, fc, ...)
        with torch.device("meta"):
            full_keys = set(timm.create_model(name, pretrained=False).state_dict())
    except Exception:
        full_keys = set()
    # features_only may flatten top-level Sequentials: the classifier's "stem.conv" is "stem_conv"
    alias = {k.replace(".", "_", 1): k for k in full_keys}
    own, where = encoder.state_dict(), f"--encoder-weights {path} does not match encoder {name}"
    mapped, used = {}, set()
    for k, v in own.items():
        src = k if k in sd else alias.get(k)
        if src not in sd:
            if k.endswith("num_batches_tracked"):  # NOTE: old torchvision files lack these counters
                mapped[k] = v
                continue
            missing = sum(1 for k2 in own if k2 not in sd and alias.get(k2) not in sd)
            raise ValueError(f"{where}: missing key {k!r} ({missing} of {len(own)} missing)")
        if sd[src].shape != v.shape:
            raise ValueError(f"{where}: key {src!r} has shape {tuple(sd[src].shape)}, "
                             f"expected {tuple(v.shape)}")
        mapped[k] = sd[src]
        used.add(src)
    unexpected = [k for k in sd if k not in used and k not in full_keys]
    if unexpected:
        raise ValueError(f"{where}: unexpected key {unexpected[0]!r} "
                         f"({len(unexpected)} unexpected)")
    encoder.load_state_dict(mapped)
