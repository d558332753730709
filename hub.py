"""The authors' released models on the Hugging Face hub, by training combination; downloads that fail in one line.

    python evaluate.py --ckpt hub:IDR+DDR --test MES --data-root DATA   # the authors' model trained on IDR+DDR
    python evaluate.py --ckpt hub: --test IDR,MES --data-root DATA      # `hub:` alone: trained on all five
    python hub.py IDR+DDR                                               # download (cached) -> its folder
    python hub.py --help

Playout & Cheriet publish a U-Net / SE-ResNeXt50 (torchseg, softmax over BG, CTW, EX, HE, MA, 1024 px) per
training combination in one hub repository: branch `main` holds the model trained on all five datasets, and each
other combination is the branch named by the sorted dataset names joined with "_" (e.g. `DDR_IDRID`). Each branch
holds `config.json` and `model.safetensors`; model.load_checkpoint reads them into this project's U-Net.
huggingface_hub is optional: only these downloads and timm's pretrained weights use it.

timm's pretrained weights come from the Hugging Face hub (into its cache) for models that have a hub
id (test_resnet, seresnext50_32x4d), else from a URL on GitHub into torch's hub cache,
$TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints): the paper's
legacy_seresnet101.in1k. HF_HUB_OFFLINE=1 keeps both from the network; a failed download is one line
naming the source and the cache (pretrained_error).
"""
import cli  # first: a Ctrl-C during the slow imports below (torch: seconds) ends in one line

cli.early_ctrl_c(__name__ == "__main__")

import argparse
import contextlib
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from data.ids import DATASET_IDS, parse_dataset_ids

REPO = "ClementP/fundus-lesions-segmentation-unet_seresnext50_32x4d"
FILES = ("config.json", "model.safetensors")
PREFIX = "hub:"
# Our dataset IDs -> the names of the authors' toolkit (its Dataset enum; also the `Tags` of reference/)
HUB_NAMES = {"IDR": "IDRID", "DDR": "DDR", "FGA": "FGADR", "RET": "RETLES", "MES": "MESSIDOR"}


def parse_spec(spec):
    """'hub:IDR+DDR' -> ['IDR', 'DDR'] (canonical order); 'hub:' -> all five."""
    if not str(spec).startswith(PREFIX):
        raise ValueError(f"{spec!r} is not a hub spec (hub: or hub:IDR+DDR)")
    body = str(spec)[len(PREFIX):].strip()
    try:
        return parse_dataset_ids(body) if body else list(DATASET_IDS)
    except ValueError as e:
        raise ValueError(f"--ckpt {spec}: {e}") from None


def branch(ids):
    """The hub branch of a training combination: 'main' for all five, else e.g. ['IDR', 'DDR'] -> 'DDR_IDRID'."""
    ids = parse_dataset_ids(",".join(ids))
    return "main" if len(ids) == len(DATASET_IDS) else "_".join(sorted(HUB_NAMES[i] for i in ids))


# ---------------------------------------------------------------------------------------------------------
# Downloads: cached, and one line when the hub cannot be reached
# ---------------------------------------------------------------------------------------------------------
def _import_hf():
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError("the authors' models and pretrained weights download through huggingface_hub, which is "
                         "not installed: pip install huggingface_hub") from None
    return huggingface_hub


def cache_dir():
    """The folder huggingface_hub caches downloads in (HF_HUB_CACHE / HF_HOME)."""
    return _import_hf().constants.HF_HUB_CACHE


def is_offline():
    """HF_HUB_OFFLINE as huggingface_hub reads it (also without huggingface_hub)."""
    try:
        return bool(_import_hf().constants.HF_HUB_OFFLINE)
    except ValueError:
        return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


class HubRetry(Exception):
    """huggingface_hub was about to retry a request: the hub did not answer."""


class _RaiseOnRetry(logging.Handler):
    """A handler that prints nothing: its filter raises HubRetry at huggingface_hub's retry warnings."""

    def emit(self, record):
        pass

    def filter(self, record):
        msg = record.getMessage()
        if "thrown while requesting" in msg or "Retrying in" in msg:
            raise HubRetry(msg.strip("'").split("' thrown")[0])
        return False


@contextlib.contextmanager
def first_retry_raises():
    """HubRetry at huggingface_hub's first retry, instead of its 5 retries with back-off per file (about 50 s
    and ten warning lines for a timm encoder when the hub is unreachable).

    NOTE: huggingface_hub logs a warning before each retry; a handler's filter on its logger sees it first.
    Versions that log otherwise keep their usual retries (slower, still correct).
    """
    log = logging.getLogger("huggingface_hub")
    handler, level = _RaiseOnRetry(), log.level
    log.handlers.insert(0, handler)  # before huggingface_hub's own handler: the warning is never printed
    log.setLevel(min(level or logging.WARNING, logging.WARNING))
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def reachable(repo_id, timeout=5.0):
    """Whether the hub answers one request about repo_id (no retries; an HTTP error is an answer)."""
    hf = _import_hf()
    try:
        hf.HfApi().model_info(repo_id, timeout=timeout)
    except hf.errors.HfHubHTTPError:
        pass
    except Exception:
        return False
    return True


