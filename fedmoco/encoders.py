"""Backbones for any input channel count, with normalisation that keeps MoCo honest.

MoCo's key and query of one image must not share batch statistics, or the network can
"cheat" by reading the positive from them (MoCo v1, Sec. 3.3). Shuffle BN needs several
GPUs; on one device we offer split BN (moco's CIFAR demo: each of ``splits`` sub-batches
is normalised alone, and :class:`fedmoco.moco.MoCo` shuffles keys across sub-batches) or
GroupNorm, which has no batch statistics at all and is what Opacus DP-SGD requires.
"""

from __future__ import annotations

import math
import warnings
from functools import cache, partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedmoco.errors import ConfigError


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from ``splits`` disjoint sub-batches.

    Input (N, C, H, W). The batch is viewed as (N/s, C*s, H, W) so one ``batch_norm`` call
    normalises each sub-batch with its own mean and variance, as in moco's CIFAR demo.
    Sub-batch b holds samples b, b+s, b+2s, ... (interleaved, from the reshape) for NCHW
    input, and the b-th contiguous block of samples for channels_last input (see _chunked).
    When N is not divisible by ``splits`` the largest divisor of N below it is used
    (a short last batch must not crash a run). Running statistics are the average over
    sub-batches, so evaluation behaves like ordinary BatchNorm.
    """

    def __init__(self, num_features: int, splits: int = 8, **kw) -> None:
        super().__init__(num_features, **kw)
        self.splits = int(splits)
        # channels_last input: one torch.compile'd normalisation of all sub-batches
        # (:func:`split_batch_norm_nhwc`) instead of a cuDNN call per sub-batch and a cat.
        # Off by default until a GPU measures it (benchmarks/moco_step.py, row "compiled norm").
        self.compiled = False
        self.compile_backend = "inductor"  # tests use "eager": Dynamo's guards alone, no kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # A sub-batch needs 2 values per channel for a variance: on a 1x1 feature map (a tiny
        # encoder at 8 px, a ResNet's last stage at 32 px) a sub-batch of one sample has one,
        # and batch_norm raised mid-run. Fewer, larger sub-batches keep the guard there.
        s = largest_divisor(n, min(self.splits, max(1, n * h * w // 2)))
        if not self.training or s == 1:
            if self.training and n > 1 and self.splits > 1:
                warnings.warn(f"SplitBatchNorm: a batch of {n} on a {h}x{w} map cannot be split into sub-batches "
                              "of 2 or more values; it is normalised as one batch (the Trainer trims batches "
                              "so this happens in MoCo only for a 2-image batch on a 1x1 map)", stacklevel=2)
            return super().forward(x)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return self._fused(x, s) if self.compiled and self.affine else self._chunked(x, s)
        mean_split = self.running_mean.repeat(s)
        var_split = self.running_var.repeat(s)
        out = F.batch_norm(
            x.reshape(-1, c * s, h, w), mean_split, var_split,
            self.weight.repeat(s), self.bias.repeat(s),
            True, self.momentum, self.eps,
        ).view(n, c, h, w)
        self._store_running(mean_split.view(s, c), var_split.view(s, c))
        return out

    def _chunked(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """channels_last input: sub-batch b = samples [b*n/s, (b+1)*n/s), one cuDNN NHWC batch
        norm each. The reshape trick above needs NCHW memory, and converting layouts around
        every norm layer costs more than the extra launches (benchmarks/moco_step.py)."""
        chunks = x.chunk(s)
        means = self.running_mean.expand(s, -1).clone()
        vars_ = self.running_var.expand(s, -1).clone()
        outs = [F.batch_norm(chunk, means[b], vars_[b], self.weight, self.bias, True, self.momentum, self.eps)
                for b, chunk in enumerate(chunks)]
        self._store_running(means, vars_)
        return torch.cat(outs).contiguous(memory_format=torch.channels_last)

    def _fused(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """channels_last input, the sub-batches of :meth:`_chunked` in one compiled call."""
        # Views, not the Parameters: Dynamo keeps a Parameter's shape static, so every channel
        # count would compile again (and a ResNet's 4 widths x grad on/off passed its limit of 8).
        y, mean, var = _compiled_split_batch_norm(self.compile_backend)(x, self.weight.view(-1), self.bias.view(-1),
                                                                        s, self.eps)
        with torch.no_grad():
            count = x.numel() // (s * x.shape[1])  # values behind each sub-batch's statistics
            m = self.momentum if self.momentum is not None else 1.0 / (int(self.num_batches_tracked) + 1)
            unbiased = var * (count / max(count - 1, 1))
            dtype = self.running_mean.dtype  # the statistics come in float32 whatever the module's dtype
            self._store_running(torch.lerp(self.running_mean.expand(s, -1), mean.to(dtype), m),
                                torch.lerp(self.running_var.expand(s, -1), unbiased.to(dtype), m))
        return y

    @torch.no_grad()
    def _store_running(self, means: torch.Tensor, vars_: torch.Tensor) -> None:
        self.running_mean.copy_(means.mean(dim=0))
        self.running_var.copy_(vars_.mean(dim=0))
        self.num_batches_tracked += 1


def split_batch_norm_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, splits: int,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm of each of ``splits`` contiguous sub-batches of channels_last ``x`` (N, C, H, W).

    In NHWC memory sub-batch b is the block (N/s * H * W, C), so the batch is viewed, without a
    copy, as (s, N/s * H * W, C) and reduced over its middle axis. Returns the normalised batch
    (N, C, H, W) channels_last in x's dtype, and each sub-batch's mean and biased variance
    (s, C) float32 (statistics in float32 as cuDNN keeps them under AMP). Meant for
    torch.compile, which fuses the reduction and the normalisation forward and backward;
    eagerly it makes several passes where cuDNN makes one (benchmarks/results/moco_step_h200.md).
    """
    n, c, h, w = x.shape
    xs = x.permute(0, 2, 3, 1).reshape(splits, (n // splits) * h * w, c).float()
    var, mean = torch.var_mean(xs, dim=1, correction=0, keepdim=True)  # (s, 1, C) each
    y = (xs - mean) * (torch.rsqrt(var + eps) * weight) + bias
    return y.to(x.dtype).reshape(n, h, w, c).permute(0, 3, 1, 2), mean.squeeze(1), var.squeeze(1)


@cache
def _compiled_split_batch_norm(backend: str = "inductor") -> Callable[..., tuple[torch.Tensor, ...]]:
    # Compiled on first use only: importing fedmoco must not start the compiler. Dynamic
    # shapes: one graph serves every layer's (N, C, H, W), so a ResNet compiles it twice
    # (with and without grad), not once per layer shape.
    return torch.compile(split_batch_norm_nhwc, fullgraph=True, dynamic=True, backend=backend)


def largest_divisor(n: int, at_most: int) -> int:
    """The largest d <= ``at_most`` that divides ``n`` (1 when none above 1 does)."""
    for d in range(min(n, at_most), 0, -1):
        if n % d == 0:
            return d
    return 1


def norm_layer(kind: str, splits: int = 8) -> Callable[[int], nn.Module]:
    """A factory ``channels -> module`` for ``batch``, ``split-batch`` or ``group`` norm."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "split-batch":
        return partial(SplitBatchNorm, splits=splits)
    if kind == "group":
        # 32 groups (Wu & He) where the width allows it; every width here is a multiple of 8.
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    raise ConfigError(f"norm: unknown normalisation {kind!r}")


class TinyCNN(nn.Module):
    """A 4-layer CNN (about 0.1 M parameters) for tests and the CPU demo.

    (N, C, H, W) -> (N, width * 4). Any H, W >= 8.
    """

    def __init__(self, in_channels: int, norm: Callable[[int], nn.Module], width: int = 32) -> None:
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def build_backbone(
    arch: str,
    in_channels: int,
    *,
    small_input: bool = False,
    norm: str = "split-batch",
    norm_splits: int = 8,
) -> nn.Module:
    """A randomly initialised backbone mapping (N, in_channels, H, W) -> (N, out_dim).

    ``arch``: ``tiny`` (out_dim 128), ``resnet18`` (512) or ``resnet50`` (2048), the latter
    two from torchvision with the classifier removed. ``small_input`` swaps the 7x7/2 stem
    and max-pool for a 3x3/1 conv, which keeps spatial detail on images of 64 px or less.
    No pretrained weights are ever downloaded.
    """
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    make_norm = norm_layer(norm, norm_splits)
    if arch == "tiny":
        return TinyCNN(in_channels, make_norm)
    if arch not in ("resnet18", "resnet50"):
        raise ConfigError(f"arch: unknown architecture {arch!r}; choose tiny, resnet18 or resnet50")
    # Imported here: torchvision's package import pulls in torch._dynamo (1-2 s on a busy
    # 2-core box), paid again by every round of a deployed site (a fresh process per message).
    import torchvision.models

    net = getattr(torchvision.models, arch)(weights=None, norm_layer=make_norm)
    if small_input:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net
