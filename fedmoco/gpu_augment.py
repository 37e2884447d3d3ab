"""Both MoCo views of a whole batch at once, from cached bases, on the batch's device.

The per-sample pipelines (MONAI for medical, torchvision v2 for satellite) draw one set of
random parameters per call, so on a GPU they would run once per image. These modules draw
every parameter per sample, with the distributions of the per-sample pipelines, and apply
them with batched tensor ops. Medical: the geometry (crop, resize, flip, rotation) in one
``grid_sample`` per view and the smoothing as one grouped convolution with MONAI's erf
kernel per sample. Satellite: crop, resize, flips, quarter turns and blur are all linear
maps along rows and columns, so they run as two matrix products per view (torchvision's
antialiased resize and reflect-padded blur exactly). The rest is elementwise. Torch
functionals rather than kornia: the semantics must match the CPU pipelines exactly, which is
easier to prove with each parameter drawn here (see tests/fedmoco/test_gpu_augment.py).

Input: a collated batch of bases (``MedicalBases`` / satellite tiles). Output ``(view_q,
view_k)``, each (B, C, S, S) float32, normalised. Known differences from the medical CPU
pipeline, all sub-pixel: the crop is resampled bilinearly (MONAI resizes a shrinking crop
with area averaging; crops of a cached base shrink by at most 1/sqrt(crop_scale)), and on a
GPU one grid sample does crop and rotation together instead of two interpolations. The
satellite views equal torchvision's up to float rounding.

On a CPU the geometry and the steps that only some images take (gamma, noise, the rotation's
zero corners) run image by image, in place (``per_image``): on one core, per-image ops beat
masked gathers and scatters of the batch, and a satellite view's matrix products can skip
the pixels outside its crop; on a GPU the opposite holds (a kernel launch per image), so
there the batch goes through as one.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# -- parameter draws ------------------------------------------------------------------------


def coin(p: float, n: int, device: torch.device) -> torch.Tensor:
    """(n,) bool, each True with probability p."""
    return torch.rand(n, device=device) < p


def uniform(lo: float, hi: float, n: int, device: torch.device, *shape: int) -> torch.Tensor:
    """(n, *shape) float32 uniform in [lo, hi)."""
    return lo + (hi - lo) * torch.rand(n, *shape, device=device)


def randint(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Integers uniform in [lo, hi] (inclusive), elementwise."""
    return (lo + torch.floor(torch.rand(lo.shape, device=lo.device) * (hi - lo + 1))).clamp(max=hi)


# -- geometry -------------------------------------------------------------------------------


def resample(x: torch.Tensor, box: torch.Tensor, size: int, matrix: torch.Tensor | None = None,
             zero_outside: bool | torch.Tensor = False) -> torch.Tensor:
    """Crop ``box`` (B, 4: top, left, height, width in pixels) of each image of ``x``
    (B, C, H, W), resize it to ``size`` and move it by ``matrix`` (B, 2, 2), in one bilinear
    grid sample. ``matrix`` maps output to crop coordinates (x = column, y = row, both in
    [-1, 1] over the resized crop): flips and quarter turns are exact pixel permutations, a
    rotation is :func:`rotation_matrix`. ``zero_outside`` (True, or (B,) bool: which images)
    zeroes output pixels that come from outside the crop (a rotation's corners, as MONAI's
    zero padding does), with one mask for the whole batch: a flip-only image's is all ones,
    so which images rotate is never read back from the device. Returns (B, C, size, size).
    """
    b, c, h, w = x.shape
    dt = torch.float32
    top, left, ch, cw = box.to(dt).unbind(1)
    m = torch.eye(2, device=x.device, dtype=dt).expand(b, 2, 2) if matrix is None else matrix.to(dt)
    # source = S @ (M @ output) + t, S scaling the crop into the image: one affine grid.
    scale = torch.stack([cw / w, ch / h], dim=1).unsqueeze(2)  # (B, 2, 1)
    shift = torch.stack([(2 * left + cw) / w - 1, (2 * top + ch) / h - 1], dim=1).unsqueeze(2)
    theta = torch.cat([scale * m, shift], dim=2)  # (B, 2, 3)
    grid = _affine_grid(theta, size).to(x.dtype)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if zero_outside is False:
        return out
    u, v = _affine_planes(torch.cat([m, torch.zeros(b, 2, 1, device=x.device, dtype=dt)], dim=2), size)
    inside = (torch.maximum(u.abs_(), v.abs_()) <= 1 + 1e-6).unsqueeze(1)  # (B, 1, S, S)
    if not isinstance(zero_outside, bool):
        inside |= ~zero_outside.view(-1, 1, 1, 1)
    return out.mul_(inside)


