r"""One training step (forward, BCE, backward, AdamW) of our U-Net vs
segmentation_models_pytorch.Unet.

    python bench/bench_train.py
    python bench/bench_train.py --encoder resnet18 --size 256 --batch 4 --steps 10
    python bench/bench_train.py --encoder legacy_seresnet101.in1k --size 512 --batch 8 --attention
    python bench/bench_train.py --encoder legacy_seresnet101.in1k --peer-encoder se_resnet101 \
        --size 512 --batch 8 --no-float32 --compile --json out/train_step.json   # the GPU check

Same timm encoder, same decoder widths, same input, measured alternately in the same run.
Correctness first: parameter counts must agree and, with our weights copied into smp, the logits
must match. On CUDA each step also records its peak memory; --json writes every figure, rewritten
after each config so that a run killed during --compile still leaves the eager figures. The last
command is what the GPU check runs (bench/gpu_check.sh).
"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root is importable

import utils  # noqa: E402


def build_parser():
    """The models (encoder, decoder), the input, the configs timed, the device."""
    p = utils.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="resnet18", help="timm encoder name (default: %(default)s)")
    p.add_argument("--peer-encoder", default=None,
                   help="smp encoder name, e.g. se_resnet101 for legacy_seresnet101 "
                        "(default: tu-<encoder>)")
    p.add_argument("--size", type=int, default=256,
                   help="square patch side in pixels (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="patches per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps per model (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per model first (default: %(default)s)")
    p.add_argument("--decoder-channels", default="256,128,64,32,16",
                   help="decoder widths, deepest first (default: %(default)s)")
    p.add_argument("--attention", action="store_true",
                   help="scSE decoder blocks in both (default: %(default)s)")
    p.add_argument("--bf16", action="store_true",
                   help="also time bfloat16 autocast + channels_last; always done on CUDA "
                        "(default: %(default)s)")
    p.add_argument("--no-float32", action="store_true",
                   help="skip the float32 config (implies --bf16) (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="then time the last config again with both nets torch.compile'd "
                        "(default: %(default)s)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend; eager or aot_eager trace without generating code "
                        "(CPU dry runs) (default: %(default)s)")
    p.add_argument("--json", default=None,
                   help="write the figures to this JSON file (default: none)")
    # None: resolved after parsing (torch is not loaded for --help)
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads; 1 is steadier on a shared machine "
                        "(default: torch's own count)")
    p.add_argument("--seed", type=int, default=0,
                   help="weights and input seed (default: %(default)s)")
    return p


utils.start(__name__, build_parser)  # --help before torch, timm and smp load

import segmentation_models_pytorch as smp  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import ModelConfig, build_model  # noqa: E402


def count(params):
    """The number of values in these parameters."""
    return sum(p.numel() for p in params)


def build_pair(args):
    """Our model and smp's U-Net, same encoder/widths; smp's 3x3 head swapped for our 1x1 (issue
    3)."""
    torch.manual_seed(args.seed)
    ours = build_model(ModelConfig(encoder=args.encoder, pretrained=False,
                                   decoder_channels=args.decoder_channels,
                                   attention=args.attention))
    # "tu-<name>": smp's wrapper of the timm encoder of that name
    peer = smp.Unet(encoder_name=args.peer_encoder or "tu-" + args.encoder, encoder_weights=None,
                    classes=4, decoder_channels=args.decoder_channels,
                    decoder_attention_type="scse" if args.attention else None)
    smp_raw = count(peer.parameters())  # as smp builds it, before the head is swapped
    peer.segmentation_head[0] = nn.Conv2d(args.decoder_channels[-1], 4, 1)
    return ours, peer, smp_raw


def check_same_model(ours, peer, x):
    """Equal used-parameter counts, then identical logits once our weights are copied into smp."""
    for net in (ours, peer):  # one backward: the parameters that get no gradient are unused
        net.zero_grad(set_to_none=True)
        net(x[:1]).sum().backward()
    # NOTE: smp builds an scSE for the last block's (absent) skip and never calls it: those
    # parameters get no gradient and are not part of the function, so they are left out of the
    # comparison.
    dead = {n for n, p in peer.named_parameters() if p.grad is None}
    n_ours = count(ours.parameters())
    n_peer = count(p for n, p in peer.named_parameters() if n not in dead)
    unused = count(p for n, p in peer.named_parameters() if n in dead)
    print(f"smp parameters never used: {unused:,} ({len(dead)} tensors)")
    if n_ours != n_peer:
        raise ValueError(f"parameter counts differ: ours {n_ours:,} vs smp {n_peer:,} "
                         f"(used, 1x1 head)")
    peer_sd = {k: v for k, v in peer.state_dict().items() if k not in dead}
    with torch.no_grad():
        # NOTE: the state dicts pair up in order: same layers, other names
        for (ka, a), (kb, b) in zip(ours.state_dict().items(), peer_sd.items()):
            if a.shape != b.shape:
                raise ValueError(f"layer order differs from smp: {ka} {tuple(a.shape)} vs {kb} "
                                 f"{tuple(b.shape)}")
            b.copy_(a)
        ours.eval(), peer.eval()
        # ours normalises inside the model, smp expects normalised input
        diff = (ours(x) - peer((x - ours.mean) / ours.std)).abs().max().item()
    ours.train(), peer.train()
    if diff > 1e-3:
        raise ValueError(f"logits differ from smp with the same weights: max |diff| = {diff:.2e}")
    return n_ours, diff


def time_steps(nets, x, target, steps, warmup, amp_dtype=None):
    """Per net: median seconds a training step, first-step seconds (compile time with --compile),
    and on CUDA the peak bytes allocated during a step (both nets resident) and that peak above the
    step's start.

    Nets alternate step by step to share any drift.
    """
    device = x.device
    cuda = device.type == "cuda"
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-4) for n in nets]  # an optimizer per net

    def step(net, opt):  # one training step: forward, BCE, backward, AdamW
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            # the loss in float32, whatever the autocast dtype
            loss = F.binary_cross_entropy_with_logits(net(x).float(), target)
        loss.backward()
        opt.step()

    times, first = [[] for _ in nets], [None for _ in nets]
    peak, extra = [0 for _ in nets], [0 for _ in nets]
    for i in range(warmup + steps):
        # ABBA: no first-mover bias
        order = range(len(nets)) if i % 2 == 0 else reversed(range(len(nets)))
        for j in order:
            if cuda:  # the step's own peak: reset before, read after
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                start_bytes = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            step(nets[j], opts[j])
            if cuda:
                torch.cuda.synchronize()
                peak[j] = max(peak[j], torch.cuda.max_memory_allocated(device))
                extra[j] = max(extra[j], torch.cuda.max_memory_allocated(device) - start_bytes)
            dt = time.perf_counter() - t0
            first[j] = dt if first[j] is None else first[j]  # with --compile: the compile time
            if i >= warmup:
                times[j].append(dt)
    return [{"step_s": statistics.median(ts), "first_step_s": f,
             "peak_bytes": pk if cuda else None, "step_extra_bytes": ex if cuda else None}
            for ts, f, pk, ex in zip(times, first, peak, extra)]


def report(label, ours, peer, batch):
    """Print one config's line; return its figures (ratio = ours / smp step time: < 1 means ours
    is faster)."""
    t_ours, t_peer = ours["step_s"], peer["step_s"]
    memory = ""
    if ours["peak_bytes"] is not None:
        memory = f" | peak {ours['peak_bytes'] / 2**30:.2f} / {peer['peak_bytes'] / 2**30:.2f} GiB"
    print(f"{label}: ours {t_ours * 1e3:8.1f} ms/step ({batch / t_ours:7.1f} patches/s) | "
          f"smp {t_peer * 1e3:8.1f} ms/step ({batch / t_peer:7.1f} patches/s) | ratio ours/smp "
          f"{t_ours / t_peer:.3f}{memory}")
    return {"label": label, "ratio": t_ours / t_peer,
            "ours": {**ours, "patches_per_s": batch / t_ours},
            "smp": {**peer, "patches_per_s": batch / t_peer}}


def write_json(path, figures):
    """Rewrite the figures so far (after every config: a later hang or kill keeps the earlier
    ones)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
        tmp.replace(path)


