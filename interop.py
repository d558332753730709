"""Interop: export a checkpoint to ONNX, convert it to and from a segmentation_models_pytorch Unet.

    python interop.py onnx runs/IDR+MES/s0/best.pt model.onnx     # probabilities; any B, H, W
    python interop.py to-smp runs/IDR+MES/s0/best.pt smp_unet/    # smp.from_pretrained("smp_unet/")
    python interop.py from-smp smp_unet/ runs/smp/best.pt         # evaluate.py takes it

ONNX: input "image" float32 (B, 3, H, W), RGB in [0, 1], any B, H and W (the encoder's mean/std
normalization is in the graph); output "probabilities" float32 (B, 4, H, W) in EX, HE, MA, CWS
order, averaged over an ensemble's members. The file says so in its metadata (metadata_props:
resolution, layout, channel order, value range, mean/std, lesions: onnx_metadata), which
retlesions.preprocess reads to prepare a photograph (numpy, no torch). Every export is run with
onnxruntime on the CPU and compared with torch on a batch of another size than the traced one.

smp: model.py's U-Net is smp's Unet with a "tu-<timm name>" encoder, but for a 1x1 head (smp's is
3x3: our weights at its centre) and the input normalization (smp takes (x - mean) / std; to-smp
prints them and writes them into config.json as "_input_mean", "_input_std": smp ignores keys
that start with "_"). Every conversion runs both models on a random image and refuses (one line)
when their outputs differ; models with what smp's Unet lacks (softmax head, pad_to,
local_contrast) do not convert. How each part maps: docs/EVALUATION.md, "Interop".
"""
import argparse
from pathlib import Path

import utils


