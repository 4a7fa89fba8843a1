"""Batched RandAugment + Cutout (mimkd.data.randaugment) against real PIL, op by op and whole.

The oracle is the reference's per-image PIL code (FixMatch/MLKD RandAugment), run on the same magnitudes.
Every op matches PIL bit for bit (tolerance 0) on RGB 32×32 and L 28×28 images, and so do Cutout and whole
RandAugment + Cutout pipelines.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from mimkd.data.randaugment import (
    CUTOUT_FILL,
    CUTOUT_FILL_GREY,
    OPS,
    RandAugmentParams,
    apply_cutout,
    apply_op,
    apply_randaugment,
    sample_randaugment,
)
from mimkd.errors import DataError

SHAPES = [(3, 32, 32), (1, 28, 28)]  # RGB 32×32 and L 28×28
SHAPE_IDS = ["rgb32", "l28"]
NAMES = [name for name, _, _ in OPS]


# ----------------------------------------------------------------------------------------------------------
# the PIL oracle


def pil_op(img: Image.Image, name: str, v: float) -> Image.Image:
    """The reference op ``name`` with magnitude ``v`` on one PIL image."""
    w, h = img.size
    table = {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(v),
        "Color": lambda: ImageEnhance.Color(img).enhance(v),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(v),
        "Equalize": lambda: ImageOps.equalize(img),
        "Identity": lambda: img,
        "Posterize": lambda: ImageOps.posterize(img, max(1, int(v))),
        "Rotate": lambda: img.rotate(v),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(v),
        "ShearX": lambda: img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "ShearY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "Solarize": lambda: ImageOps.solarize(img, v),
        "TranslateX": lambda: img.transform(img.size, Image.AFFINE, (1, 0, v * w, 0, 1, 0)),
        "TranslateY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * h)),
    }
    return table[name]()


def pil_cutout(img: Image.Image, v: float, cx: float, cy: float) -> Image.Image:
    """The reference Cutout (side ``v * width``) with a given centre ``(cx, cy)``."""
    if v <= 0:
        return img
    w, h = img.size
    s = v * w
    x0 = int(max(0, cx - s / 2.0))
    y0 = int(max(0, cy - s / 2.0))
    x1 = min(w, x0 + s)
    y1 = min(h, y0 + s)
    img = img.copy()
    fill = CUTOUT_FILL if img.mode == "RGB" else CUTOUT_FILL_GREY  # PIL refuses an RGB tuple on "L"
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), fill)
    return img


def pil_randaugment(img: Image.Image, params: RandAugmentParams, i: int) -> Image.Image:
    """Sample ``i`` of ``params`` through PIL: its ops in order, then Cutout."""
    for k, v in zip(params.ops[i].tolist(), params.values[i].tolist()):
        img = pil_op(img, NAMES[k], v)
    return pil_cutout(img, *params.cutout[i].tolist())


def to_pil(t: torch.Tensor) -> Image.Image:
    a = t.to(torch.uint8).numpy()
    return Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB")


def from_pil(img: Image.Image) -> torch.Tensor:
    a = np.asarray(img)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a.copy()).to(torch.float32)


def pil_batch(images: torch.Tensor, fn) -> torch.Tensor:
    """``fn(pil_image, i)`` for every image of the batch, back as a float32 N×C×H×W tensor."""
    return torch.stack([from_pil(fn(to_pil(images[i]), i)) for i in range(images.shape[0])])


def make_images(shape: tuple[int, int, int], seed: int, n: int = 24) -> torch.Tensor:
    """Random uint8 images plus the cases the histogram ops branch on: low contrast, constant, two levels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    x[0:4] = 100 + x[0:4] // 16  # narrow range: Equalize's LUT overflows and is clipped
    x[4] = 77  # constant: AutoContrast and Equalize leave it alone
    x[5] = torch.where(x[5] < 128, 30, 200).to(torch.uint8)  # two levels
    x[6] = x[6] // 64 * 64  # four levels
    x[7, :, :, : shape[2] // 2] = 255  # saturated half
    for i, (lo, span) in enumerate([(0, 8), (3, 37), (0, 26), (60, 91), (0, 57), (200, 13), (17, 200)]):
        x[8 + i] = lo + x[8 + i] % span  # AutoContrast: 255 / (hi - lo) of all sorts
    return x


def magnitudes(name: str, lo: float, hi: float, n: int, seed: int) -> torch.Tensor:
    """n magnitudes over the whole range: the ends, the middle, edge cases, the rest uniform."""
    g = torch.Generator().manual_seed(1000 + seed)
    u = torch.rand(n, dtype=torch.float64, generator=g)
    u[:4] = torch.tensor([0.0, 0.5, 1 - 1e-12, 0.25], dtype=torch.float64)
    v = lo + (hi - lo) * u
    special = {
        "Posterize": [4.0, 5.0, 6.5, 7.0],
        "Rotate": [0.0, -30.0, 90.0 / 7, -15.0],
        "Solarize": [0.0, 128.0, 255.0, 127.5],
        "ShearX": [0.0, -0.3, 0.1, -0.05],
        "ShearY": [0.0, -0.3, 0.1, -0.05],
        "TranslateX": [0.0, -0.3, 0.1, -1 / 32],
        "TranslateY": [0.0, -0.3, 0.1, -1 / 28],
    }
    if name in special:
        v[4:8] = torch.tensor(special[name], dtype=torch.float64)
    return v


# ----------------------------------------------------------------------------------------------------------
# op by op, Cutout, whole pipeline


def test_ops_table() -> None:
    assert NAMES == [
        "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
        "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY",
    ]  # fmt: skip
    assert all(lo < hi for _, lo, hi in OPS)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("k", range(len(OPS)), ids=NAMES)
def test_op_matches_pil(k: int, shape: tuple[int, int, int]) -> None:
    """Every op equals PIL exactly (point, enhance and geometric ops alike), over several magnitudes."""
    name, lo, hi = OPS[k]
    for seed in range(3):
        images = make_images(shape, seed)
        v = magnitudes(name, lo, hi, images.shape[0], seed)
        out = apply_op(images, name, v)
        ref = pil_batch(images, lambda img, i, v=v: pil_op(img, name, float(v[i])))
        assert out.dtype == torch.float32
        mismatch = (out != ref).sum().item()
        assert mismatch == 0, f"{name} seed {seed}: {mismatch} pixels differ from PIL"


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cutout_matches_pil_rectangle(shape: tuple[int, int, int]) -> None:
    n = 300
    images = make_images(shape, 5, n)
    g = torch.Generator().manual_seed(7)
    u = torch.rand(n, 3, dtype=torch.float64, generator=g)
    h, w = shape[1:]
    cut = torch.stack([0.5 * u[:, 0], u[:, 1] * w, u[:, 2] * h], 1)
    cut[:10, 0] = 0.0  # no Cutout
    cut[10:20, 1:] = 0.0  # top-left corner
    cut[20:30, 1] = w - 1e-9  # right edge
    cut[30:40, 2] = h - 1e-9  # bottom edge
    cut[40:50, 0] = torch.arange(1, 11, dtype=torch.float64) / w  # integral sides
    cut[50:60, 0] = 0.5 - 1e-12  # the largest side
    out = apply_cutout(images, cut)
    ref = pil_batch(images, lambda img, i: pil_cutout(img, *cut[i].tolist()))
    assert torch.equal(out, ref)
    assert torch.equal(out[:10], images[:10].float())
    changed = (out != images.float()).any(1).flatten(1).sum(1)
    assert (changed[60:] > 0).float().mean() > 0.9  # the boxes really are drawn


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_whole_randaugment_matches_pil(shape: tuple[int, int, int]) -> None:
    """A batch in which every op occurs in both rounds, composed in order, then Cutout: equal to PIL."""
    n = 42
    images = make_images(shape, 11, n)
    params = sample_randaugment(n, shape[1:], torch.Generator().manual_seed(3))
    ops = torch.stack([torch.arange(n) % 14, (torch.arange(n) * 5 + 3) % 14], 1)
    lo = torch.tensor([o[1] for o in OPS], dtype=torch.float64)[ops]
    hi = torch.tensor([o[2] for o in OPS], dtype=torch.float64)[ops]
    u = torch.rand(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = RandAugmentParams(ops, lo + (hi - lo) * u, params.cutout)
    assert set(ops[:, 0].tolist()) == set(range(14)) == set(ops[:, 1].tolist())
    out = apply_randaugment(images, params)
    ref = pil_batch(images, lambda img, i: pil_randaugment(img, params, i))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("num_ops", [1, 3])
def test_sampled_randaugment_matches_pil(num_ops: int) -> None:
    images = make_images((3, 32, 32), 13, 64)
    params = sample_randaugment(64, (32, 32), torch.Generator().manual_seed(num_ops), num_ops=num_ops)
    out = apply_randaugment(images, params)
    ref = pil_batch(images, lambda img, i: pil_randaugment(img, params, i))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("shape", [(3, 20, 36), (1, 37, 19)], ids=["rgb20x36", "l37x19"])
def test_non_square_images_match_pil(shape: tuple[int, int, int]) -> None:
    """Width and height are not mixed up: every op and a whole pipeline on non-square images."""
    images = make_images(shape, 1, 24)
    for k, (name, lo, hi) in enumerate(OPS):
        v = magnitudes(name, lo, hi, images.shape[0], 0)
        ref = pil_batch(images, lambda img, i, v=v, name=name: pil_op(img, name, float(v[i])))
        assert torch.equal(apply_op(images, k, v), ref), name
    params = sample_randaugment(24, shape[1:], torch.Generator().manual_seed(0), num_ops=3)
    ref = pil_batch(images, lambda img, i: pil_randaugment(img, params, i))
    assert torch.equal(apply_randaugment(images, params), ref)


# ----------------------------------------------------------------------------------------------------------
# vectorisation, sampling, dtypes, devices


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batch_equals_single_images(shape: tuple[int, int, int]) -> None:
    n = 40
    images = make_images(shape, 2, n)
    params = sample_randaugment(n, shape[1:], torch.Generator().manual_seed(9))
    batch = apply_randaugment(images, params)
    singles = torch.cat([apply_randaugment(images[i : i + 1], params.take(i, i + 1)) for i in range(n)])
    assert torch.equal(batch, singles)


def test_sampling_is_deterministic_and_in_range() -> None:
    a = sample_randaugment(500, (28, 32), torch.Generator().manual_seed(4))
    b = sample_randaugment(500, (28, 32), torch.Generator().manual_seed(4))
    c = sample_randaugment(500, (28, 32), torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.values, c.values)
    assert a.ops.shape == (500, 2) and a.ops.dtype == torch.int64
    assert a.values.dtype == torch.float64 and a.cutout.shape == (500, 3)
    assert a.ops.min() == 0 and a.ops.max() == len(OPS) - 1
    lo = torch.tensor([o[1] for o in OPS], dtype=torch.float64)[a.ops]
    hi = torch.tensor([o[2] for o in OPS], dtype=torch.float64)[a.ops]
    assert ((a.values >= lo) & (a.values < hi)).all()
    v, x0, y0 = a.cutout.unbind(1)
    assert (v >= 0).all() and (v < 0.5).all()
    assert (x0 >= 0).all() and (x0 < 32).all() and (y0 >= 0).all() and (y0 < 28).all()
    assert sample_randaugment(3, (8, 8), None, num_ops=4).ops.shape == (3, 4)
    empty = sample_randaugment(0, (8, 8), None)
    assert apply_randaugment(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), empty).shape == (0, 3, 8, 8)


def test_take_and_slices() -> None:
    n = 32
    images = make_images((3, 32, 32), 8, n)
    params = sample_randaugment(n, (32, 32), torch.Generator().manual_seed(1))
    part = params.take(5, 17)
    assert all(torch.equal(p, t[5:17]) for p, t in zip(part, params))
    assert isinstance(part, RandAugmentParams)
    full = apply_randaugment(images, params)
    assert torch.equal(apply_randaugment(images[5:17], part), full[5:17])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_dtypes_and_range(shape: tuple[int, int, int]) -> None:
    images = make_images(shape, 3, 32)
    params = sample_randaugment(32, shape[1:], torch.Generator().manual_seed(2))
    out = apply_randaugment(images, params)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    assert torch.equal(apply_randaugment(images.float(), params), out)
    assert torch.equal(apply_randaugment(images.double(), params), out)
    # float input is rounded and clamped to 8-bit values first
    noisy = images.float() + torch.empty(images.shape).uniform_(-0.45, 0.45)
    assert torch.equal(apply_randaugment(noisy, params), out)
    assert torch.equal(images, make_images(shape, 3, 32))  # the input is left alone
    only_cutout = sample_randaugment(32, shape[1:], torch.Generator().manual_seed(2), num_ops=0)
    assert torch.equal(apply_randaugment(images, only_cutout), apply_cutout(images, only_cutout.cutout))


def test_bad_input() -> None:
    params = sample_randaugment(4, (8, 8), torch.Generator().manual_seed(0))
    with pytest.raises(DataError):
        apply_randaugment(torch.zeros(4, 2, 8, 8, dtype=torch.uint8), params)
    with pytest.raises(DataError):
        apply_randaugment(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), params)
    with pytest.raises(DataError):
        apply_op(torch.zeros(4, 3, 8, 8), 14, 0.0)
    with pytest.raises(DataError):
        apply_op(torch.zeros(4, 3, 8, 8), "Invert", 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cuda_matches_cpu(shape: tuple[int, int, int]) -> None:
    n = 64
    images = make_images(shape, 6, n)
    params = sample_randaugment(n, shape[1:], torch.Generator().manual_seed(6), num_ops=3)
    cpu = apply_randaugment(images, params)
    gpu = apply_randaugment(images.cuda(), params)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert torch.equal(gpu.cpu(), cpu)
    for k in range(len(OPS)):  # every op on its own, the whole batch at once
        v = magnitudes(OPS[k][0], OPS[k][1], OPS[k][2], n, 0)
        assert torch.equal(apply_op(images.cuda(), k, v).cpu(), apply_op(images, k, v)), OPS[k][0]