def _affine_planes(theta: torch.Tensor, size: int,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The x and y planes (B, S, S) of :func:`_affine_grid`, each from one broadcast add
    (written into ``out``, two (B, S, S) views, when given)."""
    lin = (torch.arange(size, device=theta.device, dtype=theta.dtype) + 0.5) / size * 2 - 1
    xs, ys = lin.view(1, 1, size), lin.view(1, size, 1)
    t = theta.view(-1, 2, 3, 1, 1)
    u = torch.add(t[:, 0, 0] * xs, t[:, 0, 1] * ys + t[:, 0, 2], out=None if out is None else out[0])
    v = torch.add(t[:, 1, 0] * xs, t[:, 1, 1] * ys + t[:, 1, 2], out=None if out is None else out[1])
    return u, v


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, size, size), align_corners=False)`` by broadcasting.

    The same numbers; affine_grid's batched matmul with an inner size of 3 took 145 ms for
    32 x 224^2 points on one CPU thread. Each coordinate plane is one broadcast add written
    straight into its strided half of the grid: 2.4 ms, against 13 ms for one add whose
    innermost dimension is the pair (x, y) (too short to vectorise).
    """
    grid = theta.new_empty(theta.shape[0], size, size, 2)
    _affine_planes(theta, size, out=(grid[..., 0], grid[..., 1]))
    return grid


def flip_matrix(hflip: torch.Tensor) -> torch.Tensor:
    """(B, 2, 2) output->source map of horizontal flips (B,) bool."""
    sx = 1.0 - 2.0 * hflip.float()
    return torch.diag_embed(torch.stack([sx, torch.ones_like(sx)], dim=1))


def rotation_matrix(angle: torch.Tensor) -> torch.Tensor:
    """(B, 2, 2) output->source map of MONAI's ``Rotate(angle)`` (radians, about the centre)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)


def resize_weights(start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int) -> torch.Tensor:
    """(B, size_out, size_in) float32: row i holds the weights with which output pixel i of
    torchvision's ``resized_crop`` (bilinear, ``antialias=True``) combines the input pixels,
    when it crops the segment [start, start + length) (B,) of an axis of ``size_in`` pixels
    and resizes it to ``size_out``.

    The weights of torch's antialiased bilinear resize (``_upsample_bilinear2d_aa``, PIL's
    convolution): a triangle over the input pixel centres, centred on the output pixel's
    footprint and widened by the scale when the crop shrinks, cut at the crop's edges and
    normalised. Enlarging, this is plain bilinear interpolation with the crop's edge pixels
    repeated; an equal size gives the identity.
    """
    dt = torch.float32
    length = length.to(dt).view(-1, 1, 1)
    scale = length / size_out  # input pixels per output pixel
    wide = scale.clamp_min(1.0)  # the triangle's half-width, in input pixels
    centre = scale * (torch.arange(size_out, device=start.device, dtype=dt).view(1, -1, 1) + 0.5)
    rel = torch.arange(size_in, device=start.device, dtype=dt).view(1, 1, -1) - start.to(dt).view(-1, 1, 1)
    w = (1 - ((rel + 0.5 - centre) / wide).abs()).clamp_min_(0)
    w = w.masked_fill_((rel < 0) | (rel >= length), 0)
    return w.div_(w.sum(dim=2, keepdim=True))


def reflect_blur_matrix(kernels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size, size): the 1-D blur with each image's kernel (B, K), K odd and K // 2 < size,
    over ``size`` pixels with reflect padding (torchvision's ``gaussian_blur``), as a matrix:
    row i holds the weights of output pixel i."""
    b, k = kernels.shape
    r = k // 2
    src = torch.arange(size, device=kernels.device).view(-1, 1) + torch.arange(-r, r + 1, device=kernels.device)
    src = torch.where(src < 0, -src, torch.where(src > size - 1, 2 * (size - 1) - src, src))  # (size, K)
    out = kernels.new_zeros(b, size, size)
    return out.scatter_add_(2, src.expand(b, -1, -1), kernels.view(b, 1, k).expand(-1, size, -1))


def blur(x: torch.Tensor, kernels_y: torch.Tensor, kernels_x: torch.Tensor, pad_mode: str) -> torch.Tensor:
    """Separable blur of each image of ``x`` (B, C, H, W) with its own 1-D kernels (B, K),
    K odd, as one grouped convolution per axis. ``pad_mode``: ``constant`` (zeros) or ``reflect``."""
    b, c, h, w = x.shape
    k = kernels_x.shape[1]
    r = k // 2
    flat = x.reshape(1, b * c, h, w)
    wy = kernels_y.repeat_interleave(c, dim=0).view(b * c, 1, k, 1).to(x.dtype)
    wx = kernels_x.repeat_interleave(c, dim=0).view(b * c, 1, 1, k).to(x.dtype)
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode=pad_mode), wy, groups=b * c)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode=pad_mode), wx, groups=b * c)
    return flat.view(b, c, h, w)