# ---- the command line first: --help answers before torch loads -----------------------------------
def build_parser():
    p = utils.Parser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    # each subcommand's --help: its summary, then its own examples (the description)
    q = sub.add_parser("onnx", help="export probabilities to ONNX, checked with onnxruntime on CPU",
                       description="python interop.py onnx runs/IDR+MES/s0/best.pt model.onnx\n"
                                   "python interop.py onnx runs/IDR/ensemble.json ensemble.onnx"
                                   "   # members averaged",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("ckpt", help="checkpoint, soup or ensemble (.pt or average.py manifest .json)")
    q.add_argument("out", help="ONNX file to write")
    q.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    q = sub.add_parser("to-smp", help="write an equivalent smp Unet (smp's save_pretrained folder)",
                       description="python interop.py to-smp runs/IDR+MES/s0/best.pt smp_unet/\n"
                                   "then: smp.from_pretrained('smp_unet/') on images normalized as "
                                   "printed",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("ckpt", help="training checkpoint or soup (one model)")
    q.add_argument("out", help="folder to write (config.json, model.safetensors)")
    q = sub.add_parser("from-smp",
                       help="convert an smp Unet folder (save_pretrained) to our checkpoint",
                       description="python interop.py from-smp smp_unet/ runs/smp/best.pt\n"
                                   "then: python evaluate.py --ckpt runs/smp/best.pt "
                                   "--resolution 1024 --test IDR",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("smp_dir",
                   help="folder written by smp's save_pretrained (config.json, model.safetensors)")
    q.add_argument("out", help="checkpoint to write (.pt)")
    for q in sub.choices.values():
        q.add_argument("--force", action="store_true",
                       help="overwrite an existing output (default: %(default)s)")
    return p


utils.start(__name__, build_parser)  # --help before torch loads; a Ctrl-C while it loads: one line
# the heavy imports (torch, timm, the model and scoring modules: seconds) after --help was answered

import copy  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from data import LESIONS  # noqa: E402
from model import ModelConfig, build_model, load_models, save_checkpoint  # noqa: E402
from predict import (ensemble_lesions, ensemble_resolution, load_ensemble,  # noqa: E402
                     read_checkpoint)
from protocol import predict  # noqa: E402

# NOTE: the tolerances are this script's promise (issue 14): a conversion outside them is refused
ONNX_TOL = 1e-4  # max abs difference of probabilities, onnxruntime vs torch
# max abs difference of logits, smp vs ours, relative to the logits' scale (1 + max |logit|)
SMP_TOL = 1e-4
# batch and odd sizes unlike the traced input: the dynamic axes are exercised
CHECK_SHAPE = (2, 3, 67, 71)


def _need(module, pip_names, what):
    """Import an optional package, or one ImportError line naming the pip command."""
    try:  # onnx, onnxruntime and smp are optional: only their subcommand needs them
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs {module}: pip install {pip_names}") from None


def _smp():
    """segmentation_models_pytorch >= 0.5: the first whose Unet upsamples to each skip's size as
    ours does (earlier ones upsampled x2) and takes decoder_use_norm and decoder_interpolation."""
    smp = _need("segmentation_models_pytorch", "'segmentation-models-pytorch>=0.5'",
                "smp conversion")
    if tuple(int(v) for v in re.findall(r"\d+", smp.__version__)[:2]) < (0, 5):  # "0.5.0" -> (0, 5)
        raise ImportError(f"smp conversion needs segmentation_models_pytorch >= 0.5 (found "
                          f"{smp.__version__}): pip install -U 'segmentation-models-pytorch>=0.5'")
    return smp


def _cpu_copies(models):
    """Copies in eval mode on the CPU: exporting or checking leaves the caller's models where they
    are."""
    return [copy.deepcopy(m).cpu().eval() for m in models]


def _random_image(shape=CHECK_SHAPE, seed=0):
    # (B, 3, H, W) in [0, 1]; its own generator: a check never moves the caller's global RNG
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ---- ONNX ----------------------------------------------------------------------------------------
class Probabilities(nn.Module):
    """Models -> one module returning what protocol.predict returns (mean sigmoid probability, no
    TTA)."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)  # registered: their weights go into the graph

    def forward(self, x):
        return predict(list(self.models), x)  # (B, 3, H, W) in [0, 1] -> (B, 4, H, W)


def _numbers(values):
    """(0.485, 0.456, 0.406) -> "0.485,0.456,0.406": a list any language splits."""
    return ",".join(f"{v:g}" for v in values)


def onnx_metadata(models):
    """The ONNX file's metadata_props (strings): what its user needs to prepare the input and read
    the output. Numbers are comma-separated; retlesions.read_metadata parses them back."""
    norms = [input_normalization(m) for m in models]  # per member: ((mean), (std))
    try:
        resolution = str(ensemble_resolution(models))
    except ValueError:  # models made without a recorded resolution (not from a checkpoint)
        resolution = ""
    return {
        "resolution": resolution,  # the square the models were trained at
        "preprocessing": "crop to the field of view, resize keeping the aspect ratio (longer "
                         "side = resolution), pad to a centred square with black (paper section "
                         "2.2): retlesions.preprocess",
        "input": "image", "layout": "NCHW", "channel_order": "RGB", "value_range": "0,1",
        "dtype": "float32",
        "normalization": "inside the graph: (x - mean) / std per channel",
        # an ensemble's members normalize each with their own encoder's: ";" between members
        "mean": ";".join(dict.fromkeys(_numbers(m) for m, _ in norms)),
        "std": ";".join(dict.fromkeys(_numbers(s) for _, s in norms)),
        "output": "probabilities", "activation": "sigmoid, mean over the models",
        "lesions": ",".join(LESIONS), "trained_lesions": ",".join(ensemble_lesions(models)),
        "models": str(len(models)),
    }


def export_onnx(models, path, opset=17):
    """Write the models' probabilities (Probabilities) as ONNX with dynamic batch, height and
    width, and their onnx_metadata."""
    onnx = _need("onnx", "onnx onnxruntime", "ONNX export")
    net = Probabilities(_cpu_copies(models)).eval()
    axes = {0: "batch", 2: "height", 3: "width"}  # of the input and the output alike
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # NOTE: the TorchScript exporter (dynamo=False) is deprecated since torch 2.9 but exports in
        # about 1 s without onnxscript; the torch.export route took 8-12 s for the same graph.
        # onnxruntime checks either.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            # traced on one 64 px image; the dynamic axes make any batch and size valid
            torch.onnx.export(net, (_random_image((1, 3, 64, 64)),), str(path), dynamo=False,
                              opset_version=opset, input_names=["image"],
                              output_names=["probabilities"],
                              dynamic_axes={"image": axes, "probabilities": axes})
        # an op the exporter cannot write with dynamic sizes, an unknown opset
        except Exception as e:
            raise ValueError(f"torch.onnx cannot export this model ({utils.reason(e)})") from None
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, onnx_metadata(models))
    onnx.save(graph, str(path))
    return path


def check_onnx(models, path, shape=CHECK_SHAPE):
    """Run the ONNX file with onnxruntime (CPU) on a random image -> (max abs difference to torch's
    float32 probabilities, torch float32's own max abs error against a float64 run). ValueError
    unless the difference is <= ONNX_TOL or onnxruntime is about as close to float64 as torch
    float32 is."""
    onnx = _need("onnx", "onnx onnxruntime", "ONNX check")
    ort = _need("onnxruntime", "onnx onnxruntime", "ONNX check")
    onnx.checker.check_model(str(path))  # a well-formed graph before it is run
    x, models = _random_image(shape), _cpu_copies(models)
    with torch.no_grad():
        ref = Probabilities(models)(x).numpy()  # (B, 4, H, W)
        # the same models in float64: how far float32 itself is from the exact answer
        exact = Probabilities([m.double() for m in models])(x.double()).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(["probabilities"], {"image": x.numpy()})[0]
    if out.shape != ref.shape:  # a size baked into the graph: the dynamic axes did not hold
        raise ValueError(f"{path}: onnxruntime returned shape {out.shape} for input "
                         f"{tuple(x.shape)}, torch {ref.shape}")
    diff, torch_err, ort_err = (float(abs(a - b).max())
                                for a, b in ((out, ref), (ref, exact), (out, exact)))
    # NOTE: a deep untrained network (legacy_seresnet101 at random init) is ill-conditioned: torch
    # float32 itself was 4.5e-4 from float64 there (and 1.2e-3 from torch with another thread
    # count), onnxruntime 2.9e-4.
    if not (diff <= ONNX_TOL or ort_err <= 2 * torch_err):
        raise ValueError(f"{path}: onnxruntime differs from torch by {diff:.2e} (> {ONNX_TOL:g}; "
                         f"torch float32 is {torch_err:.1e} from float64, onnxruntime "
                         f"{ort_err:.1e})")
    return diff, torch_err


def write_onnx(models, path, opset=17):
    """export_onnx then check_onnx into a temporary file, renamed to path only once checked
    (utils.write_atomic) -> check_onnx's result."""
    result = []  # the check's numbers, out of write_atomic's callback

    def write(tmp):  # a failed check leaves no file at `path`, and an old one untouched
        export_onnx(models, tmp, opset)
        result.append(check_onnx(models, tmp))
    utils.write_atomic(path, write)
    return result[0]


# ---- segmentation_models_pytorch: key names and checks -------------------------------------------
# smp's own encoders whose weights are timm's under the same keys and compute the same features
# (checked numerically at each conversion): smp name -> timm name.
SMP_NATIVE = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
              "resnet101": "resnet101", "resnet152": "resnet152",
              "se_resnet50": "legacy_seresnet50", "se_resnet101": "legacy_seresnet101",
              "se_resnet152": "legacy_seresnet152"}
# ours -> smp, inside a decoder block: ConvBNReLU is smp's Conv2dReLU (conv, norm, ReLU), SCSE its
# SCSEModule
_BLOCK_RENAMES = [(r"\.conv(\d)\.conv\.", r".conv\1.0."), (r"\.conv(\d)\.bn\.", r".conv\1.1."),
                  (r"\.attention(\d)\.channel\.", r".attention\1.attention.cSE."),
                  (r"\.attention(\d)\.spatial\.", r".attention\1.attention.sSE.0.")]
HEAD = ("head.weight", "segmentation_head.0.weight")  # (ours, smp's): 1x1 vs 3x3 kernels


def _smp_key(key, encoder_prefix):
    """One of our state dict keys -> the smp Unet's."""
    if key.startswith("encoder."):  # timm's keys under smp's prefix
        return encoder_prefix + key[len("encoder."):]
    if key.startswith("head."):
        return "segmentation_head.0." + key[len("head."):]
    for pattern, repl in _BLOCK_RENAMES:  # the decoder: the block layout is the same
        key = re.sub(pattern, repl, key)
    return key


def _key_pairs(ours_sd, smp_sd, encoder_prefix, n_blocks, where):
    """{our key: smp key}, strictly: every key on both sides mapped once with equal shapes (the
    head's weight aside: the callers map 1x1 to 3x3), except smp's last-block attention1, which
    smp's forward never runs. ValueError naming the first problem."""
    pairs = {k: _smp_key(k, encoder_prefix) for k in ours_sd}
    unused = f"decoder.blocks.{n_blocks - 1}.attention1."  # the last block has no skip to attend
    bad = [f"our key {k!r} has no smp key {s!r}" for k, s in pairs.items() if s not in smp_sd]
    mapped = set(pairs.values())
    bad += [f"smp key {s!r} has no counterpart here" for s in smp_sd
            if s not in mapped and not s.startswith(unused)]
    bad += [f"{k!r} has shape {tuple(ours_sd[k].shape)}, smp's {s!r} {tuple(smp_sd[s].shape)}"
            for k, s in pairs.items()
            if s in smp_sd and k != HEAD[0] and ours_sd[k].shape != smp_sd[s].shape]
    if bad:
        raise ValueError(f"{where}: the state dicts do not correspond: {bad[0]} ({len(bad)} "
                         f"problems)")
    return pairs


def _max_diff(ours, smp_model, shape=(1, 3, 64, 64)):
    """Max abs difference of logits: ours(x) vs smp((x - mean) / std), both in eval mode, on a
    random image."""
    x = _random_image(shape)
    was = smp_model.training
    smp_model.eval()
    try:
        with torch.no_grad():
            # ours normalizes inside; smp is given the image normalized as ours does it
            a, b = ours.eval()(x), smp_model((x - ours.mean) / ours.std)  # (B, 4, H, W) each
    finally:
        smp_model.train(was)
    return float((a - b).abs().max()), float(a.abs().max())


def _check_outputs(ours, smp_model, where):
    """The conversion's proof: a one-line ValueError unless both models compute the same logits."""
    diff, scale = _max_diff(ours, smp_model)
    if not diff <= SMP_TOL * (1 + scale):  # `not <=`: a NaN difference is refused too
        raise ValueError(f"{where}: the converted model's logits differ from the source's by "
                         f"{diff:.2e} (logits up to {scale:.2e}): smp's Unet with encoder "
                         f"{smp_model.name[2:]!r} and ours do not compute the same function")
    return diff


# ---- ours -> smp ---------------------------------------------------------------------------------
def to_smp(ckpt, where=None):
    """Our checkpoint (path or loaded dict, one model) -> an equivalent smp.Unet in eval mode,
    encoder "tu-<timm name>": smp_unet((x - mean) / std) == ours(x), (mean, std):
    input_normalization of the model."""
    # `where` names the source in one-line errors
    where = where or (str(ckpt) if not isinstance(ckpt, dict) else "checkpoint")
    ckpt = read_checkpoint(ckpt) if not isinstance(ckpt, dict) else ckpt
    models = load_models(ckpt, where=where)
    if len(models) != 1:
        raise ValueError(f"{where} is an ensemble of {len(models)} models; an smp Unet is one "
                         f"model: convert a member checkpoint")
    return smp_from_model(models[0], ckpt["model_cfg"]["encoder"], where)


def smp_from_model(ours, encoder, where="model"):
    """One of our SegModels (timm encoder `encoder`) -> the equivalent smp.Unet in eval mode (see
    to_smp)."""
    smp = _smp()
    kernel = ours.head.kernel_size[0]
    # what smp's Unet has no form for: refused before any smp model is built
    problems = [(ours.softmax, "a softmax head (the authors' models): smp's Unet would return the "
                               "5 softmax logits, not our one-vs-rest lesion logits"),
                (ours.pad_to > 1, f"pad_to={ours.pad_to}: smp's Unet does not pad its input"),
                (ours.local_contrast > 0, "local_contrast: smp's Unet has no such input layer"),
                (kernel not in (1, 3), f"a {kernel}x{kernel} head: smp's is 3x3")]
    for bad, text in problems:
        if bad:
            raise ValueError(f"{where}: {text}: no smp counterpart")
    # smp's Unet assumes each encoder stage halves the size (strides 2, 4, 8, ...); ours does not
    reductions = ours.encoder.feature_info.reduction()
    if reductions != [2 ** (i + 1) for i in range(len(reductions))] or len(reductions) > 5:
        raise ValueError(f"{where}: encoder {encoder} has feature strides {reductions}; smp's Unet "
                         f"matches ours only for strides 2, 4, 8, ... (at most 5 stages): no smp "
                         f"counterpart")
    blocks = ours.decoder.blocks
    # our decoder's choices as smp's arguments; no download: every weight comes from ours
    smp_model = smp.Unet(encoder_name=f"tu-{encoder}", encoder_weights=None,
                         encoder_depth=len(blocks),
                         decoder_channels=[b.conv2.conv.out_channels for b in blocks],
                         decoder_use_norm="batchnorm",
                         decoder_attention_type="scse"
                         if not isinstance(blocks[0].attention2, nn.Identity) else None,
                         decoder_interpolation="nearest", classes=ours.head.out_channels,
                         activation=None)
    ours_sd, smp_sd = ours.state_dict(), smp_model.state_dict()
    # "tu-" encoders hold timm's model under encoder.model.
    pairs = _key_pairs(ours_sd, smp_sd, "encoder.model.", len(blocks), where)
    new = dict(smp_sd)  # keeps smp's initial values in the weights its forward never uses
    for k, s in pairs.items():
        new[s] = ours_sd[k]
    if kernel == 1:
        new[HEAD[1]] = torch.zeros_like(smp_sd[HEAD[1]])  # (classes, C, 3, 3)
        # our 1x1 kernel (classes, C, 1, 1) at the centre
        new[HEAD[1]][:, :, 1:2, 1:2] = ours_sd[HEAD[0]]
    smp_model.load_state_dict(new)  # strict: every smp key filled
    _check_outputs(ours, smp_model, where)
    return smp_model.eval()


def input_normalization(model):
    """(mean, std) per RGB channel that one of our models applies inside and an smp Unet expects
    applied."""
    # model.mean, model.std: (1, 3, 1, 1) buffers -> 3 numbers each, rounded for printing
    return tuple(tuple(round(v, 6) for v in t.flatten().tolist()) for t in (model.mean, model.std))


def save_smp(smp_model, folder, mean=None, std=None):
    """smp's own format: config.json + model.safetensors (+ a model card), read by
    smp.from_pretrained; config.json also records the input normalization (mean, std: keys
    "_input_mean", "_input_std", which smp ignores), and the files get the permissions of any new
    file (huggingface_hub writes model.safetensors 0600)."""
    folder = Path(folder)
    smp_model.save_pretrained(str(folder))
    config = folder / "config.json"
    if mean is not None:
        settings = json.loads(config.read_text())
        settings.update({"_input_mean": list(mean), "_input_std": list(std),
                         "_input": "RGB in [0, 1], then (x - mean) / std",
                         "_lesions": list(LESIONS)})
        utils.write_json(config, settings)
    umask = os.umask(0)  # NOTE: the only portable way to read it: set, then put back at once
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


# ---- smp -> ours ---------------------------------------------------------------------------------
def _encoder_name(smp_model, where):
    """(timm name, prefix of the encoder's keys in smp's state dict) of a Unet's encoder, or
    ValueError."""
    name = smp_model.name[len("u-"):]  # smp names a Unet "u-<encoder name>"
    if name.startswith("tu-"):
        return name[len("tu-"):], "encoder.model."
    if name in SMP_NATIVE:
        return SMP_NATIVE[name], "encoder."
    raise ValueError(f"{where}: smp encoder {name!r} has no timm counterpart here; convertible: "
                     f"\"tu-<timm name>\" or {', '.join(SMP_NATIVE)}")


def _check_structure(smp_model, where):
    """ValueError naming the first part of an smp Unet that our model has no form for; else whether
    its decoder has scSE attention."""
    smp = _smp()
    if type(smp_model) is not smp.Unet:  # a subclass may compute something else
        raise ValueError(f"{where}: only smp.Unet converts, got {type(smp_model).__name__}")
    blocks, head = smp_model.decoder.blocks, smp_model.segmentation_head
    # head: (conv, upsampling, activation)
    problems = [
        (smp_model.classification_head is not None,
         "aux_params (a classification head) has no counterpart"),
        (not isinstance(smp_model.decoder.center, nn.Identity),
         "a centre block (vgg encoders) has no counterpart"),
        (not isinstance(head[1], nn.Identity), "a head with upsampling has no counterpart"),
        (not isinstance(head[2].activation, nn.Identity),
         "a head activation: ours outputs logits (protocol.predict applies the sigmoid); use "
         "activation=None"),
        (any(b.interpolation_mode != "nearest" for b in blocks),
         "decoder_interpolation must be 'nearest'"),
        (any(not isinstance(b.conv1[1], nn.BatchNorm2d) for b in blocks),
         "decoder_use_norm must be 'batchnorm'"),
        (getattr(smp_model, "config", {}).get("in_channels", 3) != 3,
         "in_channels must be 3 (RGB)"),
        (head[0].out_channels != len(LESIONS),
         f"classes must be {len(LESIONS)} ({', '.join(LESIONS)})"),
    ]
    for bad, text in problems:
        if bad:
            raise ValueError(f"{where}: {text}")
    # scSE in every block or in none: our decoder has one switch for all blocks
    attention = [type(b.attention2.attention).__name__ for b in blocks]
    if set(attention) - {"Identity", "SCSEModule"}:
        raise ValueError(f"{where}: decoder_attention_type must be None or 'scse' (got "
                         f"{attention[0]})")
    return attention[0] == "SCSEModule"


def _head_kernel(smp_model):
    """1 when smp's 3x3 head is a 1x1 one in disguise (off-centre taps all 0, as to-smp writes
    them), else 3."""
    w = smp_model.segmentation_head[0].weight.detach()  # (classes, C, 3, 3)
    off = w.clone()
    off[:, :, 1, 1] = 0  # the centre tap out: what is left must be all 0
    return 1 if not off.any() else 3


def from_smp(smp_model, where="smp model"):
    """An smp.Unet -> our checkpoint dict (model, model_cfg, args, version, provenance), which
    load_models and evaluate.py take: ours(x) == smp_unet((x - mean) / std) with mean, std those of
    the timm encoder."""
    attention = _check_structure(smp_model, where)
    encoder, prefix = _encoder_name(smp_model, where)
    try:
        with torch.device("meta"):  # shapes only: no memory, no weights
            channels = timm.create_model(encoder, features_only=True,
                                         pretrained=False).feature_info.channels()
    except Exception as e:
        raise ValueError(f"{where}: timm cannot build {encoder!r} with features_only=True "
                         f"({utils.reason(e)})") from None
    # smp's out_channels start with the input's 3 channels: the features are the rest
    if list(smp_model.encoder.out_channels[1:]) != channels:
        raise ValueError(f"{where}: smp's encoder features have channels "
                         f"{list(smp_model.encoder.out_channels[1:])}, timm's features_only "
                         f"{encoder} {channels} (encoder_depth must be {len(channels)})")
    blocks = smp_model.decoder.blocks
    kernel = _head_kernel(smp_model)
    # smp's decoder read back as our config; random weights at first, smp's loaded below
    cfg = ModelConfig(encoder=encoder, pretrained=False, attention=attention, head_kernel=kernel,
                      decoder_channels=tuple(b.conv2[0].out_channels for b in blocks),
                      classes=smp_model.segmentation_head[0].out_channels)
    ours = build_model(cfg)
    ours_sd, smp_sd = ours.state_dict(), smp_model.state_dict()
    pairs = _key_pairs(ours_sd, smp_sd, prefix, len(blocks), where)
    new = {k: smp_sd[s].detach().clone() for k, s in pairs.items()}
    if kernel == 1:  # the centre tap: the others are 0
        new[HEAD[0]] = smp_sd[HEAD[1]][:, :, 1:2, 1:2].detach().clone()
    ckpt = {"model": new, "model_cfg": asdict(cfg), "args": {}, "version": 1,
            "provenance": {"converted_from":
                           f"segmentation_models_pytorch Unet ({smp_model.name[2:]})"}}
    _check_outputs(load_models(ckpt, where=where)[0], smp_model, where)
    return ckpt


def load_smp(folder):
    """A folder written by smp's save_pretrained -> smp.Unet, offline: the encoder is built without
    downloading its pretrained weights (encoder_weights=None) since the folder holds every
    weight."""
    smp = _smp()
    folder = Path(folder)
    config, weights = folder / "config.json", folder / "model.safetensors"
    for f in (config, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: from-smp takes a folder written by smp's "
                                    f"save_pretrained")
    try:
        kwargs = json.loads(config.read_text())  # smp.Unet's own arguments
        state = load_file(str(weights))
    except Exception as e:
        raise ValueError(f"{folder}: unreadable smp model ({utils.reason(e)})") from None
    kind = kwargs.pop("_model_class", "Unet")  # save_pretrained records the class it saved
    if kind != "Unet":
        raise ValueError(f"{config}: only smp.Unet converts, this folder holds an smp {kind}")
    # NOTE: else smp would download pretrained encoder weights that the folder's then replace
    kwargs["encoder_weights"] = None
    try:
        smp_model = smp.Unet(**kwargs)
        smp_model.load_state_dict(state)
    except Exception as e:  # another smp version's arguments or keys
        raise ValueError(f"{folder}: not an smp Unet this smp builds ({utils.reason(e)})") from None
    return smp_model.eval()


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.is_dir() and args.command != "to-smp":  # nor could --force replace a folder by a file
        name = "model.onnx" if args.command == "onnx" else "best.pt"
        raise ValueError(f"{out} is a folder: give the file to write, e.g. {out / name}")
    if out.exists() and not args.force:  # checked before any model is loaded
        raise ValueError(f"{out} exists: pass --force to overwrite it")
    if args.command == "onnx":
        models = load_ensemble([args.ckpt])[0]  # every member of a manifest: averaged in the graph
        diff, torch_err = write_onnx(models, out, args.opset)
        note = (f" (torch float32 itself is {torch_err:.1e} from float64 for this model: as "
                f"accurate)" if diff > ONNX_TOL else "")
        print(f"wrote {out}: {len(models)} model(s), input 'image' (B, 3, H, W) RGB in [0, 1], "
              f"output 'probabilities' (B, 4, H, W) {','.join(LESIONS)}, described in its "
              f"metadata (retlesions.preprocess reads it); onnxruntime vs torch max abs diff "
              f"{diff:.1e}{note}")
    elif args.command == "to-smp":
        ckpt = read_checkpoint(args.ckpt)
        smp_model = to_smp(ckpt, where=args.ckpt)
        # the normalization smp's user must apply: ours does it inside
        mean, std = input_normalization(load_models(ckpt, where=args.ckpt)[0])
        save_smp(smp_model, out, mean, std)
        print(f"wrote {out}: smp Unet {smp_model.name[2:]}; feed it (x - mean) / std, x RGB in "
              f"[0, 1], mean={mean}, std={std} (config.json: _input_mean, _input_std); logits in "
              f"{','.join(LESIONS)} order")
    else:
        ckpt = from_smp(load_smp(args.smp_dir), where=args.smp_dir)
        save_checkpoint(out, ckpt)
        cfg = ckpt["model_cfg"]
        print(f"wrote {out}: encoder {cfg['encoder']}, decoder {cfg['decoder_channels']}, "
              f"attention {cfg['attention']}; it takes RGB in [0, 1] and normalizes inside")


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: nothing was written; rerun the same command")
