"""A small DeiT trained on scikit-learn's handwritten digits, then pruned: held-out accuracy before and after.

    python benchmarks/digits_deit.py [--epochs 30] [--sparsities 0.1,0.2,0.3,0.4,0.5]

The 1797 real 8x8 scans are turned into RGB PIL images and go through a ViT image processor
(resize to 32x32, normalise), like any image model's inputs. A DeiT built from a DeiTConfig
(patch 4, so 64 patch tokens + CLS + distillation; 4 blocks, hidden 64, 4 heads, MLP 256) is
trained on 1200 images (seeded split, a minute on CPU) and evaluated on the other 597. Each
row prunes a copy of it with 256 training images as calibration. Nothing is cached: the model
is rebuilt from scratch on every run. Writes benchmarks/results/digits.md and digits.png.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch
from measure import save_line_plot
from PIL import Image
from transformers import DeiTConfig, DeiTForImageClassification

RESULTS = os.path.join(os.path.dirname(__file__), "results")
TRAIN, CALIBRATION = 1200, 256


def image_processor():
    """A ViT image processor: 8x8 scans -> 32x32 RGB, scaled to [-1, 1]."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def digits_split(seed: int = 0) -> dict:
    """PIL images and labels of the train and held-out parts (a seeded permutation of the 1797 scans)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    images = [Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).convert("RGB") for i in order]
    labels = torch.as_tensor(digits.target[order]).long()
    return {"train": (images[:TRAIN], labels[:TRAIN]), "test": (images[TRAIN:], labels[TRAIN:])}


def digits_config() -> DeiTConfig:
    return DeiTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=256, num_labels=10, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def train_digits_deit(epochs: int = 30, seed: int = 0, log: bool = False):
    """Train the digits DeiT from scratch; returns (model, processor, split, pixel values of train and test)."""
    torch.manual_seed(seed)
    processor = image_processor()
    split = digits_split(seed)
    train_x = processor(images=split["train"][0], return_tensors="pt")["pixel_values"]
    test_x = processor(images=split["test"][0], return_tensors="pt")["pixel_values"]
    train_y = split["train"][1]
    model = DeiTForImageClassification(digits_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * ((TRAIN + 63) // 64))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(TRAIN, generator=generator)
        for start in range(0, TRAIN, 64):
            batch = order[start : start + 64]
            loss = model(pixel_values=train_x[batch], labels=train_y[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if log:
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}", flush=True)
    return model.eval(), processor, split, train_x, test_x


def main() -> None:
    import hf_snp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--targets", nargs="+", default=["mlp", "mlp,heads"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-searches", default="iterative,candidates",
                        help="with 'blocks' among the targets: each block_search to run")
    parser.add_argument("--name", default="digits", help="writes benchmarks/results/NAME.md and NAME.png")
    args = parser.parse_args()

    start = time.perf_counter()
    dense, processor, split, train_x, test_x = train_digits_deit(args.epochs, args.seed)
    train_seconds = time.perf_counter() - start
    test = (test_x, split["test"][1])
    base = hf_snp.evaluate_accuracy(dense, test, progress=False)
    print(f"dense: top-1 {base['top1']:.4f} (trained {train_seconds:.0f} s)", flush=True)
    calibration = split["train"][0][:CALIBRATION]  # PIL images: the processor path
    rows = []
    for targets in args.targets:
        searches = args.block_searches.split(",") if "blocks" in targets.split(",") else [None]
        for method, search in ((m, s) for m in ("snp", "vbp") for s in searches):
            options = {} if search is None else {"block_search": search}
            label = method if search is None else f"{method} {search}"
            for sparsity in (float(s) for s in args.sparsities.split(",")):
                result = hf_snp.prune(copy.deepcopy(dense), method=method, sparsity=sparsity,
                                      targets=targets.split(","), calibration=calibration, image_processor=processor,
                                      num_samples=CALIBRATION, seed=args.seed, progress=False, **options)
                accuracy = hf_snp.evaluate_accuracy(result.model, test, progress=False)
                rows.append((label, targets, sparsity, accuracy["top1"], accuracy["top5"],
                             result.report["params_after"]))
                print(f"{label} {targets:>9} {sparsity:.0%}: top-1 {accuracy['top1']:.4f}  "
                      f"params {result.report['params_after']:,}", flush=True)
    write(args, base, hf_snp.count_parameters(dense), train_seconds, rows)


def write(args, base, dense_params, train_seconds, rows) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    lines = [
        "# DeiT on scikit-learn digits: held-out accuracy after one-shot pruning",
        "",
        f"A DeiT (4 blocks, hidden 64, 4 heads, MLP 256, patch 4 on 32x32 inputs) trained from scratch for "
        f"{args.epochs} epochs on {TRAIN} digit scans ({train_seconds:.0f} s on CPU); accuracy on the "
        f"{1797 - TRAIN} held-out scans. Calibration: {CALIBRATION} training images through the ViT image processor. "
        f"Dense: top-1 {base['top1']:.4f}, top-5 {base['top5']:.4f}, {dense_params:,} parameters. Uniform allocation.",
        "",
        f"Regenerate: `python benchmarks/digits_deit.py --epochs {args.epochs} --sparsities {args.sparsities} "
        f"--targets {' '.join(args.targets)}"
        + (f" --block-searches {args.block_searches} --name {args.name}`" if args.name != "digits" else "`"),
        "",
        "With 'blocks' among the targets the sparsity is of all encoder-layer parameters.",
        "",
        "| method | targets | sparsity | top-1 | top-5 | parameters after |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {m} | {t} | {s:.0%} | {a1:.4f} | {a5:.4f} | {p:,} |" for m, t, s, a1, a5, p in rows]
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")

    series = {f"{method} ({targets})": [(s * 100, a1) for m, t, s, a1, *_ in rows if (m, t) == (method, targets)]
              for method, targets in dict.fromkeys((m, t) for m, t, *_ in rows)}
    save_line_plot(os.path.join(RESULTS, f"{args.name}.png"), series, "sparsity of the targeted parameters (%)",
                   "held-out top-1 accuracy", "DeiT on digits: one-shot pruning", reference=("dense", base["top1"]),
                   size=(6.5, 4))

if __name__ == "__main__":
    main()
