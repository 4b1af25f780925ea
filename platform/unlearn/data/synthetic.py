"""Procedural two-level image data: 5 shape families (superclasses) x 4 variants (classes) = 20 classes.

Every image is 3 x S x S RGB: a textured background with low-contrast clutter (small shapes of any
family, thin lines), one object, sometimes a faint small occluder in front, then colour jitter and
pixel noise. The object's *family* (disc, square, triangle, cross, star) is the superclass; the class
(id = 4 x superclass + variant) is one of four variants of that family:

    variant 0: shade a, solid      variant 1: shade b, striped
    variant 2: shade a, dotted     variant 3: shade b, hollow (ring / frame / outline)

The two shades are neighbouring hues around the family's own hue, so the classes of one superclass
share shape and colour and differ in texture and shade: a model's features entangle them, which is
what concept-level unlearning needs. Position, scale, rotation, aspect, texture period and phase,
saturation, brightness, background and clutter are random, so a small CNN fits the training set but
not all of the test set: measured (benchmarks/results/synthetic.md) the `cnn` reaches 97.6% train and
89.0% test accuracy on 8,000 / 2,000 images in 20 epochs, and 86% of its test errors stay inside the
true superclass. 10,000 images of 32 px take about 2 s to generate on 2 CPU cores.

Fully vectorised numpy, deterministic from the seed (train and test come from distinct seed streams),
balanced classes, quantised to uint8 and cached as Parquet under `cache_dir`, keyed by the sizes, the
seed and GENERATOR_VERSION. The cache file is also a valid input for the `parquet` dataset (flat
C x H x W uint8 `image`, `label`, `superclass`, `split`, `height`, `width`, `channels` columns).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from unlearn.data.base import ImageDataset

GENERATOR_VERSION = 1

FAMILIES = ["disc", "square", "triangle", "cross", "star"]
FAMILY_HUE = [0.0, 0.2, 0.4, 0.6, 0.8]
SHADE_OFFSET = 0.04  # shade a = hue - offset, shade b = hue + offset
SHADE_NAMES = [("crimson", "orange"), ("yellow", "lime"), ("green", "teal"), ("azure", "blue"), ("violet", "magenta")]
VARIANTS = [(0, "solid"), (1, "striped"), (0, "dotted"), (1, "hollow")]  # (shade, pattern) per class index
HOLLOW_STROKE = [0.30, 0.28, 0.22, 0.14, 0.16]  # outline width of the hollow variant, in object radii
NUM_CLASSES = len(FAMILIES) * len(VARIANTS)
# difficulty knobs (tuned so the small CNN fits the training set with a test gap like CIFAR's)
OBJECT_RADIUS = (0.17, 0.34)  # fraction of the image side
TEXTURE_DARKEN = (0.4, 0.85)  # secondary colour = primary x this (near 1: faint texture)
TEXTURE_PERIOD = (0.45, 0.65)  # object radii
NOISE_STD = (0.03, 0.1)
CHUNK = 1024  # images rendered at once (bounds memory; results do not depend on it)


def class_names() -> list[str]:
    return [f"{fam}-{SHADE_NAMES[f][shade]}-{pattern}"
            for f, fam in enumerate(FAMILIES) for shade, pattern in VARIANTS]


def superclass_of() -> np.ndarray:
    return np.repeat(np.arange(len(FAMILIES), dtype=np.int64), len(VARIANTS))


# ----------------------------------------------------------------------------------------------------
# shapes: signed distance (negative inside) in object units (radius ~1), vectorised over (n, S, S)


def _sdf(family: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if family == 0:  # disc
        return np.hypot(u, v) - 0.9
    if family == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) - 0.78
    if family == 2:  # triangle, pointing up (v grows downwards), circumradius ~1.15
        d = np.maximum(-v, 0.866 * u + 0.5 * v)
        return np.maximum(d, -0.866 * u + 0.5 * v) - 0.58
    if family == 3:  # cross / plus
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 0.3, av - 1.0), np.maximum(av - 0.3, au - 1.0))
    # five-pointed star (approximate distance)
    theta = np.arctan2(v, u)
    frac = (theta * (5 / (2 * np.pi))) % 1.0
    rho = 0.45 + 0.6 * np.abs(frac - 0.5) * 2
    return (np.hypot(u, v) - rho) * 0.6


def _family_sdf(families: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """SDF per image where each image has its own family."""
    out = np.empty_like(u)
    for f in np.unique(families):
        idx = np.flatnonzero(families == f)
        out[idx] = _sdf(int(f), u[idx], v[idx])
    return out


def _local(xx: np.ndarray, yy: np.ndarray, cx, cy, r, angle, aspect=None) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in each object's frame (centred, rotated, scaled to radius 1)."""
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    rr = r[:, None, None]
    u = (c * dx + s * dy) / rr
    v = (-s * dx + c * dy) / rr
    if aspect is not None:
        a = aspect[:, None, None]
        u, v = u / a, v * a
    return u, v


