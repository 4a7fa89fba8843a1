"""Batched, vectorised RandAugment + Cutout: the "strong" view of MLKD, on the device the batch lives on.

MLKD (multi-level logit distillation, Jin et al., CVPR 2023) trains on a weak and a strong view of every
image; the strong view is the FixMatch-style ``RandAugment(2, 10)`` followed by Cutout, as in the authors'
``mdistiller/dataset/cifar100.py`` (Jin-Ying/Multi-Level-Logit-Distillation). There, per image, two of the 14
ops of :data:`OPS` are chosen uniformly *with replacement*, each applied with its own magnitude
``v = lo + (hi - lo) * u``, ``u ~ U[0, 1)`` (the ``m = 10`` is unused), and then a square of side
``v * width`` with ``v ~ U[0, 0.5)`` is filled with the colour ``(125, 123, 114)``. The reference works on
8-bit PIL images after the random crop + flip and before normalisation, and so does this module: N×C×H×W
batches (C = 1 or 3) of uint8 or float 0..255 values, float32 integral 0..255 out.

How it is vectorised: :func:`sample_randaugment` draws all random numbers on the CPU from the caller's
generator, in a fixed order (op indices N×n with ``randint``, op magnitudes N×n float64 with ``rand``,
Cutout N×3 float64 with ``rand``), so a seed gives the same images on every device.
:func:`apply_randaugment` has no loop over samples: for each of the n rounds and each of the 14 ops it
``index_select``-s the samples that chose the op in that round, applies the op to that sub-batch with a
per-sample magnitude tensor, and ``index_copy``-s the result back. Point ops are look-up tables or
elementwise arithmetic, Equalize uses per image/channel histograms (``scatter_add_``), the geometric ops are
one gather each through integer source-index maps.

Agreement with PIL (Pillow 13, checked against the real thing in ``tests/test_randaugment.py``): every op
is bit-exact, and so is a whole RandAugment + Cutout, because the PIL arithmetic is reproduced, not
approximated:

* Enhance ops (Brightness, Color, Contrast, Sharpness) are PIL's ``Image.blend(degenerate, image, f)``:
  ``trunc(d + f * (x - d))`` in float32 with ``f`` rounded to float32 (PIL truncates, it does not round).
  Color's degenerate image is PIL's integer grey, ``(19595 R + 38470 G + 7471 B + 2**15) >> 16`` (the
  299/587/114 luminance in 16-bit fixed point, rounded), not the float formula; Contrast's is the mean of
  that grey image rounded as PIL does, ``int(mean + 0.5)``. Sharpness's degenerate image is the SMOOTH
  filter (``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13``) summed in PIL's float32 order, ``+0.5``, truncated,
  border pixels kept. For 1-channel images Color is the identity and Contrast uses the image's own mean.
* Equalize and AutoContrast build PIL's look-up tables per image and channel (Equalize's entries clipped to
  255 as PIL's ``point`` does; AutoContrast in float64 like PIL's Python arithmetic). Posterize keeps
  ``max(1, int(v))`` bits, Solarize inverts pixels ``>= v``.
* Rotate, ShearX and ShearY use PIL's nearest-neighbour affine path, which works in 16.16 fixed point:
  source ``x = (FIX(c + a/2 + b/2) + y FIX(b) + x FIX(a)) >> 16`` (pixel centres, ``FIX(t) =
  floor(65536 t + 0.5)``), and likewise for y; zero fill outside. Rotate builds PIL's matrix (angle mod 360,
  cos/sin rounded to 15 decimals, about ``(w/2, h/2)``) in float64 torch arithmetic; ``torch.cos``/``sin``
  and ``torch.round(decimals=15)`` may differ from CPython's ``math``/``round`` in the last bit, which could
  move a fixed-point coefficient by one unit in a vanishingly rare case (never seen in the tests).
  TranslateX/Y use PIL's separate float "scale" path: source column ``floor(v w + 0.5 + x)`` accumulated
  sequentially, as PIL does.
* Cutout: PIL's ``ImageDraw.rectangle`` truncates the float corners to int and fills both corner pixels, so
  the filled block is ``x0' <= col <= int(x1)``, ``y0' <= row <= int(y1)`` (clipped to the image), i.e.
  ``floor(s) + 1`` pixels on a side unless clipped; it is reproduced exactly. PIL refuses an RGB tuple on
  an "L" image, so 1-channel images get grey 123, the L conversion of ``(125, 123, 114)``.

Differences from the reference code that are not about PIL: random numbers come from a torch generator
instead of Python's ``random``/NumPy, so the same seed does not give the reference's images; and the Cutout
centre is ``U[0, w) x U[0, h)`` as intended, whereas the reference's ``np.random.uniform(w)`` actually
samples from ``(1, w]`` (NumPy reads the lone argument as ``low``, with ``high = 1``). Float input is
rounded and clamped to 0..255 first, as an 8-bit image would be.

On CUDA the same code runs with the same arithmetic (elementwise IEEE float32/float64 ops, integer index
maps; tensors are divided by CPU scalars only when these are powers of two, because CUDA turns such a
division into a multiplication by the reciprocal), so it should give the CPU's images bit for bit;
``tests/test_randaugment.py`` checks that when a GPU is present (none was when this was written).

Speed (one CPU thread, ``torch.set_num_threads(1)``, median of 20 calls of :func:`apply_randaugment` with
freshly sampled parameters on random uint8 images, on a 2-core machine busy with other jobs, load average
3.3): 64×3×32×32: 5.5 ms; 64×1×28×28: 4.2 ms (sampling the parameters: 0.05 ms). The reference's
per-image PIL code with the same parameters takes 6.0 ms and 3.3 ms there: on a CPU the batched version is
about as fast as PIL (it is bound by the overhead of many small tensor operations, up to 26 op calls
per batch, not by the pixels); its point is running on the training device without a per-sample loop or a
PIL round trip.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mimkd.data.augment import to_device
from mimkd.errors import DataError

__all__ = [
    "CUTOUT_FILL",
    "CUTOUT_FILL_GREY",
    "OPS",
    "RandAugmentParams",
    "apply_cutout",
    "apply_op",
    "apply_randaugment",
    "sample_randaugment",
]

OPS: tuple[tuple[str, float, float], ...] = (
    ("AutoContrast", 0.0, 1.0),
    ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95),
    ("Equalize", 0.0, 1.0),
    ("Identity", 0.0, 1.0),
    ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0),
    ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0),
    ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)
"""The RandAugment ops ``(name, lo, hi)``, in the reference's order; magnitudes are ``lo + (hi - lo) u``."""

