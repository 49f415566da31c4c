"""The data layer: built-in datasets, subsets, batching, and the tensor-file format."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmkit.data.catalog import BUILTIN_DATASETS, FASHION_CLASSES, dataset_info
from mmkit.data.datasets import Dataset, iterate_batches, load_dataset, num_batches, stratified_subset
from mmkit.data.synthetic import CLASS_PROMPTS, GENERATORS
from mmkit.data.tensorfile import read_tensor_file, save_tensor_file
from mmkit.data.tokenizer import decode
from mmkit.errors import MmkitError

EXPECTED_INPUTS = {
    "synthetic-cifar": {"color": ((3072,), torch.float32), "brightness": ((1024,), torch.float32)},
    "synthetic-av": {"audio": ((64, 40), torch.float32), "video": ((8, 3, 24, 24), torch.float32)},
    "synthetic-fashion": {"image": ((1, 28, 28), torch.float32), "text": ((32,), torch.int64)},
}


def small_dataset(n: int = 23, num_classes: int = 3) -> Dataset:
    """A tiny hand-made dataset: sample i has features (i, -i) and label i % num_classes."""
    features = torch.stack([torch.arange(n, dtype=torch.float32), -torch.arange(n, dtype=torch.float32)], 1)
    return Dataset(
        name="small",
        inputs={"color": features, "text": torch.arange(n).repeat(4, 1).T.contiguous()},
        labels=torch.arange(n) % num_classes,
        split=torch.zeros(n, dtype=torch.uint8),
        groups=None,
        classes=tuple(f"c{i}" for i in range(num_classes)),
    )


# --- built-in datasets -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_builtin_has_catalog_sizes_classes_shapes_and_dtypes(name: str) -> None:
    dataset = load_dataset(name)
    info = dataset_info(name)
    assert dataset.name == name
    assert [len(dataset.indices(s)) for s in ("train", "val", "test")] == [info.train, info.val, info.test]
    assert dataset.classes == info.classes and dataset.num_classes == len(info.classes)
    assert dataset.labels.dtype == torch.int64 and dataset.split.dtype == torch.uint8
    assert set(torch.unique(dataset.labels).tolist()) == set(range(dataset.num_classes))
    expected = EXPECTED_INPUTS[name]
    assert dataset.input_shapes() == {key: shape for key, (shape, _) in expected.items()}
    assert dataset.input_dtypes() == {key: dtype for key, (_, dtype) in expected.items()}
    assert dataset.nbytes() < 250 * 2**20
    train = dataset.indices("train")
    for key, tensor in dataset.inputs.items():
        assert torch.isfinite(tensor.float()).all()
        if tensor.is_floating_point():  # standardised on the train split
            assert abs(tensor[train].mean().item()) < 1e-3
            assert abs(tensor[train].std().item() - 1) < 1e-3


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_generation_is_deterministic_in_the_seed(name: str) -> None:
    first, again, other = GENERATORS[name](0), GENERATORS[name](0), GENERATORS[name](1)
    for key in first.inputs:
        assert torch.equal(first.inputs[key], again.inputs[key])
        assert not torch.equal(first.inputs[key], other.inputs[key])
    assert torch.equal(first.labels, again.labels) and torch.equal(first.split, again.split)
    assert not torch.equal(first.labels, other.labels)


def test_builtins_are_cached_per_name_and_seed() -> None:
    assert load_dataset("synthetic-fashion", seed=0) is load_dataset("synthetic-fashion", seed=0)
    assert load_dataset("synthetic-fashion", seed=0) is not load_dataset("synthetic-fashion", seed=3)


def test_balanced_builtins_have_equal_classes_in_every_split() -> None:
    dataset = load_dataset("synthetic-cifar")
    for split, per_class in (("train", 500), ("val", 100), ("test", 100)):
        counts = torch.bincount(dataset.labels[dataset.indices(split)], minlength=10)
        assert counts.tolist() == [per_class] * 10


def test_synthetic_av_is_actor_independent_and_neutral_is_half_as_frequent() -> None:
    dataset = load_dataset("synthetic-av")
    assert dataset.groups is not None and dataset.groups.dtype == torch.int64
    actors = {s: set(dataset.groups[dataset.indices(s)].tolist()) for s in ("train", "val", "test")}
    assert actors == {"train": set(range(1, 17)), "val": set(range(17, 21)), "test": set(range(21, 25))}
    assert Counter(dataset.groups.tolist()) == {actor: 120 for actor in range(1, 25)}
    neutral = dataset.classes.index("neutral")
    for split, size in (("train", 1920), ("val", 480), ("test", 480)):
        counts = torch.bincount(dataset.labels[dataset.indices(split)], minlength=8)
        assert counts.sum() == size
        others = [c for label, c in enumerate(counts.tolist()) if label != neutral]
        assert len(set(others)) == 1 and counts[neutral] * 2 == others[0]


def test_fashion_captions_do_not_leak_the_label() -> None:
    dataset = load_dataset("synthetic-fashion")
    captions = [decode(row) for row in dataset.inputs["text"]]
    names = [dataset.classes[label] for label in dataset.labels.tolist()]
    true_name = sum(name in caption for name, caption in zip(names, captions)) / len(captions)
    assert true_name <= 0.35
    assert true_name >= 0.15  # the hint is there, as designed (25 %)
    named_other = sum(
        any(other in caption for other in FASHION_CLASSES if other not in name) and name not in caption
        for name, caption in zip(names, captions)
    )
    assert named_other / len(captions) >= 0.05  # some captions name a wrong class
    for label in range(len(FASHION_CLASSES)):  # captions vary within a class: no shortcut
        within = {c for c, y in zip(captions, dataset.labels.tolist()) if y == label}
        assert len(within) > 100
    assert all(len(c.encode()) <= 30 for c in captions)  # nothing truncated at 32 tokens
    assert not set(captions) & set(CLASS_PROMPTS)
    assert CLASS_PROMPTS[0] == f"a photo of a {FASHION_CLASSES[0]}" and len(CLASS_PROMPTS) == 10


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(MmkitError) as error:
        load_dataset("synthetic-cfar")
    for name in BUILTIN_DATASETS:
        assert name in str(error.value)


def test_indices_rejects_an_unknown_split() -> None:
    with pytest.raises(MmkitError, match="train, val, test"):
        small_dataset().indices("validation")


# --- stratified subsets ---------------------------------------------------------------------------


def test_stratified_subset_halves_every_class() -> None:
    dataset = load_dataset("synthetic-av")
    train = dataset.indices("train")
    subset = stratified_subset(train, dataset.labels, 0.5, seed=0)
    assert len(subset) == 960
    assert torch.equal(subset, subset.sort().values)
    assert set(subset.tolist()) <= set(train.tolist())
    full = torch.bincount(dataset.labels[train], minlength=8)
    assert torch.equal(torch.bincount(dataset.labels[subset], minlength=8) * 2, full)


def test_stratified_subset_takes_aligned_or_whole_labels() -> None:
    labels = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1])
    train = torch.tensor([1, 3, 4, 6, 8, 9, 10, 11])  # not a prefix: the two readings differ
    whole = stratified_subset(train, labels, 0.5, seed=0)
    aligned = stratified_subset(train, labels[train], 0.5, seed=0)
    assert torch.equal(whole, aligned)
    assert torch.bincount(labels[whole], minlength=2).tolist() == [2, 2]  # Python's round(1.5), round(2.5)
    with pytest.raises(ValueError):
        stratified_subset(torch.tensor([0, 20]), labels, 0.5, seed=0)


def test_stratified_subset_is_seeded() -> None:
    dataset = load_dataset("synthetic-av")
    train = dataset.indices("train")
    first = stratified_subset(train, dataset.labels, 0.25, 7)
    assert torch.equal(first, stratified_subset(train, dataset.labels, 0.25, 7))
    assert not torch.equal(first, stratified_subset(train, dataset.labels, 0.25, 8))


def test_stratified_subset_keeps_one_per_class_and_all_at_fraction_one() -> None:
    dataset = load_dataset("synthetic-cifar")
    test = dataset.indices("test")
    tiny = stratified_subset(test, dataset.labels, 0.001, seed=0)
    assert torch.bincount(dataset.labels[tiny], minlength=10).tolist() == [1] * 10
    assert torch.equal(stratified_subset(test, dataset.labels, 1.0, seed=0), test)
    with pytest.raises(MmkitError):
        stratified_subset(test, dataset.labels, 0.0, seed=0)


# --- batching -------------------------------------------------------------------------------------


def test_iterate_batches_covers_each_index_once_and_matches_the_data() -> None:
    dataset = small_dataset(23)
    indices = torch.tensor([0, 2, 3, 5, 7, 8, 11, 12, 13, 17, 19, 22])
    seen = []
    generator = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(dataset, indices, 5, shuffle=True, generator=generator))
    assert [len(labels) for _, labels in batches] == [5, 5, 2]
    assert len(batches) == num_batches(len(indices), 5)
    for inputs, labels in batches:
        rows = inputs["color"][:, 0].long()  # feature 0 is the sample's own index
        assert torch.equal(labels, dataset.labels[rows])
        assert torch.equal(inputs["text"], dataset.inputs["text"][rows])
        seen += rows.tolist()
    assert sorted(seen) == indices.tolist()
    assert seen != indices.tolist()  # shuffled


def test_iterate_batches_is_deterministic_under_a_seeded_generator() -> None:
    dataset = small_dataset(40)
    indices = torch.arange(40)

    def epoch(generator: torch.Generator) -> list[int]:
        return [i for inputs, _ in iterate_batches(dataset, indices, 8, shuffle=True, generator=generator)
                for i in inputs["color"][:, 0].long().tolist()]

    assert epoch(torch.Generator().manual_seed(3)) == epoch(torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    assert epoch(generator) != epoch(generator)  # the generator advances: each epoch its own order
    in_order = [i for inputs, _ in iterate_batches(dataset, indices, 8, shuffle=False)
                for i in inputs["color"][:, 0].long().tolist()]
    assert in_order == list(range(40))


def test_drop_last_skips_the_partial_batch() -> None:
    dataset = small_dataset(23)
    sizes = [len(y) for _, y in iterate_batches(dataset, torch.arange(23), 5, shuffle=False, drop_last=True)]
    assert sizes == [5, 5, 5, 5] and num_batches(23, 5, drop_last=True) == 4
    assert num_batches(23, 5) == 5 and num_batches(20, 5) == 4 and num_batches(0, 5) == 0
    assert list(iterate_batches(dataset, torch.arange(3), 5, shuffle=False, drop_last=True)) == []


# --- tensor files ---------------------------------------------------------------------------------


def test_tensor_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "mine.safetensors"
    inputs = {
        "audio": torch.randn(30, 6, 4),
        "image": torch.rand(30, 1, 5, 5),
        "text": torch.randint(0, 259, (30, 8)),
    }
    labels, groups = torch.arange(30) % 3, torch.arange(30) // 5
    split = (torch.arange(30) % 3).to(torch.uint8)
    save_tensor_file(path, inputs, labels, ("low", "mid", "high"), split=split, groups=groups)
    dataset = load_dataset(str(path))
    assert dataset.name == str(path) and dataset.classes == ("low", "mid", "high")
    assert dataset.inputs.keys() == inputs.keys()
    for key, tensor in inputs.items():
        assert torch.equal(dataset.inputs[key], tensor) and dataset.inputs[key].dtype == tensor.dtype
    assert torch.equal(dataset.labels, labels) and torch.equal(dataset.split, split)
    assert torch.equal(dataset.groups, groups)
    assert dataset.input_shapes() == {"audio": (6, 4), "image": (1, 5, 5), "text": (8,)}


def test_tensor_file_without_split_gets_a_seeded_stratified_80_10_10_split(tmp_path: Path) -> None:
    path = tmp_path / "nosplit.safetensors"
    labels = torch.cat([torch.zeros(50), torch.ones(30), torch.full((20,), 2)]).long()
    save_tensor_file(path, {"color": torch.randn(100, 7)}, labels, ("a", "b", "c"))
    dataset = read_tensor_file(path)
    assert dataset.groups is None
    for split, per_class in (("train", [40, 24, 16]), ("val", [5, 3, 2]), ("test", [5, 3, 2])):
        assert torch.bincount(dataset.labels[dataset.indices(split)], minlength=3).tolist() == per_class
    assert torch.equal(read_tensor_file(path).split, dataset.split)  # the same split every time
    assert torch.equal(load_dataset(str(path), seed=5).split, dataset.split)  # whatever the run's seed


def test_tensor_file_without_classes_names_them_by_number(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"color": torch.randn(10, 3), "label": torch.arange(10) % 4}, str(path))
    assert read_tensor_file(path).classes == ("0", "1", "2", "3")


def write_raw(path: Path, tensors: dict[str, torch.Tensor], classes=("a", "b")) -> str:
    save_file(tensors, str(path), metadata={"classes": json.dumps(list(classes))})
    return str(path)


@pytest.mark.parametrize(
    ("tensors", "problem"),
    [
        ({"color": torch.randn(4, 3)}, "no 'label' tensor"),
        ({"color": torch.randn(4, 3), "label": torch.tensor([0, 1, 0])}, "different numbers of samples"),
        ({"color": torch.randn(4, 3), "label": torch.tensor([0, 1, 2, 0])}, "outside 0..1"),
        ({"color": torch.randn(4, 3), "label": torch.tensor([0.0, 1.0, 0.0, 1.0])}, "must hold integers"),
        ({"color": torch.randn(4, 3), "label": torch.tensor([0, 1, 0, 1]),
          "split": torch.tensor([0, 1, 3, 0], dtype=torch.uint8)}, "'split' values"),
        ({"label": torch.tensor([0, 1, 0, 1])}, "no input tensors"),
    ],
)
def test_bad_tensor_files_name_the_file_and_the_problem(tmp_path: Path, tensors, problem: str) -> None:
    path = write_raw(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(MmkitError, match=problem) as error:
        load_dataset(path)
    assert path in str(error.value)


def test_bad_classes_metadata_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "classes.safetensors"
    tensors = {"color": torch.randn(2, 3), "label": torch.tensor([0, 1])}
    save_file(tensors, str(path), metadata={"classes": "[a, b"})
    with pytest.raises(MmkitError, match="not valid JSON") as error:
        read_tensor_file(path)
    assert str(path) in str(error.value)


def test_missing_data_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.safetensors")
    with pytest.raises(MmkitError) as error:
        load_dataset(path)
    assert str(error.value) == f"data file not found: {path}"


def test_a_file_that_is_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("label,color\n0,1.0\n")
    with pytest.raises(MmkitError, match="not a readable safetensors file") as error:
        load_dataset(str(path))
    assert str(path) in str(error.value)


def test_save_refuses_reserved_input_names_and_shares_no_memory(tmp_path: Path) -> None:
    with pytest.raises(MmkitError, match="reserved"):
        save_tensor_file(tmp_path / "x.sft", {"label": torch.zeros(2, 1)}, torch.tensor([0, 1]), ("a", "b"))
    joint = torch.randn(2, 5, 8)
    path = tmp_path / "views.safetensors"  # two inputs that are views of one tensor still save
    save_tensor_file(path, {"color": joint[0], "brightness": joint[1]}, torch.zeros(5).long(), ("a",))
    assert torch.equal(read_tensor_file(path).inputs["brightness"], joint[1])
