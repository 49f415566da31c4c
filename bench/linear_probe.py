"""How hard is each built-in dataset? A linear probe, and a small MLP on synthetic-cifar.

    python bench/linear_probe.py                  # all built-ins, seed 0
    python bench/linear_probe.py --seed 1 --datasets synthetic-av --json

Linear probe: multinomial logistic regression (one `nn.Linear`, cross-entropy + L2), trained with
torch full batch (L-BFGS) on the raw flattened inputs of the train split, every input concatenated.
Each feature is standardised with the train split's mean and std (an affine change that a linear
model could absorb; it only helps the optimiser). Token-id inputs (`text`) enter as bag-of-tokens
counts, since an id's numeric value means nothing. The L2 strength is picked on the val split from
a small grid; the test accuracy (and UAR, mean per-class recall) is reported, together with the
probe on each input alone.

Reference models, built inline (the bench does not import mmkit.models), to show what a small
non-linear model reaches (skip them with --no-models):
  synthetic-cifar    the multichannel network (color 3072→512→256 and brightness 1024→512→256,
                     concatenated → 10), AdamW lr 1e-3, batch 32, 2 epochs on a class-stratified
                     25 % of train — the `quick` recipe — over a few seeds; and 5 epochs on all of it
  synthetic-av       a small CNN (audio: two 1-D convolutions over time; video: two 2-D
                     convolutions per frame and one over time; mean+max pooling), 20 epochs, on
                     audio alone, video alone and both
  synthetic-fashion  a small CNN on the image alone, 5 epochs

A dataset is "learnable but not trivial" when the probe is clearly below the reference models.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from torch import nn

from mmkit.data.catalog import BUILTIN_DATASETS
from mmkit.data.datasets import Dataset, iterate_batches, stratified_subset
from mmkit.data.synthetic import GENERATORS
from mmkit.data.tokenizer import VOCAB_SIZE

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
LBFGS_ITERATIONS = 100


def flat_features(dataset: Dataset, names: list[str]) -> torch.Tensor:
    """(N, D): float inputs flattened, token ids as bag-of-tokens counts, concatenated."""
    parts = []
    for name in names:
        tensor = dataset.inputs[name]
        if tensor.is_floating_point():
            parts.append(tensor.flatten(1).float())
        else:
            counts = torch.zeros(tensor.shape[0], VOCAB_SIZE)
            parts.append(counts.scatter_add_(1, tensor.flatten(1), torch.ones(tensor.flatten(1).shape)))
    return torch.cat(parts, dim=1)


def recalls(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    hits = torch.zeros(num_classes).index_add_(0, labels, (predicted == labels).float())
    return hits / torch.bincount(labels, minlength=num_classes).clamp(min=1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> nn.Linear:
    torch.manual_seed(0)
    probe = nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(
        probe.parameters(), lr=1, max_iter=LBFGS_ITERATIONS, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(x), y) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def linear_probe(dataset: Dataset, names: list[str], l2_grid=L2_GRID) -> dict:
    """Test accuracy and UAR of the probe whose L2 strength is best on val."""
    features = flat_features(dataset, names)
    train, val, test = (dataset.indices(s) for s in ("train", "val", "test"))
    mean, std = features[train].mean(0), features[train].std(0).clamp(min=1e-6)
    features = (features - mean) / std
    y = dataset.labels
    best = None
    for l2 in l2_grid:
        probe = fit_probe(features[train], y[train], dataset.num_classes, l2)
        with torch.no_grad():
            val_accuracy = (probe(features[val]).argmax(1) == y[val]).float().mean().item()
        if best is None or val_accuracy > best[0]:
            best = (val_accuracy, l2, probe)
    _, l2, probe = best
    with torch.no_grad():
        predicted = probe(features[test]).argmax(1)
        train_accuracy = (probe(features[train]).argmax(1) == y[train]).float().mean().item()
    return {
        "inputs": names,
        "l2": l2,
        "train_accuracy": train_accuracy,
        "test_accuracy": (predicted == y[test]).float().mean().item(),
        "test_uar": recalls(predicted, y[test], dataset.num_classes).mean().item(),
    }


class MultichannelMLP(nn.Module):
    """The multichannel model's structure, built here so the bench does not depend on mmkit.models."""

    def __init__(self, color_dim: int, brightness_dim: int, num_classes: int) -> None:
        super().__init__()

        def stream(width: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(width, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU())

        self.color, self.brightness = stream(color_dim), stream(brightness_dim)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, color: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([self.color(color), self.brightness(brightness)], dim=-1))


class AudioVisualCNN(nn.Module):
    """A small audio-visual CNN; `use` picks the modalities it reads."""

    def __init__(self, n_mels: int, num_classes: int, use: tuple[str, ...] = ("audio", "video")) -> None:
        super().__init__()
        self.use = use
        self.audio = nn.Sequential(
            nn.Conv1d(n_mels, 64, 5, padding=2), nn.ReLU(),
            nn.Conv1d(64, 64, 5, padding=2, stride=2), nn.ReLU(),
        )
        self.frame = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
            nn.Linear(32 * 9, 64), nn.ReLU(),
        )
        self.time = nn.Conv1d(64, 64, 3, padding=1)
        self.classifier = nn.Linear(128 * len(use), num_classes)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        features = []
        if "audio" in self.use:
            a = self.audio(audio.transpose(1, 2))  # (B, 64, T/2)
            features += [a.mean(-1), a.amax(-1)]
        if "video" in self.use:
            batch, frames = video.shape[:2]
            v = self.frame(video.flatten(0, 1)).view(batch, frames, -1).transpose(1, 2)  # (B, 64, F)
            v = torch.relu(self.time(v))
            features += [v.mean(-1), v.amax(-1)]
        return self.classifier(torch.cat(features, dim=-1))