CUTOUT_FILL: tuple[int, int, int] = (125, 123, 114)
"""Cutout colour of RGB images."""
CUTOUT_FILL_GREY: int = 123
"""Cutout grey of 1-channel images: PIL's L conversion of :data:`CUTOUT_FILL`."""

_MAX_CUTOUT = 0.5  # the Cutout side is U[0, 0.5) of the width


class RandAugmentParams(NamedTuple):
    """The random parameters of RandAugment + Cutout for a batch of N images (CPU tensors).

    Attributes:
        ops: N×n int64, the op of each round, indices into :data:`OPS`.
        values: N×n float64, each op's magnitude, already mapped into ``[lo, hi)``.
        cutout: N×3 float64 ``(v, x0, y0)``: the side as a fraction of the width, ``v ∈ [0, 0.5)`` (no
            Cutout when 0), and the square's centre in pixels, ``x0 ∈ [0, w)``, ``y0 ∈ [0, h)``.
    """

    ops: torch.Tensor
    values: torch.Tensor
    cutout: torch.Tensor

    def take(self, start: int, stop: int) -> RandAugmentParams:
        """The parameters of samples ``start:stop``."""
        return RandAugmentParams(*(t[start:stop] for t in self))


def sample_randaugment(
    n: int, image_hw: tuple[int, int], generator: torch.Generator | None, num_ops: int = 2
) -> RandAugmentParams:
    """Draw RandAugment(``num_ops``) + Cutout parameters for ``n`` images of size ``image_hw = (h, w)``.

    All on the CPU from ``generator``, in this order: op indices (``randint``, n×num_ops), magnitudes
    (``rand``, n×num_ops float64), Cutout (``rand``, n×3 float64).
    """
    if n < 0 or num_ops < 0:
        raise DataError(f"need n >= 0 and num_ops >= 0, got n={n}, num_ops={num_ops}")
    h, w = (int(s) for s in image_hw)
    ops = torch.randint(0, len(OPS), (n, num_ops), generator=generator, dtype=torch.int64)
    u = torch.rand(n, num_ops, dtype=torch.float64, generator=generator)
    lo = torch.tensor([op[1] for op in OPS], dtype=torch.float64)[ops]
    hi = torch.tensor([op[2] for op in OPS], dtype=torch.float64)[ops]
    values = lo + (hi - lo) * u
    c = torch.rand(n, 3, dtype=torch.float64, generator=generator)
    cutout = torch.stack([_MAX_CUTOUT * c[:, 0], c[:, 1] * w, c[:, 2] * h], 1)
    return RandAugmentParams(ops, values, cutout)