def erf_kernels(sigma: torch.Tensor, tail: int) -> torch.Tensor:
    """MONAI's ``gaussian_1d(approx="erf")`` per sigma (B,), on a common support of ±``tail``:
    (B, 2*tail+1), zero beyond each sigma's own :func:`erf_tail` as MONAI truncates it."""
    t = torch.arange(-tail, tail + 1, device=sigma.device, dtype=torch.float32)
    s = (0.70710678 / sigma.abs().clamp_min(1e-6)).view(-1, 1)
    k = (0.5 * (torch.erf(s * (t + 0.5)) - torch.erf(s * (t - 0.5)))).clamp(min=0)
    own = (sigma.abs() * 4.0).clamp_min(0.5).add(0.5).floor().view(-1, 1)
    return k.masked_fill_(t.abs() > own, 0)


def erf_tail(sigma: float) -> int:
    """Half-width in pixels of MONAI's erf kernel for ``sigma`` (``gaussian_1d``, truncated at 4 sigma)."""
    return int(max(abs(sigma) * 4.0, 0.5) + 0.5)


def smooth_(img: torch.Tensor, kernel_y: Sequence[float], kernel_x: Sequence[float]) -> torch.Tensor:
    """Separable filter of one image ``img`` (C, H, W) in place, zero padding (MONAI's
    ``separable_filtering``), with centred odd-length kernels for rows and columns.

    As sums of shifted slices: for one image of a few hundred pixels a side, with kernels
    of 3-9 taps, this ran 2.7x faster on a CPU core than one grouped convolution over the
    chosen images of a batch (oneDNN's depthwise path), and each image keeps its own kernel
    length instead of the longest one's.
    """
    rows = _shifted_sum(img, kernel_y, -2)
    return _shifted_sum(rows, kernel_x, -1, out=img)