def _coverage(d: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from an object-unit distance (one pixel wide edge)."""
    return np.clip(0.5 - d * r[:, None, None], 0.0, 1.0)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(n,) HSV in [0, 1] -> (n, 3) RGB."""
    h = h % 1.0
    i = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(x, 1) for x in
                      [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)  # (6, n, 3)
    return table[i, np.arange(len(h))]


def _blend(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """In place: img (n,3,S,S) <- alpha * colour + (1 - alpha) * img; colour (n,3) or (n,3,S,S), alpha (n,S,S)."""
    if colour.ndim == 2:
        colour = colour[:, :, None, None]
    img += alpha[:, None] * (colour - img)
    return img


class _Rng:
    """float32 draws from a numpy Generator (rendering runs in float32: half the memory traffic)."""

    def __init__(self, gen: np.random.Generator) -> None:
        self.gen = gen

    def random(self, size=None) -> np.ndarray:
        return self.gen.random(size, dtype=np.float32)

    def uniform(self, low: float = 0.0, high: float = 1.0, size=None) -> np.ndarray:
        return np.float32(low) + np.float32(high - low) * self.gen.random(size, dtype=np.float32)

    def normal(self, loc: float = 0.0, scale: float = 1.0, size=None) -> np.ndarray:
        return np.float32(loc) + np.float32(scale) * self.gen.standard_normal(size, dtype=np.float32)

    def integers(self, *args, **kwargs) -> np.ndarray:
        return self.gen.integers(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# rendering


def _render(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Images (n, 3, size, size) uint8 for the class ids `labels`; every draw comes from `rng`."""
    n = len(labels)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    frng = _Rng(rng)
    for start in range(0, n, CHUNK):
        out[start:start + CHUNK] = _render_chunk(labels[start:start + CHUNK], size, frng)
    return out


def _render_chunk(labels: np.ndarray, size: int, rng: _Rng) -> np.ndarray:
    n, S = len(labels), float(size)
    fam = labels // len(VARIANTS)
    var = labels % len(VARIANTS)
    shade = np.array([v[0] for v in VARIANTS])[var]
    pattern = var  # 0 solid, 1 striped, 2 dotted, 3 hollow
    coords = (np.arange(size, dtype=np.float32) + 0.5)
    xx, yy = np.meshgrid(coords, coords)  # xx varies along width

    # background: linear gradient between two low-saturation colours, plus a faint periodic texture
    bg_a = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.5, n), rng.uniform(0.15, 0.9, n))
    bg_b = np.clip(bg_a + rng.normal(0, 0.15, (n, 3)), 0, 1)
    phi = rng.uniform(0, 2 * np.pi, n)
    t = ((np.cos(phi)[:, None, None] * (xx[None] - S / 2) + np.sin(phi)[:, None, None] * (yy[None] - S / 2)) / S + 0.5)
    img = (bg_a[:, :, None, None] + (bg_b - bg_a)[:, :, None, None] * np.clip(t, 0, 1)[:, None]).astype(np.float32)
    wave_k = rng.uniform(0.3, 1.2, n)[:, None, None]
    wave_phi = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    wave_dir = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    wave = np.sin(wave_k * (np.cos(wave_dir) * xx + np.sin(wave_dir) * yy) + wave_phi)
    img += (rng.uniform(0.0, 0.06, n)[:, None, None] * wave)[:, None]

    # clutter behind the object: small low-contrast shapes of any family, and thin lines
    for _ in range(4):
        img = _distractor(img, xx, yy, bg_a, rng, alpha_range=(0.25, 0.6))
    for _ in range(2):
        p0 = rng.uniform(0, S, (n, 2))
        ang = rng.uniform(0, np.pi, n)
        nx, ny = -np.sin(ang)[:, None, None], np.cos(ang)[:, None, None]
        dist = np.abs((xx[None] - p0[:, 0, None, None]) * nx + (yy[None] - p0[:, 1, None, None]) * ny)
        width = rng.uniform(0.4, 1.0, n)[:, None, None] * S / 32
        line = np.clip(width + 0.5 - dist, 0, 1) * rng.uniform(0.2, 0.5, n)[:, None, None]
        colour = np.clip(bg_a + rng.normal(0, 0.2, (n, 3)), 0, 1)
        img = _blend(img, colour, line)

    # the object
    r = rng.uniform(*OBJECT_RADIUS, n) * S
    margin = 0.55 * r
    cx = margin + rng.random(n) * (S - 2 * margin)
    cy = margin + rng.random(n) * (S - 2 * margin)
    angle = rng.uniform(0, 2 * np.pi, n)
    aspect = np.exp(rng.uniform(-0.15, 0.15, n))
    u, v = _local(xx, yy, cx, cy, r, angle, aspect)
    d = _family_sdf(fam, u, v)
    stroke = np.asarray(HOLLOW_STROKE, dtype=np.float32)[fam] * rng.uniform(0.85, 1.15, n)
    hollow = pattern == 3
    if hollow.any():
        dh = d[hollow]
        d[hollow] = np.maximum(dh, -(dh + stroke[hollow, None, None]))
    cover = _coverage(d, r)

    hue = (np.asarray(FAMILY_HUE)[fam] + np.where(shade == 0, -SHADE_OFFSET, SHADE_OFFSET)).astype(np.float32)
    hue = hue + np.clip(rng.normal(0, 0.02, n), -0.045, 0.045)
    sat = rng.uniform(0.5, 1.0, n)
    val = rng.uniform(0.55, 1.0, n)
    primary = _hsv_to_rgb(hue, sat, val)
    secondary = primary * rng.uniform(*TEXTURE_DARKEN, n)[:, None]

    # texture in the object's frame: 1 = primary colour, 0 = secondary colour
    period = rng.uniform(*TEXTURE_PERIOD, n)[:, None, None]  # object units
    tex_angle = rng.uniform(0, np.pi, n)
    tc, ts = np.cos(tex_angle)[:, None, None], np.sin(tex_angle)[:, None, None]
    tu, tv = tc * u + ts * v, -ts * u + tc * v
    ph = rng.uniform(0, 1, (n, 2))
    tex = np.ones_like(u)
    striped = pattern == 1
    if striped.any():
        s_ = np.sin(2 * np.pi * (tu[striped] / period[striped] + ph[striped, 0, None, None]))
        tex[striped] = np.clip(0.5 + 1.5 * s_, 0, 1)
    dotted = pattern == 2
    if dotted.any():
        p = period[dotted]
        gu = (tu[dotted] / p + ph[dotted, 0, None, None]) % 1.0 - 0.5
        gv = (tv[dotted] / p + ph[dotted, 1, None, None]) % 1.0 - 0.5
        dist = np.hypot(gu, gv) * p  # object units
        rad = 0.28 * p
        tex[dotted] = np.clip(0.5 + (dist - rad) * r[dotted, None, None], 0, 1)  # dark dots
    colour = secondary[:, :, None, None] + (primary - secondary)[:, :, None, None] * tex[:, None]
    img = _blend(img, colour, cover)

    # an occasional faint occluder in front of the object
    front = (rng.random(n) < 0.5).astype(np.float32)
    img = _distractor(img, xx, yy, bg_a, rng, alpha_range=(0.2, 0.5), mask=front)

    # global colour jitter and pixel noise
    gain = rng.uniform(0.8, 1.15, (n, 1, 1, 1)) * rng.uniform(0.92, 1.08, (n, 3, 1, 1))
    img -= 0.5
    img *= rng.uniform(0.8, 1.1, (n, 1, 1, 1)) * gain
    img += 0.5 * gain + rng.uniform(-0.05, 0.05, (n, 1, 1, 1))
    img += rng.normal(0, 1, img.shape) * rng.uniform(*NOISE_STD, (n, 1, 1, 1))
    img *= 255
    return np.clip(np.rint(img, out=img), 0, 255).astype(np.uint8)


def _distractor(img, xx, yy, bg, rng: _Rng, alpha_range, mask=None) -> np.ndarray:
    n, S = img.shape[0], float(img.shape[-1])
    fam = rng.integers(0, len(FAMILIES), n)
    r = rng.uniform(0.06, 0.14, n) * S
    cx, cy = rng.uniform(0, S, n), rng.uniform(0, S, n)
    u, v = _local(xx, yy, cx, cy, r, rng.uniform(0, 2 * np.pi, n))
    d = _family_sdf(fam, u, v)
    hollow = rng.random(n) < 0.3
    d = np.where(hollow[:, None, None], np.maximum(d, -(d + 0.3)), d)
    strength = rng.uniform(*alpha_range, n) * (1 if mask is None else mask)
    alpha = _coverage(d, r) * strength[:, None, None]
    colour = np.clip(bg + rng.normal(0, 0.25, (n, 3)), 0, 1)
    return _blend(img, colour, alpha)


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    return rng.permutation(labels)


def generate(num: int, image_size: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """`num` uint8 images (num, 3, S, S) and their labels from seed stream `stream` (0 train, 1 test)."""
    rng = np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, int(seed), int(stream)]))
    labels = _balanced_labels(num, rng)
    return _render(labels, image_size, rng), labels


# ----------------------------------------------------------------------------------------------------
# cache and loader


def cache_path(cache_dir: Path, num_train: int, num_test: int, image_size: int, seed: int) -> Path:
    return Path(cache_dir) / (f"synthetic-v{GENERATOR_VERSION}-train{num_train}-test{num_test}"
                              f"-size{image_size}-seed{seed}.parquet")


def _write_cache(path: Path, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.concatenate([x_tr, x_te])
    y = np.concatenate([y_tr, y_te])
    n, c, h, w = x.shape
    image = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=pa.uint8()), c * h * w)
    table = pa.table({
        "image": image,
        "label": pa.array(y, type=pa.int64()),
        "superclass": pa.array(y // len(VARIANTS), type=pa.int64()),
        "split": pa.array(["train"] * len(y_tr) + ["test"] * len(y_te)),
        "channels": pa.array(np.full(n, c, np.int16)),
        "height": pa.array(np.full(n, h, np.int16)),
        "width": pa.array(np.full(n, w, np.int16)),
    }).replace_schema_metadata({"generator_version": str(GENERATOR_VERSION)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_cache(path: Path, image_size: int) -> tuple[np.ndarray, ...]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["image", "label", "split"])
    flat = table.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    x = flat.astype(np.uint8, copy=False).reshape(table.num_rows, 3, image_size, image_size)
    y = table.column("label").to_numpy().astype(np.int64)
    is_test = np.asarray(table.column("split").to_pylist()) == "test"
    return x[~is_test], y[~is_test], x[is_test], y[is_test]


def load_synthetic(num_train: int, num_test: int, image_size: int, seed: int,
                   cache_dir: str | Path | None = None) -> ImageDataset:
    """The synthetic dataset (from the Parquet cache when present; generated and cached otherwise)."""
    path = cache_path(Path(cache_dir), num_train, num_test, image_size, seed) if cache_dir is not None else None
    data = None
    if path is not None and path.is_file():
        try:
            data = _read_cache(path, image_size)
        except Exception as exc:  # noqa: BLE001 - a damaged cache is regenerated
            print(f"synthetic: cache unreadable ({exc}); regenerating {path}", file=sys.stderr, flush=True)
            data = None
    if data is None:
        t0 = time.perf_counter()
        x_tr, y_tr = generate(num_train, image_size, seed, stream=0)
        x_te, y_te = generate(num_test, image_size, seed, stream=1)
        data = (x_tr, y_tr, x_te, y_te)
        if path is not None:
            _write_cache(path, *data)
        print(f"synthetic: generated {num_train}+{num_test} images of {image_size}px in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    x_tr, y_tr, x_te, y_te = data
    scale = np.float32(255.0)  # the same division as the parquet loader, so both give identical arrays
    return ImageDataset(
        name="synthetic",
        x_train=x_tr.astype(np.float32) / scale, y_train=y_tr,
        x_test=x_te.astype(np.float32) / scale, y_test=y_te,
        class_names=class_names(), superclass_of=superclass_of(), superclass_names=list(FAMILIES),
    )