# ----------------------------------------------------------------------------------------------------------
# helpers


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """A new float32 N×C×H×W tensor of integral 0..255 values (what an 8-bit image holds)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"RandAugment expects N×C×H×W images with C = 1 or 3, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32)
    return images.to(torch.float32).round().clamp_(0, 255)


def _per_sample(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A per-sample CPU vector as an M×1×1×1 tensor of ``dtype`` on ``like``'s device."""
    return to_device(t.to(dtype).reshape(-1, 1, 1, 1), like.device)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)``, 0 <= factor <= 1: ``trunc(d + f (x - d))`` in float32."""
    f = _per_sample(factor, x)  # PIL passes the factor on as a C float
    return (degenerate + f * (x - degenerate)).trunc_().clamp_(0, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (M×1×H×W): ``(19595 R + 38470 G + 7471 B + 32768) >> 16``.

    Exact in float32: every intermediate is an integer below 2**24.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    s = r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0
    return (s / 65536.0).floor_().unsqueeze(1)


def _gather(x: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """``out[m, :, y, x] = x[m, :, sy, sx]`` for M×H×W int64 source indices; 0 where they fall outside."""
    m, c, h, w = x.shape
    valid = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    flat = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).view(m, 1, h * w).expand(m, c, h * w)
    out = x.reshape(m, c, h * w).gather(2, flat).view(m, c, h, w)
    return out.masked_fill_(~valid.unsqueeze(1), 0.0)


def _fix(t: torch.Tensor) -> torch.Tensor:
    """PIL's 16.16 fixed point: ``floor(t * 65536 + 0.5)`` as int64."""
    return torch.floor(t * 65536.0 + 0.5).to(torch.int64)


