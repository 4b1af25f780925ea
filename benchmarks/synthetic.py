"""Synthetic dataset benchmark: generation time, and how hard the data is for the model zoo.

    .venv/bin/python benchmarks/synthetic.py                      # cnn at the default size, resnet18 on a subset
    .venv/bin/python benchmarks/synthetic.py --models cnn --epochs 10

Reports the time to generate 10,000 images, then per model: train and test accuracy, their gap,
superclass accuracy on test and the share of test errors that stay inside the true superclass
(how strongly the classes of one shape family are entangled). ResNet-18 trains at ~40 images/s on a
2-core CPU, so it is measured on the first `--resnet-train` training images for `--resnet-epochs`
epochs (said in the table). Writes benchmarks/results/synthetic.md and synthetic.json.
"""

from __future__ import annotations

import argparse
import json
import platform as _stdlib_platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unlearn.data import synthetic
from unlearn.evaluation.metrics import accuracy, probabilities
from unlearn.models import build_model
from unlearn.spec import MODEL_SPECS, OptimizerSpec, TrainSpec
from unlearn.training import fit_classifier

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-train", type=int, default=8000)
    p.add_argument("--num-test", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=20, help="cnn training epochs")
    p.add_argument("--models", default="cnn,resnet18")
    p.add_argument("--resnet-train", type=int, default=1000, help="training images for resnet18 (CPU cost)")
    p.add_argument("--resnet-epochs", type=int, default=10)
    p.add_argument("--gen-count", type=int, default=10_000, help="images generated for the timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def entanglement(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, superclass_of: np.ndarray) -> dict:
    pred = probabilities(model, x).argmax(1)
    wrong = pred != y
    same_super = superclass_of[pred] == superclass_of[y]
    return {
        "superclass_test_acc": float(100 * same_super.mean()),
        "errors_within_superclass": float(100 * (wrong & same_super).sum() / max(int(wrong.sum()), 1)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "machine": f"{_stdlib_platform.machine()}, {torch.get_num_threads()} torch threads, cpu",
                     "generator_version": synthetic.GENERATOR_VERSION}

    t0 = time.perf_counter()
    synthetic.generate(args.gen_count, args.image_size, args.seed, stream=0)
    gen_s = time.perf_counter() - t0
    results["generation"] = {"images": args.gen_count, "image_size": args.image_size, "seconds": round(gen_s, 2),
                             "images_per_s": round(args.gen_count / gen_s)}
    print(f"generation: {args.gen_count} images of {args.image_size}px in {gen_s:.2f}s", flush=True)

    ds = synthetic.load_synthetic(args.num_train, args.num_test, args.image_size, args.seed, cache_dir=None)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        n_train = min(args.resnet_train, len(ds.y_train)) if name == "resnet18" else len(ds.y_train)
        epochs = args.resnet_epochs if name == "resnet18" else args.epochs
        x_tr, y_tr = ds.x_train[:n_train], ds.y_train[:n_train]
        torch.manual_seed(args.seed)
        model = build_model(MODEL_SPECS[name](), ds.num_classes, ds.input_shape)
        recipe = TrainSpec(epochs=epochs, batch_size=64, optimizer=OptimizerSpec(name="sgd", lr=0.05, momentum=0.9,
                                                                                 weight_decay=5e-4),
                           lr_schedule="cosine")
        print(f"{name}: training on {n_train} images, {epochs} epochs", flush=True)
        t0 = time.perf_counter()
        model = fit_classifier(model, x_tr, y_tr, recipe, seed=args.seed)
        train_s = time.perf_counter() - t0
        train_acc = accuracy(model, x_tr, y_tr)
        test_acc = accuracy(model, ds.x_test, ds.y_test)
        row = {"model": name, "train_images": n_train, "test_images": len(ds.y_test), "epochs": epochs,
               "train_acc": round(train_acc, 2), "test_acc": round(test_acc, 2),
               "gap": round(train_acc - test_acc, 2), "train_seconds": round(train_s, 1),
               "train_images_per_s": round(n_train * epochs / train_s, 1),
               **{k: round(v, 2) for k, v in entanglement(model, ds.x_test, ds.y_test, ds.superclass_of).items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    results["models"] = rows
    write(results, args.out)
    return 0


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthetic.json").write_text(json.dumps(results, indent=2) + "\n")
    g = results["generation"]
    cfg = results["config"]
    lines = [
        "# Synthetic dataset: generation speed and difficulty",
        "",
        f"Generator version {results['generator_version']}; {results['machine']}. "
        "Produced by `benchmarks/synthetic.py`.",
        "",
        f"Generation: {g['images']:,} images of {g['image_size']}x{g['image_size']} in {g['seconds']} s "
        f"({g['images_per_s']:,} images/s, numpy, one process).",
        "",
        "Training recipe: SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 64, cosine schedule, no augmentation; "
        f"seed {cfg['seed']}. 20 classes = 5 shape families (superclasses) x 4 variants.",
        "",
        "| model | train images | test images | epochs | train acc % | test acc % | gap (points) "
        "| superclass test acc % | errors within superclass % | train s | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["models"]:
        note = ""
        if r["model"] == "resnet18":
            note = (f"CPU-feasible subset: first {r['train_images']} training images, {r['epochs']} epochs "
                    f"({r['train_images_per_s']:.0f} images/s): under-trained, not comparable to the cnn row")
        lines.append(f"| {r['model']} | {r['train_images']} | {r['test_images']} | {r['epochs']} | {r['train_acc']:.1f} "
                     f"| {r['test_acc']:.1f} | {r['gap']:.1f} | {r['superclass_test_acc']:.1f} "
                     f"| {r['errors_within_superclass']:.0f} | {r['train_seconds']:.0f} | {note} |")
    lines += ["", "*errors within superclass*: of the misclassified test images, the share predicted as another "
              "class of the same shape family (chance would be 3/19 = 16%).", ""]
    (out / "synthetic.md").write_text("\n".join(lines))
    print(f"wrote {out / 'synthetic.md'} and {out / 'synthetic.json'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
