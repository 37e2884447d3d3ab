"""MoCo training-step throughput: fedmoco vs lightly's MoCo, side by side in one run.

Both use the same torchvision ResNet-18 backbone, a 2-layer MLP head to 128-d, a queue of
4096 negatives, SGD and the same batch. fedmoco runs with each of its normalisations: split
BN + key shuffling (its default, which keeps the positive pair out of shared batch
statistics), plain BN (what lightly's single-device recipe does) and GroupNorm. Each step: momentum update, query forward, key
forward, loss, backward, SGD step, enqueue.

Each side's optimizer is the one its users get: fedmoco's Trainer builds a fused SGD on CUDA
(``build_optimizer(fused=True)``: no per-step host sync under AMP), lightly's examples
``torch.optim.SGD`` with its defaults; on CUDA lightly is also timed with the fused SGD, and its
figure is the better of its two rows. Neither side reads the loss on the host in the timed loop.

    python benchmarks/moco_step.py --image-size 224 --batch-size 32 --steps 10
    python benchmarks/moco_step.py --device cuda --image-size 224 --batch-size 256 --steps 30

Writes a markdown table to stdout (and to --out if given).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check_device, cpu_model, emit_json, machine_line  # noqa: E402


def fedmoco_step_fn(args, device, norm="split-batch", channels_last=True, compiled=False, compiled_norm=False):
    from fedmoco.config import MoCoConfig, TrainConfig
    from fedmoco.encoders import SplitBatchNorm
    from fedmoco.moco import MoCo
    from fedmoco.train import build_optimizer

    model = MoCo(MoCoConfig(arch="resnet18", in_channels=3, queue_size=4096, norm=norm,
                            small_input=args.image_size <= 64)).to(device)
    if device.type == "cuda" and channels_last:
        model = model.to(memory_format=torch.channels_last)
    for module in model.modules():  # split BN on channels_last input: one compiled call per layer
        if isinstance(module, SplitBatchNorm):
            module.compiled = compiled_norm
    if compiled:
        # torch.compile of both encoders (in place: parameter names, so checkpoints, unchanged),
        # one of issue 11's options for a cheaper leak guard: Inductor fuses split BN's
        # statistics and normalisation and picks the layouts itself
        model.encoder_q.compile()
        model.encoder_k.compile()
    # fused on CUDA, as fedmoco's Trainer builds it (no host sync in the AMP step)
    opt = build_optimizer(model, TrainConfig(batch_size=args.batch_size), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    def step(x1, x2):
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            loss = model(x1, x2).loss
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def lightly_step_fn(args, device, fused: bool = False):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    backbone = torchvision.models.resnet18(weights=None)
    if args.image_size <= 64:
        backbone.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        backbone.maxpool = torch.nn.Identity()
    backbone.fc = torch.nn.Identity()
    q = torch.nn.Sequential(backbone, MoCoProjectionHead(512, 2048, 128)).to(device)
    k = copy.deepcopy(q)
    deactivate_requires_grad(k)
    if device.type == "cuda":
        q, k = q.to(memory_format=torch.channels_last), k.to(memory_format=torch.channels_last)
    crit = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128)).to(device)
    opt = torch.optim.SGD(q.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4, fused=fused or None)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    def step(x1, x2):
        update_momentum(q, k, m=0.99)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            zq = q(x1)
            with torch.no_grad():
                zk = k(x2)
            loss = crit(zq, zk)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def measure(step, args, device, channels_last: bool = True) -> tuple[float, float]:
    x1 = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x2 = torch.randn_like(x1)
    if device.type == "cuda" and channels_last:
        x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step(x1, x2)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(x1, x2)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return args.steps * args.batch_size / dt, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up")
    p.add_argument("--compile", action="store_true",
                   help="also time split BN and plain BN with torch.compile'd encoders (compiling takes minutes)")
    p.add_argument("--only", metavar="TEXT", help="time only the rows whose name contains TEXT (e.g. torch.compile)")
    args = p.parse_args()
    check_device(args.device)
    if args.quick:
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    rows, rates = [], {}
    variants = [
        ("fedmoco, split BN + key shuffle, channels_last", lambda: fedmoco_step_fn(args, device, "split-batch")),
        ("fedmoco, split BN + key shuffle, NCHW", lambda: fedmoco_step_fn(args, device, "split-batch", False)),
        ("fedmoco, plain BN", lambda: fedmoco_step_fn(args, device, "batch")),
        ("fedmoco, GroupNorm, channels_last", lambda: fedmoco_step_fn(args, device, "group")),
        ("fedmoco, GroupNorm, NCHW", lambda: fedmoco_step_fn(args, device, "group", False)),
        ("lightly MoCo (plain BN)", lambda: lightly_step_fn(args, device)),
        # fedmoco's fused SGD given to lightly too: under AMP the unfused one reads the scaler's inf
        # check on the host every step, so part of a gap could be the optimizer, not the model
        # (an audit's question). lightly_images_per_s is the better of the two lightly rows.
        ("lightly MoCo (plain BN), fused SGD", lambda: lightly_step_fn(args, device, fused=True)),
        # Last, as its warm-up compiles: every sub-batch's statistics and normalisation in one
        # torch.compile'd function per layer (fedmoco.encoders.split_batch_norm_nhwc), the
        # convolutions left eager. Not the default yet, so not in split_bn_images_per_s.
        ("fedmoco, split BN + key shuffle, channels_last, compiled norm",
         lambda: fedmoco_step_fn(args, device, "split-batch", compiled_norm=True)),
    ]
    if device.type != "cuda":  # memory layouts and fused optimizers differ on CUDA only
        variants = [(n.replace(", NCHW", ""), b) for n, b in variants
                    if "channels_last" not in n and "fused" not in n]
    if args.compile:
        variants += [
            ("fedmoco, split BN + key shuffle, NCHW, torch.compile",
             lambda: fedmoco_step_fn(args, device, "split-batch", False, compiled=True)),
            # channels_last split BN is one batch_norm per sub-batch and a cat (SplitBatchNorm._chunked):
            # eager that is the slowest row, but Inductor can fuse the eight and write in place of the cat
            ("fedmoco, split BN + key shuffle, channels_last, torch.compile",
             lambda: fedmoco_step_fn(args, device, "split-batch", True, compiled=True)),
            ("fedmoco, plain BN, torch.compile", lambda: fedmoco_step_fn(args, device, "batch", compiled=True)),
        ]
    if args.only:
        variants = [(n, b) for n, b in variants if args.only in n]
    for name, build in variants:
        try:
            ips, peak = measure(build(), args, device, channels_last="NCHW" not in name)
        except Exception as e:  # one row that fails (a compiler error, say) must not lose the others
            rows.append(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} | |")
            print(rows[-1], flush=True)
            continue
        rows.append(f"| {name} | {ips:.1f} | {peak:.2f} |")
        print(rows[-1], flush=True)  # as it comes: a run cut short by its time limit keeps its rows
        rates[name] = ips
        if args.device != "cpu":
            headline(args, rates)
    text = "\n".join([
        f"Command: `python benchmarks/moco_step.py --device {args.device} --image-size {args.image_size} "
        f"--batch-size {args.batch_size} --steps {args.steps}`",
        f"Machine: {machine}; torch {torch.__version__}",
        machine_line(args.device),
        "",
        "| implementation | images/s (training step) | peak GPU memory (GiB) |",
        "|---|---|---|",
        *rows,
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as fh:
            fh.write(text + "\n\n")
    headline(args, rates)


def headline(args, rates: dict[str, float]) -> None:
    """The JSON line of the rows timed so far: printed after every row too, so a run cut short
    by its time limit (the compiled row compiles in its warm-up) keeps its 11.3 figures."""
    best = lambda key: max((v for n, v in rates.items() if key in n), default=float("nan"))  # noqa: E731
    split = max((v for n, v in rates.items() if "split BN" in n and "compiled norm" not in n), default=float("nan"))
    plain, lightly, compiled_norm = best("fedmoco, plain BN"), best("lightly"), best("compiled norm")
    emit_json({"bench": "moco_step", "device": args.device, "image_size": args.image_size,
               "batch_size": args.batch_size, "split_bn_images_per_s": split, "plain_bn_images_per_s": plain,
               "group_norm_images_per_s": best("GroupNorm"), "lightly_images_per_s": lightly,
               "split_bn_compiled_norm_images_per_s": compiled_norm,
               "leak_guard_cost_compiled_norm": plain / compiled_norm - 1,
               # the leak guard's cost: extra step time of split BN over plain BN (issue 11 target <= 0.10)
               "leak_guard_cost": plain / split - 1, "plain_bn_over_lightly": plain / lightly})


if __name__ == "__main__":
    main()