def _affine_fixed(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """PIL's nearest-neighbour affine transform (its fixed-point path) for M×6 float64 ``(a, b, c, d, e, f)``.

    Output pixel (x, y) samples input ``(a x + b y + c, d x + e y + f)`` at pixel centres, computed as PIL
    does in 16.16 fixed point: ``xin = (FIX(c + a/2 + b/2) + y FIX(b) + x FIX(a)) >> 16``.
    """
    a, b, c, d, e, f = coeffs.unbind(1)
    fixed = torch.stack([_fix(a), _fix(b), _fix((c + a * 0.5) + b * 0.5), _fix(d), _fix(e)], 1)
    fixed = torch.cat([fixed, _fix((f + d * 0.5) + e * 0.5).unsqueeze(1)], 1)
    k = to_device(fixed, x.device).view(-1, 6, 1, 1)
    _, _, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    sx = (k[:, 2] + ys * k[:, 1] + xs * k[:, 0]) >> 16
    sy = (k[:, 5] + ys * k[:, 4] + xs * k[:, 3]) >> 16
    return _gather(x, sx, sy)


def _scale_path_index(offset: torch.Tensor, size: int) -> torch.Tensor:
    """Source indices of PIL's "scale" affine path along one axis, M×size int64.

    PIL starts at ``offset + 0.5``, adds 1.0 per pixel (sequentially, as this CPU cumsum does) and maps a
    coordinate to ``-1`` if negative, else to its truncation.
    """
    steps = torch.ones(offset.shape[0], size, dtype=torch.float64)
    steps[:, 0] = offset + 0.5
    pos = steps.cumsum(1)
    return torch.where(pos < 0, torch.full_like(pos, -1.0), pos.trunc()).to(torch.int64)


def _translate(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """PIL's ``transform(AFFINE, (1, 0, dx, 0, 1, dy))`` (nearest, zero fill) for per-sample pixel shifts."""
    m, _, h, w = x.shape
    sx = to_device(_scale_path_index(dx, w), x.device).view(m, 1, w).expand(m, h, w)
    sy = to_device(_scale_path_index(dy, h), x.device).view(m, h, 1).expand(m, h, w)
    return _gather(x, sx, sy)


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Apply per image/channel look-up tables (M·C×256, integral values) to integral float32 images."""
    m, c, h, w = x.shape
    idx = x.reshape(m * c, h * w).to(torch.int64)
    return lut.to(torch.float32).gather(1, idx).view(m, c, h, w)


# ----------------------------------------------------------------------------------------------------------
# the ops: each maps an M×C×H×W float32 integral batch and M float64 CPU magnitudes to a new batch


def _autocontrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast``: per channel, LUT ``int(i * 255/(hi - lo) - lo * 255/(hi - lo))`` clipped."""
    m, c, h, w = x.shape
    flat = x.reshape(m * c, h * w)
    lo = flat.amin(1, keepdim=True).to(torch.float64)
    hi = flat.amax(1, keepdim=True).to(torch.float64)
    spread = hi > lo
    # not ``255.0 / t``: torch evaluates that as ``t.reciprocal() * 255``, one rounding too many
    scale = torch.full_like(hi, 255.0) / torch.where(spread, hi - lo, torch.ones_like(hi))
    offset = -lo * scale
    levels = torch.arange(256, dtype=torch.float64, device=x.device).expand(m * c, 256)
    lut = (levels * scale + offset).floor_().clamp_(0, 255)
    return _lut(x, torch.where(spread, lut, levels))


def _brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness(img).enhance(v)``: a blend with black."""
    return _blend(torch.zeros_like(x), x, v)


def _color(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color(img).enhance(v)``: a blend with the grey image (identity for 1 channel)."""
    if x.shape[1] == 1:
        return x
    return _blend(_grey(x).expand_as(x), x, v)


def _contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast(img).enhance(v)``: a blend with the grey image's mean, ``int(mean + 0.5)``."""
    g = _grey(x)
    total = g.to(torch.float64).sum((1, 2, 3), keepdim=True)
    count = torch.full_like(
        total, g.shape[2] * g.shape[3]
    )  # a tensor: CUDA turns ``t / scalar`` into t * (1/s)
    mean = (total / count + 0.5).floor_().to(torch.float32)
    return _blend(mean.expand_as(x), x, v)


def _equalize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize``: PIL's per-channel LUT ``(step // 2 + #pixels below i) // step``, clipped."""
    m, c, h, w = x.shape
    idx = x.reshape(m * c, h * w).to(torch.int64)
    hist = torch.zeros(m * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, idx, torch.ones_like(idx))
    top = hist.gather(1, idx.amax(1, keepdim=True))  # pixels at the highest value present
    step = (h * w - top) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    identity = torch.arange(256, device=x.device).expand_as(lut)
    return _lut(x, torch.where(step > 0, lut, identity))


def _identity(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x


def _posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ImageOps.posterize(img, max(1, int(v)))``: keep the top bits."""
    bits = v.trunc().clamp(1, 8)
    q = _per_sample(torch.pow(2.0, 8 - bits), x)
    return (x / q).floor_().mul_(q)


def _rotate(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``img.rotate(v)``: counter-clockwise by ``v`` degrees about ``(w/2, h/2)``, nearest, black fill."""
    _, _, h, w = x.shape
    angle = torch.remainder(v.to(torch.float64), 360.0)
    rad = -(angle * (math.pi / 180.0))
    cos = torch.round(torch.cos(rad), decimals=15)
    sin = torch.round(torch.sin(rad), decimals=15)
    msin = torch.round(-torch.sin(rad), decimals=15)
    cx, cy = w / 2, h / 2
    c = (cos * -cx + sin * -cy) + 0.0 + cx
    f = (msin * -cx + cos * -cy) + 0.0 + cy
    coeffs = torch.stack([cos, sin, c, msin, cos, f], 1)
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    coeffs = torch.where((angle == 0).unsqueeze(1), identity, coeffs)  # PIL returns a copy at 0 degrees
    return _affine_fixed(x, coeffs)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageFilter.SMOOTH`` (3×3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13), borders kept.

    Summed in PIL's float32 order: ``0.5 + row(y+1) + row(y) + row(y-1)``, each row ``(l k + c k') + r k``,
    then truncated.
    """
    h, w = x.shape[-2:]
    if h < 3 or w < 3:
        return x
    thirteen = torch.tensor(13.0, dtype=torch.float32)
    k1 = torch.tensor(1.0, dtype=torch.float32) / thirteen
    k5 = torch.tensor(5.0, dtype=torch.float32) / thirteen

    def row(r: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        return (r[..., :-2] * k1 + r[..., 1:-1] * centre) + r[..., 2:] * k1

    ss = row(x[..., 2:, :], k1) + 0.5
    ss = ss + row(x[..., 1:-1, :], k5)
    ss = ss + row(x[..., :-2, :], k1)
    out = x.clone()
    out[..., 1:-1, 1:-1] = ss.clamp_(0, 255).trunc_()
    return out


def _sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Sharpness(img).enhance(v)``: a blend with the SMOOTH-filtered image."""
    return _blend(_smooth(x), x, v)


def _shear_x(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``img.transform(size, AFFINE, (1, v, 0, 0, 1, 0))``: source ``x + v y``."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return _affine_fixed(x, torch.stack([one, v, zero, zero, one, zero], 1).to(torch.float64))


def _shear_y(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``img.transform(size, AFFINE, (1, 0, 0, v, 1, 0))``: source ``y + v x``."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return _affine_fixed(x, torch.stack([one, zero, zero, v, one, zero], 1).to(torch.float64))


def _solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize(img, v)``: invert pixels ``>= v`` (for integers, ``i < v`` iff ``i < ceil(v)``)."""
    t = _per_sample(torch.ceil(v), x)
    return torch.where(x < t, x, 255.0 - x)


def _translate_x(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``img.transform(size, AFFINE, (1, 0, v * w, 0, 1, 0))``: source column ``x + v w``."""
    v = v.to(torch.float64)
    return _translate(x, v * x.shape[3], torch.zeros_like(v))


def _translate_y(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``img.transform(size, AFFINE, (1, 0, 0, 0, 1, v * h))``: source row ``y + v h``."""
    v = v.to(torch.float64)
    return _translate(x, torch.zeros_like(v), v * x.shape[2])


_OP_FNS = (
    _autocontrast,
    _brightness,
    _color,
    _contrast,
    _equalize,
    _identity,
    _posterize,
    _rotate,
    _sharpness,
    _shear_x,
    _shear_y,
    _solarize,
    _translate_x,
    _translate_y,
)
_OP_INDEX = {name: i for i, (name, _, _) in enumerate(OPS)}


# ----------------------------------------------------------------------------------------------------------
# public application


def apply_op(images: torch.Tensor, op: int | str, values: torch.Tensor | float) -> torch.Tensor:
    """Apply one op of :data:`OPS` (index or name) to every image, with per-sample magnitudes ``values``.

    ``values`` is a float or an N-vector (taken as float64 on the CPU). Returns float32 integral 0..255.
    """
    k = _OP_INDEX.get(op, -1) if isinstance(op, str) else int(op)
    if not 0 <= k < len(OPS):
        raise DataError(f"unknown op {op!r}: give an index 0..{len(OPS) - 1} or one of {list(_OP_INDEX)}")
    x = _pixels(images)
    v = torch.as_tensor(values, dtype=torch.float64).cpu().expand(x.shape[0]).clone()
    return _OP_FNS[k](x, v)


def _cutout_boxes(cutout: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """N×4 int64 inclusive boxes ``(col0, row0, col1, row1)`` filled by PIL's rectangle (empty: col1 = -1)."""
    v, cx, cy = cutout.to(torch.float64).unbind(1)
    side = v * w
    x0 = (cx - side / 2.0).clamp(min=0).floor()
    y0 = (cy - side / 2.0).clamp(min=0).floor()
    x1 = torch.minimum(x0 + side, torch.full_like(side, w)).floor()  # PIL's (int) of the float corner
    y1 = torch.minimum(y0 + side, torch.full_like(side, h)).floor()
    boxes = torch.stack([x0, y0, x1, y1], 1).to(torch.int64)
    boxes[v <= 0, 2] = -1
    return boxes


def apply_cutout(images: torch.Tensor, cutout: torch.Tensor) -> torch.Tensor:
    """Cutout with N×3 ``(v, x0, y0)`` parameters (see :class:`RandAugmentParams`), as PIL draws it.

    Fills ``(125, 123, 114)`` (1-channel images: grey 123) over columns ``x0'..int(x1)`` and rows
    ``y0'..int(y1)``, both ends included. Returns float32 integral 0..255.
    """
    return _cutout(_pixels(images), cutout)


def _cutout(x: torch.Tensor, cutout: torch.Tensor) -> torch.Tensor:
    """Cutout drawn into ``x`` in place."""
    n, c, h, w = x.shape
    if cutout.shape != (n, 3):
        raise DataError(f"cutout parameters must be {n}×3, got {tuple(cutout.shape)}")
    b = to_device(_cutout_boxes(cutout.cpu(), h, w), x.device).view(n, 4, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (cols >= b[:, 0]) & (cols <= b[:, 2]) & (rows >= b[:, 1]) & (rows <= b[:, 3])
    fill = CUTOUT_FILL if c == 3 else (CUTOUT_FILL_GREY,)
    for ch, value in enumerate(fill):  # in place (x is the caller's own copy), channel by channel
        x[:, ch].masked_fill_(inside, float(value))
    return x


def apply_randaugment(images: torch.Tensor, params: RandAugmentParams) -> torch.Tensor:
    """RandAugment + Cutout of an N×C×H×W batch (C = 1 or 3; uint8 or float 0..255; any device).

    Round by round, each op is applied to the sub-batch of samples that chose it; then Cutout. All random
    numbers come from ``params`` (from :func:`sample_randaugment`). Returns float32 integral 0..255.
    """
    x = _pixels(images)
    n = x.shape[0]
    if params.ops.shape != params.values.shape or params.ops.dim() != 2 or params.ops.shape[0] != n:
        raise DataError(
            f"params for {tuple(params.ops.shape)} / {tuple(params.values.shape)} ops do not fit {n} images"
        )
    ops, values = params.ops.cpu(), params.values.cpu()
    for r in range(ops.shape[1]):
        for k, fn in enumerate(_OP_FNS):
            if fn is _identity:
                continue
            chosen = (ops[:, r] == k).nonzero().squeeze(1)
            if chosen.numel() == 0:
                continue
            v = values[chosen, r]
            if chosen.numel() == n:  # the whole batch: no gather needed
                x = fn(x, v)
                continue
            idx = to_device(chosen, x.device)
            x.index_copy_(0, idx, fn(x.index_select(0, idx), v))  # x is this function's own tensor
    return _cutout(x, params.cutout)