def _shifted_sum(src: torch.Tensor, kernel: Sequence[float], dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = sum_d kernel[r + d] * src[i + d] along ``dim``, zero outside ``src`` (r = len // 2)."""
    r, n = len(kernel) // 2, src.shape[dim]
    out = torch.mul(src, kernel[r], out=out)
    for d in range(1, min(r, n - 1) + 1):
        out.narrow(dim, 0, n - d).add_(src.narrow(dim, d, n - d), alpha=kernel[r + d])
        out.narrow(dim, d, n - d).add_(src.narrow(dim, 0, n - d), alpha=kernel[r - d])
    return out


def sampled_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's Gaussian kernel (sampled, normalised) per sigma: (B, size)."""
    t = torch.linspace(-(size - 1) * 0.5, (size - 1) * 0.5, size, device=sigma.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


# -- medical --------------------------------------------------------------------------------


class MedicalViews(nn.Module):
    """Two views per base of the medical pipeline (``domains.medical.transforms.pretrain_pipeline``).

    Bases: (B, C, W, W) float16 in window units and (B,) tags (1: jittered window, 2: fixed).
    Same steps and parameter distributions as the MONAI pipeline, in its order: window
    (level/width jitter) -> crop (each side >= sqrt(crop_scale) of the base, uniform integer
    size and position) -> resize -> horizontal flip -> rotation -> scale -> shift -> gamma ->
    Gaussian smoothing -> Gaussian noise -> clip to [0, 1] -> normalise.
    """

    def __init__(self, opts: Any, image_size: int, normalization: Any) -> None:
        super().__init__()
        self.opts, self.size = opts, int(image_size)
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(normalization.std, dtype=torch.float32).view(1, -1, 1, 1))
        self.tail = erf_tail(opts.smooth_sigma[1])  # the longest kernel's half-width
        # Geometry image by image (True) or as one batched grid sample (False); None: image by
        # image on a CPU, batched elsewhere (a GPU would launch a handful of kernels per image).
        self.per_image: bool | None = None
        self._planes: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        base, tags = batch
        # One float32 copy shared by both views: float16 x float32 arithmetic with per-image
        # broadcast factors takes a slow, unvectorised path on the CPU (8x the float32 ops).
        x = base.float()
        jittered = (torch.as_tensor(tags, device=x.device) == 1)
        return self.view(x, jittered), self.view(x, jittered)

    def sample_params(self, n: int, side: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Random parameters of n views of bases with ``side`` pixels (what tests compare)."""
        o = self.opts
        lo = torch.full((n, 2), math.ceil(math.sqrt(o.crop_scale) * side), device=device, dtype=torch.float32)
        size = randint(lo, torch.full_like(lo, side))
        start = randint(torch.zeros_like(size), side - size)
        rotate = coin(o.rotate_prob if o.rotate_deg > 0 else 0.0, n, device)
        angle = uniform(-math.radians(o.rotate_deg), math.radians(o.rotate_deg), n, device)
        return {
            "level_u": uniform(-1, 1, n, device), "width_u": uniform(-1, 1, n, device),
            "box": torch.cat([start[:, :1], start[:, 1:], size[:, :1], size[:, 1:]], dim=1),
            "flip": coin(o.flip_prob, n, device),
            "angle": torch.where(rotate, angle, torch.zeros_like(angle)),
            "scale": torch.where(coin(o.intensity_prob, n, device),
                                 uniform(-o.intensity_scale, o.intensity_scale, n, device), torch.zeros(n, device=device)),
            "shift": torch.where(coin(o.intensity_prob, n, device),
                                 uniform(-o.intensity_shift, o.intensity_shift, n, device), torch.zeros(n, device=device)),
            "gamma": torch.where(coin(o.gamma_prob, n, device),
                                 uniform(o.gamma[0], o.gamma[1], n, device), torch.ones(n, device=device)),
            "smooth": coin(o.smooth_prob, n, device),
            "sigma": uniform(o.smooth_sigma[0], o.smooth_sigma[1], n, device, 2),
            "noise_std": torch.where(coin(o.noise_prob, n, device),
                                     uniform(0, o.noise_std, n, device), torch.zeros(n, device=device)),
        }

    def view(self, x: torch.Tensor, jittered: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None,
             normalise: bool = True) -> torch.Tensor:
        """One random view of bases ``x`` (B, C, W, W) float32 or float16; ``params`` fixes the draws.
        Returns (B, C, S, S) float32."""
        o, n, x = self.opts, x.shape[0], x.float()
        p = params or self.sample_params(n, x.shape[-1], x.device)
        per_image = _image_by_image(x, self.per_image)
        # Window jitter in window units: centre 0.5 + lj * u, width 1 + wj * u (none for fixed windows).
        centre = 0.5 + torch.where(jittered, o.window_level_jitter * p["level_u"], 0.0)
        width = 1.0 + torch.where(jittered, o.window_width_jitter * p["width_u"], 0.0)
        gain, offset = 1 / width, (width / 2 - centre) / width  # window: clamp(x * gain + offset, 0, 1)
        scale = 1 + p["scale"]
        shift = p["shift"]
        if per_image:
            x, deferred = self._geometry_per_image(x, p, gain, offset)
            # the window's affine map of the images whose window was deferred, folded into the
            # intensity scale and shift: ((y * g + o) * scale + shift)
            shift = shift + torch.where(deferred, offset, 0.0) * scale
            scale = scale * torch.where(deferred, gain, 1.0)
        else:
            # (a multiply then an in-place add: torch.addcmul with per-sample broadcast operands is
            # twice as slow on a CPU core; x is shared by both views, so the multiply makes the copy)
            x = (x * gain.view(-1, 1, 1, 1)).add_(offset.view(-1, 1, 1, 1)).clamp_(0, 1)
            # Output = rotate(flip(resized crop)): source = flip(rotate^-1(output)).
            # (angle 0 gives the identity rotation exactly: cos 0 = 1, sin 0 = 0)
            matrix = flip_matrix(p["flip"]) @ rotation_matrix(p["angle"])
            x = resample(x, p["box"], self.size, matrix, zero_outside=p["angle"] != 0)
        x = x.mul_(scale.view(-1, 1, 1, 1)).add_(shift.view(-1, 1, 1, 1))  # x: resample's own
        adjust_contrast_(x, p["gamma"], per_image)
        if per_image:
            chosen = _chosen(p["smooth"])
            if chosen:
                sigma = p["sigma"][chosen]
                ky, kx = erf_kernels(sigma[:, 0], self.tail), erf_kernels(sigma[:, 1], self.tail)
                # each kernel cut to its own length: beyond it erf_kernels holds zeros
                rows, cols = ky.tolist(), kx.tolist()
                for j, (i, (sy, sx)) in enumerate(zip(chosen, sigma.tolist())):
                    ty, tx = erf_tail(sy), erf_tail(sx)
                    smooth_(x[i], rows[j][self.tail - ty:self.tail + ty + 1],
                            cols[j][self.tail - tx:self.tail + tx + 1])
        elif o.smooth_prob > 0:
            # every image blurred, the chosen ones kept: no read of which were chosen
            sigma = p["sigma"]
            blurred = blur(x, erf_kernels(sigma[:, 0], self.tail), erf_kernels(sigma[:, 1], self.tail), "constant")
            x = torch.where(p["smooth"].view(-1, 1, 1, 1), blurred, x)
        add_noise_(x, p["noise_std"], per_image)
        x = x.clamp_(0, 1)
        return x.sub_(self.mean).div_(self.std) if normalise else x

    def _geometry_per_image(self, x: torch.Tensor, p: Mapping[str, torch.Tensor], gain: torch.Tensor,
                            offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Window, crop, resize, flip and rotate bases ``x`` (B, C, W, W) float32 image by image,
        in MONAI's order and with MONAI's interpolations: the crop's pixels only are windowed,
        resized bilinearly (``F.interpolate``; the views never enlarge a cached base), flipped,
        then each rotated image is rotated about its centre with zero padding (a grid sample
        of its own). Returns (B, C, S, S) float32 and which images (B,) bool still need the
        window's affine map ``y * gain + offset``.

        The window is clamp(x * g + o, 0, 1) = g * clamp(x, -o/g, (1 - o)/g) + o (g > 0), and
        the affine part commutes with the resize and flip (bilinear weights sum to one): so an
        image that is not rotated is only clamped here, and its g and o join the intensity
        scale and shift that follow (two passes over the crop fewer). A rotated image is
        windowed in full first, since the rotation's zero corners must stay zero.

        On one CPU core the separable resize of 32 crops took 9.6 ms against 24 ms for the
        batched grid sample of :func:`resample` (a grid sample off the pixel lattice costs
        5-15 ns a pixel), and only the crop's pixels are windowed. The two paths agree up to
        float rounding without rotation; with it they differ as one interpolation differs
        from two (MONAI's is two).
        """
        n, c, _, _ = x.shape
        out = x.new_empty(n, c, self.size, self.size)
        flips, gains, offsets = p["flip"].tolist(), gain.tolist(), offset.tolist()
        angles = p["angle"].tolist()
        planes = self._rotation_planes(x.device)
        for i, (top, left, h, w) in enumerate(p["box"].long().tolist()):
            crop = x[i, :, top:top + h, left:left + w]
            # A flip commutes with the resize (align_corners=False samples mirror-symmetric
            # points), so a flipped image is flipped before it: the flip's copy is then the one
            # the window needs anyway, not an extra pass over the resized image.
            if angles[i] != 0:
                y = crop.flip(-1).mul_(gains[i]) if flips[i] else torch.mul(crop, gains[i])
                y = y.add_(offsets[i]).clamp_(0, 1)
            else:
                lo, hi = -offsets[i] / gains[i], (1 - offsets[i]) / gains[i]
                y = crop.flip(-1).clamp_(lo, hi) if flips[i] else torch.clamp(crop, lo, hi)
            y = F.interpolate(y[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
            # rotated one by one, while the resized crop is still in cache (a batched grid sample
            # of the stacked crops was slower on a CPU core, with two more copies)
            if angles[i] != 0:
                # the rotation's grid, cos(a) * (x, y) + sin(a) * (y, -x), from planes made once:
                # building it anew (rotation_matrix, affine grid) took 300 us an image, more than the
                # grid sample
                grid = torch.mul(planes[0], math.cos(angles[i])).add_(planes[1], alpha=math.sin(angles[i]))
                out[i] = F.grid_sample(y[None], grid[None], mode="bilinear", padding_mode="zeros",
                                       align_corners=False)[0]
            else:
                out[i] = y
        return out, p["angle"] == 0

    def _rotation_planes(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Planes (S, S, 2) (x, y) and (y, -x) of the output pixel centres in grid coordinates:
        MONAI's rotation by angle a samples at cos(a) * the first + sin(a) * the second
        (:func:`rotation_matrix`). Made once per device."""
        if device not in self._planes:
            theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]], device=device)
            self._planes[device] = tuple(_affine_grid(theta, self.size))
        return self._planes[device]


# Steps applied to some images of a batch only. On a CPU they run in place, image by image:
# indexing the batch with a mask copies the chosen images out and back (a fifth of a view's
# time on one core). On a GPU they run on the whole batch and torch.where keeps the chosen
# images' results: a kernel launch per image, or a boolean index (whose size the host must
# read), would stall the host until the device has run everything queued before it.


def _image_by_image(x: torch.Tensor, per_image: bool | None) -> bool:
    """``per_image``, or when None whether ``x`` is on the CPU."""
    return x.device.type == "cpu" if per_image is None else per_image


def _chosen(on: torch.Tensor) -> list[int]:
    """Indices of the True entries of ``on`` (B,) bool."""
    return on.nonzero().flatten().tolist()


def adjust_contrast_(x: torch.Tensor, gamma: torch.Tensor, per_image: bool | None = None) -> torch.Tensor:
    """MONAI's ``AdjustContrast`` in place on each image i of ``x`` (B, C, H, W) whose
    ``gamma[i]`` != 1: gamma over the image's own min..max, ``((y - lo) / (range + 1e-7)) **
    gamma * range + lo``.

    The power as ``exp(gamma * log(t))``: torch's pow with a tensor or non-special exponent
    is a scalar loop on the CPU, log and exp are vectorised (2-4x faster on one core). log(0)
    takes a slow path (5x), and a windowed image is often 0 over a third of its pixels (air);
    so does exp of an argument whose result is below the smallest normal float (10x). One
    floor on t avoids both: t >= max(tiny, e^(-80 / gamma)), so gamma * log(t) >= -80. A
    zero pixel then comes out as at most e^-69 (about 1e-30) of the image's range above its
    minimum instead of exactly at it, far below float32 resolution near any other value;
    putting exact zeros back took two more passes over the image (a compare and a masked
    fill, a sixth of the gamma's time).
    """
    on = gamma != 1
    if _image_by_image(x, per_image):
        for i in _chosen(on):
            y = x[i]
            lo, hi = torch.aminmax(y)
            rng = hi - lo
            g = float(gamma[i])
            floor = max(_TINY, math.exp(-80.0 / g))
            y.sub_(lo).mul_(1.0 / (float(rng) + 1e-7)).clamp_min_(floor).log_().mul_(g).exp_().mul_(rng).add_(lo)
    else:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        rng = x.amax(dim=(1, 2, 3), keepdim=True) - lo
        y = ((x - lo) / (rng + 1e-7)).clamp_min_(0) ** gamma.view(-1, 1, 1, 1) * rng + lo
        x.copy_(torch.where(on.view(-1, 1, 1, 1), y, x))
    return x


_TINY = float(torch.finfo(torch.float32).tiny)


def add_noise_(x: torch.Tensor, std: torch.Tensor, per_image: bool | None = None) -> torch.Tensor:
    """Add N(0, std[i]^2) noise per pixel to each image i of ``x`` (B, ...) with std[i] > 0,
    in place. On a CPU one draw for the noisy images, added image by image with ``alpha`` (no
    scaled copy, no gather/scatter); otherwise one draw for the whole batch, scaled by each
    image's std (0: unchanged), so that which images are noisy is never read back."""
    on = std > 0
    if _image_by_image(x, per_image):
        noisy = _chosen(on)
        if noisy:
            noise = torch.randn(len(noisy), *x.shape[1:], dtype=x.dtype, device=x.device)
            for j, i in enumerate(noisy):
                x[i].add_(noise[j], alpha=float(std[i]))
    else:
        x.add_(torch.randn_like(x) * std.view(-1, *[1] * (x.dim() - 1)))
    return x


# -- satellite ------------------------------------------------------------------------------


class SatelliteViews(nn.Module):
    """Two views per tile of the satellite pipeline (``domains.satellite.augment.pretrain_transform``).

    Tiles: (B, C, t, t) reflectance, or a pair (query tiles, key tiles) with temporal
    positives. Steps and distributions as in the torchvision pipeline: RandomResizedCrop
    (scale, ratio 3/4..4/3, 10 tries then the whole tile) -> horizontal and vertical flips ->
    rotation by k * 90 degrees -> per-band brightness/contrast -> haze -> Gaussian blur
    (reflect padding) -> Gaussian noise -> indices -> normalise -> band dropout.
    """

    def __init__(self, opts: Any, image_size: int, normalization: Any, wavelengths: Sequence[float] | None,
                 roles: Mapping[str, int]) -> None:
        super().__init__()
        from domains.satellite.augment import HAZE_REFERENCE_NM, AppendIndices, blur_kernel_size

        self.opts, self.size = opts, int(image_size)
        self.indices = AppendIndices(opts.indices, roles)
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(normalization.std, dtype=torch.float32).view(1, -1, 1, 1))
        self.haze = wavelengths is not None and opts.haze_p > 0 and opts.haze_max > 0
        haze = [(HAZE_REFERENCE_NM / w) ** opts.haze_exponent for w in wavelengths] if self.haze else []
        self.register_buffer("haze_weights", torch.tensor(haze, dtype=torch.float32).view(1, -1, 1, 1))
        self.kernel = min(blur_kernel_size(opts.blur_sigma[1]), image_size - 1 + image_size % 2)
        # Geometry and noise image by image (True) or batched (False); None: image by image on
        # a CPU, batched elsewhere (see MedicalViews.per_image).
        self.per_image: bool | None = None

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, (tuple, list)):
            q, k = batch[0].float(), batch[1].float()
        else:
            q = k = batch.float()  # one float32 copy for both views (each view writes a fresh tensor)
        return self.view(q), self.view(k)

    def sample_params(self, n: int, h: int, w: int, device: torch.device) -> dict[str, torch.Tensor]:
        o = self.opts
        c = self.mean.shape[1] - len(self.indices.pairs)
        area = float(h * w)
        # torchvision's RandomResizedCrop.make_params, 10 tries per sample at once.
        tries = 10
        target = area * uniform(o.crop_scale[0], o.crop_scale[1], n, device, tries)
        log_r = uniform(math.log(3 / 4), math.log(4 / 3), n, device, tries)
        ratio = torch.exp(log_r)
        cw = torch.round(torch.sqrt(target * ratio))
        ch = torch.round(torch.sqrt(target / ratio))
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = torch.where(ok.any(dim=1), ok.float().argmax(dim=1), torch.full((n,), -1, device=device))
        pick = first.clamp_min(0).view(-1, 1)
        cw = torch.where(first >= 0, cw.gather(1, pick).squeeze(1), torch.full((n,), float(w), device=device))
        ch = torch.where(first >= 0, ch.gather(1, pick).squeeze(1), torch.full((n,), float(h), device=device))
        top = torch.floor(torch.rand(n, device=device) * (h - ch + 1))
        left = torch.floor(torch.rand(n, device=device) * (w - cw + 1))
        jitter = coin(o.jitter_p, n, device).view(-1, 1)
        gain = torch.where(jitter, 1 + uniform(-1, 1, n, device, c) * o.brightness, torch.ones(n, c, device=device))
        stretch = torch.where(jitter, 1 + uniform(-1, 1, n, device, c) * o.contrast, torch.ones(n, c, device=device))
        drop = torch.rand(n, self.mean.shape[1], device=device) < o.band_dropout
        all_dropped = drop.all(dim=1)
        keep = torch.randint(0, drop.shape[1], (n,), device=device)
        # where all bands dropped, keep band `keep` (no boolean index: nothing read back)
        drop &= ~(all_dropped.view(-1, 1) & (torch.arange(drop.shape[1], device=device) == keep.view(-1, 1)))
        return {
            "box": torch.stack([top, left, ch, cw], dim=1),
            "hflip": coin(0.5 if o.flip else 0.0, n, device), "vflip": coin(0.5 if o.flip else 0.0, n, device),
            "rot90": torch.randint(0, 4 if o.flip else 1, (n,), device=device),
            "gain": gain, "stretch": stretch,
            "haze": torch.where(coin(o.haze_p, n, device), uniform(0, o.haze_max, n, device),
                                torch.zeros(n, device=device)),
            "blur": coin(o.blur_p, n, device),
            "sigma": uniform(o.blur_sigma[0], o.blur_sigma[1], n, device),
            "noise_std": torch.where(coin(o.noise_p, n, device) if o.noise_std > 0 else torch.zeros(n, dtype=torch.bool, device=device),
                                     uniform(0, o.noise_std, n, device), torch.zeros(n, device=device)),
            "drop": drop if o.band_dropout > 0 else torch.zeros_like(drop),
        }

    def view(self, x: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One random view of tiles ``x`` (B, bands, h, w) reflectance (float16 or float32);
        ``params`` fixes the draws. Returns (B, C, S, S) float32, normalised."""
        n, x = x.shape[0], x.float()
        p = params or self.sample_params(n, x.shape[-2], x.shape[-1], x.device)
        x, mean = self.geometry(x, p)
        # Contrast about the band mean, gain, then haze: ((x - m) * s + m) * g + h is one affine
        # map per band, x * (s * g) + (m * (1 - s) * g + h), applied in place (the four
        # full-size passes it replaces were a third of a view's time on one CPU core). The blur
        # that follows in the recipe is already in ``x``: a normalised kernel with reflect
        # padding maps a per-band affine map of an image to the same map of its blur, so
        # blurring first gives the same image, provided ``m`` is the mean before the blur.
        stretch, gain = p["stretch"][..., None, None], p["gain"][..., None, None]
        bias = mean[..., None, None] * ((1 - stretch) * gain)
        if self.haze:
            bias = bias + p["haze"].view(-1, 1, 1, 1) * self.haze_weights
        x = x.mul_(stretch * gain).add_(bias)  # in place: x is geometry's fresh output
        add_noise_(x, p["noise_std"], self.per_image)
        x = self.indices(x)
        # Normalise and drop bands in one pass: ((x - mean) / std) * keep.
        scale = (1 / self.std).expand(n, -1, 1, 1)
        if self.opts.band_dropout > 0:
            scale = scale * (~p["drop"]).to(x.dtype)[..., None, None]
        return x.mul_(scale).sub_(self.mean * scale)  # in place: x is geometry's, or indices' fresh copy

    def geometry(self, x: torch.Tensor, p: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop, resize, flips, quarter turn and blur of tiles ``x`` (B, C, h, w) float32 as
        the torchvision pipeline does them: (B, C, S, S), and the band means (B, C) of the
        view before its blur.

        Each of these steps is a linear map along the rows and one along the columns, so a
        view is ``A @ tile @ B.T`` per band, with A (S, h) = blur @ vertical flip @ resize of
        the crop's rows and B (S, w) likewise for the columns (:func:`resize_weights`,
        :func:`reflect_blur_matrix`); an odd quarter turn adds a transpose. On one CPU core
        the two products took 20 ms for 64 tiles of 13 x 64 x 64, against 47 ms for a
        bilinear grid sample and a grouped convolution with reflect padding; and they are
        torchvision's antialiased resize exactly, where a grid sample is not when a crop
        shrinks or at a crop's edges.
        """
        b, c, h, w = x.shape
        s = self.size
        top, left, ch, cw = p["box"].unbind(1)
        rows, cols = resize_weights(top, ch, h, s), resize_weights(left, cw, w, s)
        # The mean of A @ tile @ B.T is (1/S^2) (1' A) tile (B' 1): one weight per tile pixel.
        # (As a row vector times the transposed tiles: a matrix-vector bmm the other way round
        # took 10x longer on a CPU core.)
        weights = (rows.sum(dim=1).unsqueeze(2) * cols.sum(dim=1).unsqueeze(1)).view(b, 1, h * w) / (s * s)
        mean = torch.bmm(weights, x.reshape(b, c, h * w).transpose(1, 2)).view(b, c)
        # rot90(image, k) is a transpose for odd k after flips: k = 1 flips the columns,
        # k = 2 both axes, k = 3 the rows (see the tests against torch.rot90).
        k = p["rot90"]
        rows = torch.where((p["vflip"] ^ ((k == 2) | (k == 3))).view(-1, 1, 1), rows.flip(1), rows)
        cols = torch.where((p["hflip"] ^ ((k == 1) | (k == 2))).view(-1, 1, 1), cols.flip(1), cols)
        turned = (k % 2 == 1)
        per_image = _image_by_image(x, self.per_image)
        if self.opts.blur_p > 0:
            on = p["blur"]
            if per_image:
                chosen = _chosen(on)
                if chosen:
                    kernel = reflect_blur_matrix(sampled_kernels(p["sigma"][chosen], self.kernel), s)
                    rows[chosen], cols[chosen] = kernel @ rows[chosen], kernel @ cols[chosen]  # torch.where's copies
            else:  # every image's blur matrix, the chosen ones kept: nothing read back
                kernel = reflect_blur_matrix(sampled_kernels(p["sigma"], self.kernel), s)
                rows = torch.where(on.view(-1, 1, 1), kernel @ rows, rows)
                cols = torch.where(on.view(-1, 1, 1), kernel @ cols, cols)
        if per_image:
            # Image by image, on the crop's pixels only: first the crop's columns of all bands
            # and rows as one matrix product (C * hh, ww) @ (ww, S), then its rows, band by band,
            # with the turn's transpose folded into that product. (The crop's slice is copied
            # by the reshape either way; cutting its rows too spares the first product the
            # rows outside the crop, a quarter of its work at the default crop scales.)
            out = x.new_empty(b, c, s, s)
            for i, ((t, l, hh, ww), turn) in enumerate(zip(p["box"].long().tolist(), turned.tolist())):
                z = (x[i, :, t:t + hh, l:l + ww].reshape(c * hh, ww) @ cols[i, :, l:l + ww].T).view(c, hh, s)
                a = rows[i, :, t:t + hh]
                if turn:
                    torch.matmul(z.transpose(1, 2), a.T, out=out[i])
                else:
                    torch.matmul(a, z, out=out[i])
            return out, mean
        out = torch.matmul(torch.matmul(rows.unsqueeze(1), x), cols.transpose(1, 2).unsqueeze(1))
        return torch.where(turned.view(-1, 1, 1, 1), out.transpose(-1, -2), out), mean
