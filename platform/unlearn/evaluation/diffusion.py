"""Evaluation of class-conditional diffusion models: FA, FD (and FID), CA, sample grids.

A *judge* classifier reads the generated images: by default the platform's `cnn`, trained here on the job's
training images and labels (cached under `cache_dir/judges/` by a content hash of the data and its recipe); with
`eval.judge`, a torchvision classifier from a local weights file (`local_judge`, evaluation/judges.py: e.g. an
ImageNet ResNet-50 for a DiT on ImageNet classes, where training a judge is neither cheap nor good). Either
reports its accuracy on the job's held-out images (`Judge.test_accuracy`).

- **FA**: percent of the images conditioned on a forgotten class that the judge assigns to it.
- **FU**: percent of those images the judge reads as no class at all (its *unreadable* class, below).
- **CA**: percent of the images conditioned on a kept class that the judge assigns to that class
  (a quality check: unlearning must not break the other classes).
- **FD**: Fréchet distance between the judge's penultimate-layer features of the generated kept-class
  images and of the real held-out (test) images of the kept classes.
- **FID**: the same with Inception-v3 pool features, only when `eval.inception_weights` names a local
  torchvision state dict (nothing is downloaded).

Only classes with training images (and the forgotten ones) are sampled and judged: a dataset sized to a
pretrained model's label space (an ImageNet subset under ImageNet's 1000 ids) has classes without images, whose
samples no real image could be compared with.

The trained judge has one class beyond the data's: *unreadable*, learnt from generated noise images (uniform,
Gaussian, blocky and salt-and-pepper noise, as many as an average class has images). Without it a classifier must
call every image some class, and what a forgetting method often draws for the forgotten class (noise) was read
as one arbitrary class: on digits the judge called noise "3", so forgetting digit 3 into noise scored FA 100%.
A judge from `eval.judge` (fixed weights) has no such class.

Every model is sampled from the same starting noise (each sample's seeded by the job seed, its class and its
index within the class), with DDIM
(`model.sample_steps`) and classifier-free guidance `model.guidance_scale`, so methods differ only by
their weights. `evaluate` also draws a grid of `eval.grid_per_class` samples per class (one row a class,
the forgotten rows marked); `artifacts` saves it for the method's MLflow run, and also writes it as
`grid_<name>.png` next to results.json when the job sets `out_dir`.

On a worker group every worker samples and judges one contiguous share of the samples (drawing only its
share's starting noise) and the judge's readings and features are all-gathered, so the numbers do not depend
on the worker count; the driver only receives the metrics and the grid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unlearn.comm import Comm, LocalComm
from unlearn.data.scenarios import Splits
from unlearn.errors import BadInput
from unlearn.models import build_model
from unlearn.models.ddpm import sample, seeded_noise, unwrap
from unlearn.shards import eval_share
from unlearn.spec import CNNSpec, JobSpec, JudgeSpec, OptimizerSpec, TrainSpec

JUDGE_MODEL = CNNSpec(channels=[32, 64, 128])
JUDGE_TRAIN = TrainSpec(epochs=15, batch_size=64, optimizer=OptimizerSpec(name="sgd", lr=0.05, momentum=0.9,
                                                                          weight_decay=5e-4), lr_schedule="cosine")
JUDGE_VERSION = 2  # bump when the judge's recipe or features change (2: the unreadable class)
FEATURE_BATCH = 256


@dataclass
class Judge:
    """The evaluation classifier: class predictions and penultimate-layer features."""

    # `features(x)` and `forward(x)` (logits): SmallCNN (pooled conv features, then its head) or a local
    # torchvision classifier (judges.LocalClassifier: its penultimate layer, then its fc / heads)
    model: nn.Module
    test_accuracy: float
    rejects: bool = False  # True: its last class is "unreadable" (the trained judge), never a data class

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        device = next(self.model.parameters()).device
        # max(.., 1): an empty share still gives a (0, features) array to gather
        out = [self.model.features(x[i:i + FEATURE_BATCH].to(device)).cpu()
               for i in range(0, max(len(x), 1), FEATURE_BATCH)]
        return torch.cat(out).double().numpy()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        device = next(self.model.parameters()).device
        out = [self.model(x[i:i + FEATURE_BATCH].to(device)).argmax(1).cpu()
               for i in range(0, max(len(x), 1), FEATURE_BATCH)]
        return torch.cat(out).numpy()


def judge_key(x: np.ndarray, y: np.ndarray, seed: int) -> str:
    """Content hash of the judge's training data and recipe."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    h.update(json.dumps({"model": JUDGE_MODEL.model_dump(mode="json"), "train": JUDGE_TRAIN.model_dump(mode="json"),
                         "shape": list(x.shape), "seed": seed, "version": JUDGE_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def train_judge(splits: Splits, seed: int, cache_dir: str | Path) -> Judge:
    """The judge of a job's data: loaded from the cache, or trained on the training images now and cached."""
    from unlearn.models import build_model
    from unlearn.training import fit_classifier

    x, y = splits.train.x, splits.train.y
    input_shape = tuple(x.shape[1:])
    torch.manual_seed(seed)
    model = build_model(JUDGE_MODEL, splits.num_outputs + 1, input_shape)  # + the unreadable class
    path = Path(cache_dir) / "judges" / f"{judge_key(x, y, seed)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu")
        model.load_state_dict(saved["state"])
        return Judge(model.eval(), saved["test_accuracy"], rejects=True)
    print(f"diffusion judge: training {JUDGE_MODEL.name} on {len(y)} images ({JUDGE_TRAIN.epochs} epochs)",
          file=sys.stderr, flush=True)
    noise = unreadable_images(x, max(1, len(y) // max(len(np.unique(y)), 1)), seed)
    x_fit = np.concatenate([x, noise]).astype(np.float32)
    y_fit = np.concatenate([y, np.full(len(noise), splits.num_outputs, dtype=np.int64)])
    fit_classifier(model, x_fit, y_fit, JUDGE_TRAIN, seed, verbose=False)
    model.eval()
    judge = Judge(model, 0.0, rejects=True)
    judge.test_accuracy = held_out_accuracy(judge, splits)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({"state": model.state_dict(), "test_accuracy": judge.test_accuracy}, tmp)
    os.replace(tmp, path)
    print(f"diffusion judge: held-out accuracy {judge.test_accuracy:.1f}%", file=sys.stderr, flush=True)
    return judge


def held_out_accuracy(judge: Judge, splits: Splits) -> float:
    """Percent of the job's held-out (test) images the judge reads as their own class (0 without any)."""
    if not len(splits.test.y):
        return 0.0
    return float(100 * np.mean(judge.predict(torch.from_numpy(splits.test.x)) == splits.test.y))


def unreadable_images(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` images of no class, shaped like `x` (values in [0, 1]): a quarter each of uniform noise, Gaussian noise
    at the data's mean and spread, blocky noise (2x2 cells) and salt-and-pepper; seeded."""
    rng = np.random.default_rng(seed + 7919)
    shape = (n, *x.shape[1:])
    kind = rng.integers(0, 4, size=n)
    mean, std = float(x.mean()), float(x.std())
    uniform = rng.random(shape)
    gaussian = rng.normal(mean, std, size=shape)
    cells = rng.random((n, x.shape[1], (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2))
    blocky = cells.repeat(2, axis=2).repeat(2, axis=3)[:, :, :x.shape[2], :x.shape[3]]
    salt = (rng.random(shape) < 0.5).astype(np.float64)
    pick = kind.reshape(-1, *([1] * (len(shape) - 1)))
    out = np.where(pick == 0, uniform, np.where(pick == 1, gaussian, np.where(pick == 2, blocky, salt)))
    return out.clip(0, 1).astype(np.float32)


def local_judge(spec: JudgeSpec, splits: Splits, device: torch.device | str = "cpu") -> Judge:
    """The judge of `eval.judge`: a torchvision classifier from a local weights file (nothing trained), with its
    accuracy on the job's held-out images (read on `device`)."""
    from unlearn.evaluation.judges import load_classifier

    judge = Judge(load_classifier(spec, splits.num_outputs).to(device), 0.0)
    judge.test_accuracy = held_out_accuracy(judge, splits)
    test_y = splits.test.y
    print(f"diffusion judge: {spec.arch} from {spec.weights}, held-out accuracy {judge.test_accuracy:.1f}% "
          f"on {len(test_y)} images", file=sys.stderr, flush=True)
    if len(test_y) and judge.test_accuracy < 50:  # FA / CA would read noise: most likely ids that differ
        print(f"diffusion judge: warning: {spec.arch} reads the job's own images poorly; check that its classes "
              "are the dataset's ids (e.g. an ImageNet class index) and eval.judge.image_size", file=sys.stderr,
              flush=True)
    return judge


def build_judge(spec: JobSpec, splits: Splits, device: torch.device | str = "cpu") -> Judge:
    """`eval.judge`'s local classifier, else the cnn trained on the job's data (cached)."""
    if spec.eval.judge is not None:
        return local_judge(spec.eval.judge, splits, device)
    return train_judge(splits, spec.seed, spec.cache_dir)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature matrix (rows = images)."""
    return features.mean(0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray]) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½), with tr((Σa Σb)^½) = Σ √eig(Σa^½ Σb Σa^½) (real, stable)."""
    (mu_a, cov_a), (mu_b, cov_b) = stats_a, stats_b
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


class InceptionFeatures:
    """Inception-v3 pool features (2048) from a local torchvision state dict, for FID."""

    def __init__(self, weights: str) -> None:
        from torchvision.models import inception_v3

        path = Path(weights)
        if not path.is_file():
            raise BadInput(f"eval.inception_weights: file not found: {path} (it is never downloaded)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        aux = any(k.startswith("AuxLogits.") for k in state)
        model = inception_v3(weights=None, aux_logits=aux, init_weights=False, transform_input=False)
        model.load_state_dict(state)
        model.fc = nn.Identity()
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        import torch.nn.functional as F

        out = []
        for i in range(0, len(x), 32):
            batch = x[i:i + 32]
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            batch = F.interpolate(batch, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self.model(batch * 2 - 1))
        return torch.cat(out).double().numpy()


@dataclass
class DiffusionOutputs:
    """The conditioning labels of a model's evaluation samples, the judge's reading of them, and its grid."""

    labels: np.ndarray
    predicted: np.ndarray
    grid: torch.Tensor | None = None  # eval.grid_per_class samples per class, class-major


class DiffusionEvaluator:
    """FA / CA / FD (/ FID) of a class-conditional generator on a job's splits; sample grids as artifacts.

    Built once on the driver (the judge is trained or read from its cache there and the real images' feature
    statistics computed), then sent to the workers, which `evaluate` their shares of the samples.
    """

    def __init__(self, splits: Splits, spec: JobSpec, dataset) -> None:
        self.splits, self.spec = splits, spec
        build_model(spec.model, splits.num_outputs, tuple(splits.train.x.shape[1:]))  # a bad model spec stops here
        self.out_dir: Path | None = None  # set by the job: grids are also written next to results.json
        self.inception = InceptionFeatures(spec.eval.inception_weights) if spec.eval.inception_weights else None
        self.num_classes = splits.num_outputs
        self.forgotten = [int(c) for c in splits.target_labels]
        # the classes sampled and judged: those with training images, and the forgotten ones (classes without
        # images have no real images for FD, and a model trained here never saw them)
        self.classes = sorted({int(c) for c in np.unique(splits.train.y)} | set(self.forgotten))
        self.kept = [c for c in self.classes if c not in self.forgotten]
        names = dataset.class_names if splits.label_level == "class" else dataset.superclass_names
        self.class_names = [str(n) for n in names]
        self.device = torch.device("cuda" if spec.ray.use_gpu and torch.cuda.is_available() else "cpu")
        self.judge = build_judge(spec, splits, self.device)
        self.judge.model.to(self.device)
        real = torch.from_numpy(splits.test.x[np.isin(splits.test.y, self.kept)])
        self.real_stats = gaussian_stats(self.judge.features(real))
        self.real_inception = gaussian_stats(self.inception(real)) if self.inception else None

    @classmethod
    def sampler(cls, spec: JobSpec, num_classes: int) -> "DiffusionEvaluator":
        """Only the sampling half (no judge, no data): `generate` for throughput checks and tests."""
        evaluator = cls.__new__(cls)
        evaluator.spec, evaluator.num_classes = spec, num_classes
        evaluator.classes = list(range(num_classes))
        evaluator.device = torch.device("cuda" if spec.ray.use_gpu and torch.cuda.is_available() else "cpu")
        return evaluator

    def generate(self, model: nn.Module, per_class: int, seed: int,
                 comm: Comm | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """This worker's share of `per_class` images of every evaluated class (`classes`, class-major order), with
        the labels of the whole set. Each image's starting noise is seeded by (seed, class, index within the class)
        alone, so the set is the same whatever the worker count, and its first k images per class are the same for
        any per_class >= k; a worker draws only its own share's noise."""
        labels = torch.tensor(self.classes, dtype=torch.long).repeat_interleave(per_class)
        comm = comm or LocalComm()
        mine = torch.from_numpy(eval_share(len(labels), comm.world_size, comm.rank))
        noise = seeded_noise(seed, labels[mine], mine % per_class, unwrap(model).noise_shape)  # latents too
        where = next(model.parameters()).device
        model.to(self.device)
        try:
            images = sample(model, labels[mine], self.spec.model.sample_steps, self.spec.model.guidance_scale,
                            noise=noise)
        finally:
            model.to(where)
        return images, labels.numpy()

    def evaluate(self, model: nn.Module, comm: Comm | None = None,
                 device: torch.device | None = None) -> tuple[dict[str, float], DiffusionOutputs]:
        """The model's metrics (every worker of a group calls this with its comm; all get the same numbers)."""
        comm = comm or LocalComm()
        if device is not None and torch.device(device) != self.device:
            self.device = torch.device(device)
            self.judge.model.to(self.device)
        images, labels = self.generate(model, self.spec.eval.samples_per_class, self.spec.seed, comm)
        mine = eval_share(len(labels), comm.world_size, comm.rank)
        kept_mine = np.isin(labels[mine], self.kept)
        # The judge reads each worker's share; readings and features come together in sample order.
        predicted = self._gather(comm, torch.from_numpy(self.judge.predict(images)))
        features = self._gather(comm, torch.from_numpy(self.judge.features(images[torch.from_numpy(kept_mine)])))
        forgotten, kept = np.isin(labels, self.forgotten), np.isin(labels, self.kept)
        metrics: dict[str, float] = {}
        if forgotten.any():
            metrics["FA"] = float(100 * np.mean(predicted[forgotten] == labels[forgotten]))
            if self.judge.rejects:  # the trained judge's extra class: no digit at all
                metrics["FU"] = float(100 * np.mean(predicted[forgotten] == self.num_classes))
        metrics["CA"] = float(100 * np.mean(predicted[kept] == labels[kept]))
        metrics["FD"] = frechet_distance(gaussian_stats(features), self.real_stats)
        if self.inception is not None:
            inception = self._gather(comm, torch.from_numpy(self.inception(images[torch.from_numpy(kept_mine)])))
            metrics["FID"] = frechet_distance(gaussian_stats(inception), self.real_inception)
        grid, _ = self.generate(model, self.spec.eval.grid_per_class, self.spec.seed + 1, comm)
        grid = torch.from_numpy(self._gather(comm, grid))
        return metrics, DiffusionOutputs(labels, predicted, grid)

    def _gather(self, comm: Comm, values: torch.Tensor) -> np.ndarray:
        """Every worker's rows in rank order (shares are contiguous in rank order: the whole set in order)."""
        return comm.all_gather(values.contiguous().to(self.device)).cpu().numpy()

    def compare(self, metrics: dict[str, float], out: DiffusionOutputs, ref_metrics: dict[str, float],
                ref_out: DiffusionOutputs) -> dict[str, float]:
        """No extra comparison with retrain: FA and FD are read against the retrain row directly."""
        return {}

    def artifacts(self, model: nn.Module, name: str, folder: Path, out: DiffusionOutputs | None = None) -> list[Path]:
        """`grid_<name>.png`: `eval.grid_per_class` samples per class, one row a class (copied to out_dir too);
        the grid `evaluate` drew (`out`), or drawn here when there is none."""
        per_class = self.spec.eval.grid_per_class
        images = out.grid if out is not None and out.grid is not None else \
            self.generate(model, per_class, self.spec.seed + 1)[0]
        path = save_grid(images, per_class, self.class_names, self.forgotten, Path(folder) / f"grid_{name}.png",
                         f"{self.spec.name}: {name}", classes=self.classes)
        if self.out_dir is not None:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(self.out_dir) / path.name)
        return [path]


def save_grid(images: torch.Tensor, per_class: int, class_names: list[str], forgotten: list[int], path: Path,
              title: str, classes: list[int] | None = None) -> Path:
    """A PNG of the images in rows of `per_class` (one row per class: row r shows `classes[r]`, by default class
    r), rows labelled, forgotten ones in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    rows = len(images) // per_class
    classes = list(range(rows)) if classes is None else list(classes)
    size = images.shape[-1]
    grid = make_grid(images, nrow=per_class, padding=1, pad_value=1.0).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * per_class, 0.6 + 0.55 * rows))
    ax.imshow(grid[..., 0] if images.shape[1] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([1 + (size + 1) * r + size / 2 for r in range(rows)])
    labels = [f"{class_names[c]} (forgotten)" if c in forgotten else class_names[c] for c in classes[:rows]]
    ax.set_yticklabels(labels, fontsize=8)
    for c, tick in zip(classes, ax.get_yticklabels()):
        if c in forgotten:
            tick.set_color("red")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["DiffusionEvaluator", "DiffusionOutputs", "Judge", "build_judge", "frechet_distance", "gaussian_stats",
           "local_judge", "save_grid", "train_judge"]