def parse_args():
    """The command line, checked, with --device and --threads resolved."""
    args = build_parser().parse_args()
    if args.device is None:
        args.device = utils.default_device()
    if args.threads is None:
        args.threads = torch.get_num_threads()
    try:
        args.decoder_channels = tuple(int(c) for c in args.decoder_channels.split(","))
    except ValueError:
        raise ValueError(f"--decoder-channels must be comma-separated integers, "
                         f"got {args.decoder_channels!r}")
    # checked: at least a step, a patch, and a side the encoder can downsample
    if args.steps < 1 or args.batch < 1 or args.size < 32:
        raise ValueError("--steps and --batch must be >= 1 and --size >= 32")
    if args.compile and args.warmup < 1:
        raise ValueError("--compile needs --warmup >= 1: the first step compiles")
    return args


def main():
    args = parse_args()
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but torch sees no GPU")
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"device: {name} | torch {torch.__version__}, timm {timm.__version__}, "
          f"smp {smp.__version__}")
    print(f"encoder {args.encoder} (smp: {args.peer_encoder or 'tu-' + args.encoder}), decoder "
          f"{args.decoder_channels}, attention {args.attention}, batch {args.batch} x 3 x "
          f"{args.size} x {args.size}")

    ours, peer, smp_raw = build_pair(args)
    ours, peer = ours.to(device), peer.to(device)
    # one seeded generator: the input and the target are the same in every run
    g = torch.Generator().manual_seed(args.seed)
    # (B, 3, S, S) in [0, 1]
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    # (B, 4, S, S): 5 % lesion pixels
    target = (torch.rand(args.batch, 4, args.size, args.size, generator=g)
              < 0.05).float().to(device)
    n, diff = check_same_model(ours, peer, x[:2])  # correctness first
    print(f"parameters: ours {n:,} | smp {n:,} used, 1x1 head (as built by smp: {smp_raw:,}, "
          f"3x3 head and the unused scSE) | same logits with same weights: max |diff| {diff:.1e}")
    figures = {"device": name, "torch": torch.__version__, "encoder": args.encoder,
               "peer_encoder": args.peer_encoder or "tu-" + args.encoder, "size": args.size,
               "batch": args.batch, "steps": args.steps, "parameters": n,
               "logits_max_abs_diff": diff, "configs": []}

    # (label, autocast dtype, channels_last): float32 first, then what a GPU run trains with
    configs = [] if args.no_float32 else [(f"float32 ({args.steps} steps, median)", None, False)]
    if device.type == "cuda" or args.bf16 or args.no_float32:
        configs.append(("bfloat16 autocast + channels_last", torch.bfloat16, True))
    # NOTE: compiled after the eager runs: a compile that hangs leaves their figures written
    if args.compile:
        configs.append(configs[-1])
    nets = [ours, peer]
    for i, (label, amp_dtype, channels_last) in enumerate(configs):  # both nets, each config
        xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        nets = [net.to(memory_format=torch.channels_last) if channels_last else net for net in nets]
        if args.compile and i == len(configs) - 1:
            nets = [torch.compile(net, backend=args.compile_backend) for net in nets]
            label += f" + torch.compile ({args.compile_backend})"
        t_ours, t_peer = time_steps(nets, xi, target, args.steps, args.warmup,
                                    amp_dtype=amp_dtype)
        figures["configs"].append({**report(label, t_ours, t_peer, args.batch),
                                   "dtype": str(amp_dtype or torch.float32).replace("torch.", ""),
                                   "channels_last": channels_last,
                                   "compile": "torch.compile" in label})
        write_json(args.json, figures)  # after each config: a later hang keeps these


if __name__ == "__main__":
    utils.run(main)