def reason(e):
    """Why a download failed, as one short phrase: the first sentence of the root cause, never cut mid-sentence."""
    if isinstance(e, HubRetry):
        return f"no answer from the hub: {e}"
    while e.__cause__ is not None:  # e.g. huggingface_hub's LocalEntryNotFoundError raised from a ConnectError
        e = e.__cause__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text}" if len(text) <= 160 else type(e).__name__


def download_error(what, e, fix):
    """The one line for a failed download of `what`: why, the cache folder, HF_HUB_OFFLINE, and `fix`."""
    try:
        offline, cache = is_offline(), cache_dir()
    except ValueError:  # no huggingface_hub: the download went elsewhere (timm's URL weights)
        return f"could not download {what} ({reason(e)}); {fix}"
    why = "HF_HUB_OFFLINE is set" if offline else reason(e)
    tail = "" if offline else "; HF_HUB_OFFLINE=1 uses the cache without asking the hub"
    return f"could not download {what} ({why}; not in the Hugging Face cache {cache}); {fix}{tail}"


def fetch(call, repo_id):
    """call() under first_retry_raises(); when the hub stops answering and does not answer a probe either,
    HubRetry propagates (the caller writes the line), else call() again with huggingface_hub's own retries."""
    try:
        with first_retry_raises():
            return call()
    except HubRetry:
        if not reachable(repo_id):
            raise
    return call()  # the hub answers: a transient failure, let huggingface_hub retry as usual


# ---- timm's pretrained weights: from the Hugging Face hub or from a URL ----
class Offline(Exception):
    """HF_HUB_OFFLINE is set and the weights are not in torch's hub cache: no URL is tried."""


def timm_source(name):
    """Where timm takes the pretrained weights of `name` from -> ("hf-hub", repo id, None) or
    ("url", URL, the file in torch's hub cache that timm reads, or downloads into)."""
    import timm  # noqa: PLC0415
    import torch  # noqa: PLC0415

    cfg = timm.models.get_pretrained_cfg(name)
    # NOTE: timm takes the hub wherever the model has a hub id (_resolve_pretrained_source in
    # timm.models._builder), and raises there when huggingface_hub is not installed
    if cfg.hf_hub_id or not cfg.url:
        return "hf-hub", cfg.hf_hub_id, None
    file = os.path.basename(urllib.parse.urlparse(cfg.url).path)
    return "url", cfg.url, Path(torch.hub.get_dir()) / "checkpoints" / file


def url_answers(url, timeout=5.0):
    """One HEAD request (the user's proxy settings apply, no retries): OSError if nobody answers."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # an answer: the download itself says what is wrong


def fetch_pretrained(name, call):
    """call() (timm.create_model(name, pretrained=True)), failing at once where the weights cannot
    come: from the hub as fetch(); from a URL, Offline under HF_HUB_OFFLINE unless cached, else one
    probe first (torch's download has no timeout: a blocked network would hang for minutes)."""
    source, where, cached = timm_source(name)
    if source == "hf-hub":
        return fetch(call, where)
    if not cached.is_file():
        if is_offline():
            raise Offline()
        url_answers(where)
    return call()


def pretrained_error(name, e, fix):
    """The one line for timm weights of `name` that could not be had: source, why, cache, `fix`."""
    source, where, cached = timm_source(name)
    what = f"pretrained weights for {name} from"
    if source == "hf-hub":
        return download_error(f"{what} the Hugging Face hub repository {where}", e, fix)
    why = "HF_HUB_OFFLINE is set" if isinstance(e, Offline) else reason(e)
    return f"could not download {what} {where} ({why}; not in torch's hub cache: {cached}); {fix}"


def download(branch_name, repo_id=REPO):
    """Folder holding FILES of repo_id at branch_name: the cache when it has them, else a download into it."""
    hf = _import_hf()
    what = f"the authors' model {repo_id}@{branch_name}"
    get = lambda local: hf.snapshot_download(repo_id, revision=branch_name, allow_patterns=list(FILES),  # noqa: E731
                                             local_files_only=local)
    try:  # NOTE: the released branches never change: a cached copy is used without asking the hub
        return Path(get(True))
    except Exception:
        pass
    try:
        folder = Path(fetch(lambda: get(False), repo_id))
    except hf.errors.RevisionNotFoundError:
        raise ValueError(f"{what}: the repository has no branch {branch_name!r}") from None
    except hf.errors.RepositoryNotFoundError:
        raise ValueError(f"{what}: the repository is not on the hub (moved or private)") from None
    except Exception as e:
        fix = f"pass --ckpt a local folder holding {' and '.join(FILES)}"
        raise ValueError(download_error(what, e, fix)) from None
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{what}: the download lacks {missing[0]} (in {folder})")
    return folder


def resolve(spec):
    """'hub:IDR+DDR' -> (local folder with config.json and model.safetensors, ['IDR', 'DDR'], 'repo@branch')."""
    ids = parse_spec(spec)
    name = branch(ids)
    return download(name), ids, f"{REPO}@{name}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("combo", help="training combination in our IDs, e.g. IDR+DDR, or ALL (branch main); "
                                 "prints the cached folder, downloading it first if needed")
    args = p.parse_args(argv)
    print(resolve(PREFIX + ("" if args.combo.upper() == "ALL" else args.combo))[0])


if __name__ == "__main__":
    cli.run(main, interrupted="interrupted: rerun the same command (what is in the cache is kept)")