class ImageCNN(nn.Module):
    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, image: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def train_and_test(
    model: nn.Module, dataset: Dataset, train: torch.Tensor, *, epochs: int, batch_size: int,
    lr: float, weight_decay: float = 0.01, seed: int = 0,
) -> dict:
    """Minibatch AdamW on `train`; test accuracy and UAR of the final model."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for inputs, labels in iterate_batches(dataset, train, batch_size, shuffle=True, generator=generator):
            loss = nn.functional.cross_entropy(model(**inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test = dataset.indices("test")
    with torch.no_grad():
        predicted = torch.cat([model(**inputs).argmax(1)
                               for inputs, _ in iterate_batches(dataset, test, 256, shuffle=False)])
    labels = dataset.labels[test]
    return {
        "test_accuracy": (predicted == labels).float().mean().item(),
        "test_uar": recalls(predicted, labels, dataset.num_classes).mean().item(),
    }


def reference_models(name: str, dataset: Dataset, mlp_seeds: int) -> dict[str, dict]:
    shapes, k, train = dataset.input_shapes(), dataset.num_classes, dataset.indices("train")
    results = {}
    if name == "synthetic-cifar":
        color, brightness = shapes["color"][0], shapes["brightness"][0]
        for seed in range(mlp_seeds):  # the `quick` recipe
            torch.manual_seed(seed)
            subset = stratified_subset(train, dataset.labels, 0.25, seed)
            model = MultichannelMLP(color, brightness, k)
            label = f"multichannel MLP, quick recipe (2 epochs, 25 % of train), seed {seed}"
            results[label] = train_and_test(model, dataset, subset, epochs=2, batch_size=32, lr=1e-3, seed=seed)
        torch.manual_seed(0)
        results["multichannel MLP, 5 epochs on all of train"] = train_and_test(
            MultichannelMLP(color, brightness, k), dataset, train, epochs=5, batch_size=32, lr=1e-3
        )
    elif name == "synthetic-av":
        for use in (("audio",), ("video",), ("audio", "video")):
            torch.manual_seed(0)
            results[f"small CNN on {' + '.join(use)}, 20 epochs"] = train_and_test(
                AudioVisualCNN(shapes["audio"][1], k, use), dataset, train,
                epochs=20, batch_size=32, lr=2e-3, weight_decay=0.05,
            )
    elif name == "synthetic-fashion":
        torch.manual_seed(0)
        channels, size = shapes["image"][0], shapes["image"][1]
        results["small CNN on the image, 5 epochs"] = train_and_test(
            ImageCNN(channels, size, k), dataset, train, epochs=5, batch_size=64, lr=1e-3
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    names = list(BUILTIN_DATASETS)
    parser.add_argument("--datasets", nargs="+", default=names, choices=names)
    parser.add_argument("--mlp-seeds", type=int, default=3, help="seeds of the quick-recipe MLP")
    parser.add_argument("--no-models", action="store_true", help="only the linear probes")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = parser.parse_args(argv)

    report = {}
    for name in args.datasets:
        start = time.perf_counter()
        dataset = GENERATORS[name](args.seed)  # not load_dataset: time a real generation, not the cache
        generation_s = time.perf_counter() - start
        entry = {
            "generation_s": round(generation_s, 3),
            "bytes": dataset.nbytes(),
            "sizes": [len(dataset.indices(s)) for s in ("train", "val", "test")],
            "inputs": {k: list(v) for k, v in dataset.input_shapes().items()},
        }
        names = list(dataset.inputs)
        entry["probe"] = linear_probe(dataset, names)
        if len(names) > 1:
            entry["probe_per_input"] = {n: linear_probe(dataset, [n], (entry["probe"]["l2"],)) for n in names}
        if not args.no_models:
            entry["models"] = reference_models(name, dataset, args.mlp_seeds)
        report[name] = entry
        if not args.json:
            print_entry(name, entry)
            sys.stdout.flush()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is KiB on Linux
    if args.json:
        json.dump({"seed": args.seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "peak_rss_bytes": peak_rss, "datasets": report}, sys.stdout, indent=2)
        print()
    else:
        threads = torch.get_num_threads()
        print(f"torch {torch.__version__}, {threads} threads, peak RSS {peak_rss / 2**20:.0f} MiB")
    return 0


def print_entry(name: str, entry: dict) -> None:
    probe = entry["probe"]
    sizes = "/".join(map(str, entry["sizes"]))
    print(f"{name}: {sizes} train/val/test, generated in {entry['generation_s']:.2f} s, "
          f"{entry['bytes'] / 2**20:.1f} MiB, inputs {entry['inputs']}")
    print(f"  linear probe (all inputs, l2={probe['l2']:g}): test accuracy {probe['test_accuracy']:.3f}, "
          f"UAR {probe['test_uar']:.3f} (train accuracy {probe['train_accuracy']:.3f})")
    for input_name, alone in entry.get("probe_per_input", {}).items():
        accuracy, uar = alone["test_accuracy"], alone["test_uar"]
        print(f"    {input_name} alone: test accuracy {accuracy:.3f}, UAR {uar:.3f}")
    for model, result in entry.get("models", {}).items():
        print(f"  {model}: test accuracy {result['test_accuracy']:.3f}, UAR {result['test_uar']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
