"""Hugging Face transformers models as mmkit models: `hf:SPEC` wherever a model name goes.

    hf:clip, hf:vit, ...      a model type with its default config (transformers' `CONFIG_MAPPING`;
                              a bare name is a model type before it is a directory: ./vit is hf:./vit)
    hf:path/to/dir            a directory with config.json, as `save_pretrained` writes it
    hf:path/to/config.json    the config file itself
    hf:owner/name             a Hub id (when no such local path exists): only its config.json is
                              fetched (huggingface_hub, or its cache); never weights

The model is built with `AutoModelFor<task>.from_config` on the device in effect (callers put the
meta device in effect to count and simulate), never from weights: weights are `--weights`
(`load_weights`, safetensors only). What rebuilds it is `HFConfig`, a plain factory's config that
also holds the whole transformers config dict, the task, the sequence length and which data tensor
feeds which of the library's arguments; run.json records it, so `resume` and `eval` rebuild the
model without the directory, the Hub or the network.

Inputs are named as the library names them (`pixel_values`, `input_values`, `input_features`,
`input_ids`, `attention_mask`); tensors of a data file or a built-in dataset are matched to them by
`DATA_NAMES`, the one table of that mapping. transformers is imported only here, and only when an
`hf:` spec is resolved, so `mmkit --help` never imports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmkit.errors import MmkitError
from mmkit.models.base import ModelEntry
from mmkit.models.catalog import HF_SETTING_KEYS, check_hf_installed
from mmkit.models.module import (
    FactoryConfig,
    InputDecl,
    ModuleModel,
    UserModelError,
    logits_width,
    user_error,
)
from mmkit.models.spec import FactoryBuilder

TASKS = ("image-classification", "audio-classification", "sequence-classification", "contrastive")
# the library's argument → the data tensor names that feed it, when the data does not use its name
DATA_NAMES: dict[str, tuple[str, ...]] = {
    "pixel_values": ("image",),
    "input_values": ("audio",),
    "input_features": ("audio",),
    "input_ids": ("text",),
    "attention_mask": ("text_mask",),
    "token_type_ids": (),
}
OPTIONAL_ARGS = {  # fed when the data has them (no attention_mask: every token is attended to)
    "sequence-classification": ("attention_mask", "token_type_ids"),
    "contrastive": ("attention_mask",),
}
# drawn at random in each training step, and shaping it: LayerDrop skips whole layers, SpecAugment
# (wav2vec2, HuBERT, WavLM) overwrites a random set of frames by boolean indexing; switched off (these
# values) when the model is built on the meta device (`build_module`)
RANDOM_STRUCTURE = {"layerdrop": 0.0, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
                    "apply_spec_augment": False}
DEFAULT_AUDIO_SAMPLES = 16_000  # raw-waveform models (wav2vec2, HuBERT, WavLM): one second at 16 kHz


def transformers_module() -> Any:
    """transformers, imported (its logging quietened to errors), or one line saying what to install."""
    try:
        import huggingface_hub
        import transformers
    except ImportError:
        check_hf_installed("hf:")  # names the missing package
        raise
    transformers.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # a failed request is our one line, not its warning
    return transformers


# --------------------------------------------------------------------------------------------------
# The config that rebuilds a model


class HFConfig(FactoryConfig):
    """A transformers model, serializable: its config dict, the task's head and its inputs.

    `hf` is `PretrainedConfig.to_dict()` (nested configs included); the head is `num_classes` wide,
    the data's classes (else the config's own labels, `label_count`). `inputs` are
    keyed by the data's tensor names; `feed` maps a tensor name to the library's argument when they
    differ (`image` → `pixel_values`)."""

    hf: dict[str, Any]
    task: str
    seq_len: int | None = None
    feed: dict[str, str] = {}

    def with_kwargs(self, overrides: Mapping[str, Any]) -> HFConfig:
        """`--set model.KEY=V`: `task`, `seq_len`, or a key of the transformers config (dotted for a
        nested one: `vision_config.image_size`)."""
        update: dict[str, Any] = {}
        hf = json.loads(json.dumps(self.hf))
        for key, value in overrides.items():
            if key == "task":
                update["task"] = check_task(str(value))
            elif key == "seq_len":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise MmkitError(f"invalid model setting 'seq_len': expected a positive integer, got {value!r}")
                update["seq_len"] = value
            elif key in ("num_labels", "id2label", "label2id"):
                raise MmkitError(f"model setting {key!r}: the head's classes are the data's (num_labels follows "
                                 "them); without data the config's own labels are used")
            else:
                _set_nested(hf, key, value, self.hf.get("model_type", "?"))
        if overrides.keys() - {"task", "seq_len"}:
            update["hf"] = hf
        return self.model_copy(update=update) if update else self

    def label_count(self) -> int:
        """The classes of the config's own head (`id2label`; transformers' default is 2)."""
        labels = self.hf.get("id2label")
        return len(labels) if labels else int(self.hf.get("num_labels") or 2)

    def check_trainable(self, spec: str) -> None:
        """Training needs class logits: a dual encoder's contrastive task is planned, not trained."""
        if self.task == "contrastive":
            raise MmkitError(f"model {spec!r}: task contrastive is planned (count, memory-plan) but not trained "
                             "(training needs class logits); fine-tune its image tower with "
                             "--set model.task=image-classification")


def _set_nested(hf: dict[str, Any], key: str, value: Any, model_type: str) -> None:
    node = hf
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise MmkitError(f"unknown model setting {key!r}: the {model_type} config has no {part!r} section")
        node = node[part]
    if leaf not in node:
        known = sorted(k for k, v in node.items() if not k.startswith("_") and not isinstance(v, dict))
        shown = ", ".join(known[:12]) + (", …" if len(known) > 12 else "")
        raise MmkitError(f"unknown model setting {key!r}; valid: {', '.join(HF_SETTING_KEYS)}, or a key of the "
                         f"{model_type} config: {shown}")
    node[leaf] = value


def check_task(task: str) -> str:
    if task not in TASKS:
        raise MmkitError(f"unknown task {task!r} for an hf: model; valid: {', '.join(TASKS)}")
    return task


# --------------------------------------------------------------------------------------------------
# Resolving a spec


def resolve_hf_spec(spec: str) -> ModelEntry:
    """The entry of `hf:SPEC`: the config read (a directory, a config.json, a model type's default,
    or a Hub id's config.json), its default task settled."""
    target = spec.removeprefix("hf:").strip()
    if not target:
        raise MmkitError("model spec 'hf:': expected hf:DIRECTORY, hf:CONFIG.json, hf:MODEL_TYPE (e.g. hf:vit) or "
                         "hf:OWNER/NAME (a Hub id)")
    transformers = transformers_module()
    path = Path(target).expanduser()
    if target in transformers.CONFIG_MAPPING and "/" not in target:  # a bare name is a model type first
        config = transformers.CONFIG_MAPPING[target]()
        canonical, source = spec, {"kind": "hf", "config": "model type default", "model_type": target}
    elif path.exists() or target.startswith((".", "/", "~")) or target.endswith(".json"):
        config, canonical, source = _local_config(spec, path)
    else:
        config, canonical, source = _hub_config(spec, target)
    hf = config.to_dict()
    task = default_task(config)
    base = HFConfig(hf=_portable(hf), task=task)
    return hf_entry(canonical, base, source)


def hf_entry(name: str, config: HFConfig, source: Mapping[str, Any] | None = None) -> ModelEntry:
    """The entry of an hf: model whose config is known (a run's run.json holds it: no file read)."""
    return ModelEntry(
        name=name, build=HFBuilder(name, build_module), sizes={"default": config}, default_size="default",
        ladder=(), default_data="", description=f"Hugging Face {config.hf.get('model_type', '?')} ({config.task})",
        source=dict(source) if source else {"kind": "hf"},
    )


def _local_config(spec: str, path: Path) -> tuple[Any, str, dict[str, Any]]:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no config.json" if path.is_dir() else f"{path} not found"
        raise MmkitError(f"model {spec!r}: {where} (an hf: directory is what save_pretrained writes)")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MmkitError(f"model {spec!r}: {file} is not JSON: {exc}") from None
    config = _config_from_dict(spec, data, str(file))
    resolved = path.resolve()
    return config, f"hf:{resolved}", {"kind": "hf", "config": str(file.resolve())}


def _hub_config(spec: str, repo_id: str) -> tuple[Any, str, dict[str, Any]]:
    """config.json of a Hub repository: from huggingface_hub's cache, else downloaded (that file alone)."""
    if repo_id.count("/") > 1 or any(c.isspace() for c in repo_id):
        raise MmkitError(f"model {spec!r}: {repo_id!r} is not a directory, a config.json, a model type or a Hub id "
                         "(OWNER/NAME)")
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        file = hf_hub_download(repo_id, "config.json")
    except Exception as exc:  # offline, no network, no such repository, gated: said in one line
        tried = "not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline else _hub_failure(exc)
        raise MmkitError(f"model {spec!r}: tried to read config.json of Hub repository {repo_id!r} (the config alone, "
                         f"no weights): {tried}; give a local directory (hf:path/to/dir) or a model type "
                         f"(hf:vit)") from None
    data = json.loads(Path(file).read_text())
    return _config_from_dict(spec, data, repo_id), spec, {"kind": "hf", "config": f"hub:{repo_id}/config.json"}


def _hub_failure(exc: Exception) -> str:
    """Why huggingface_hub could not give a config.json, by its exception's kind."""
    kind = type(exc).__name__
    reasons = {
        "LocalEntryNotFoundError": "not in the Hugging Face cache, and the Hub could not be reached",
        "RepositoryNotFoundError": "the Hub has no such repository (or it is private: huggingface-cli login)",
        "GatedRepoError": "the repository is gated: accept its terms on the Hub, then huggingface-cli login",
        "EntryNotFoundError": "the repository has no config.json",
        "RemoteEntryNotFoundError": "the repository has no config.json",
    }
    if kind in reasons:
        return reasons[kind]
    message = " ".join(str(exc).split())
    return f"not in the Hugging Face cache, and fetching it failed ({kind}: {message[:160]})"


def _config_from_dict(spec: str, data: Mapping[str, Any], where: str) -> Any:
    transformers = transformers_module()
    model_type = data.get("model_type")
    if not model_type:
        raise MmkitError(f"model {spec!r}: {where} has no model_type (is it a transformers config.json?)")
    if model_type not in transformers.CONFIG_MAPPING:
        raise MmkitError(f"model {spec!r}: model type {model_type!r} is not known to transformers "
                         f"{transformers.__version__}")
    try:
        return transformers.CONFIG_MAPPING[model_type].from_dict(dict(data))
    except Exception as exc:
        raise user_error(spec, "reading the config", exc) from exc


def _portable(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The config dict as JSON holds it (run.json)."""
    return json.loads(json.dumps(hf, default=str))


def transformers_config(config: HFConfig) -> Any:
    """The transformers config of `config`, its head `num_classes` wide (labels renamed when the
    width differs from the config's own)."""
    transformers = transformers_module()
    data = dict(config.hf)
    data.pop("num_labels", None)
    labels = config.num_classes
    if labels is not None and labels != config.label_count():
        data["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        data["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    return transformers.CONFIG_MAPPING[data["model_type"]].from_dict(data)


def default_task(config: Any) -> str:
    """The task of a config's `architectures` (CLIPModel → contrastive, ViTForImageClassification →
    image-classification), else the first the model type has a head for."""
    architectures = getattr(config, "architectures", None) or []
    for architecture in architectures:
        for task in TASKS:
            if architecture in _task_classes(task, config.model_type):
                return task
    for task in ("contrastive", *TASKS[:-1]):  # a dual encoder is its two towers, not one of them
        if _task_classes(task, config.model_type):
            return task
    raise MmkitError(f"model type {config.model_type!r} has no head mmkit trains ({', '.join(TASKS)}); "
                     "give it as a module factory instead")


def _task_classes(task: str, model_type: str) -> tuple[str, ...]:
    """The class names transformers builds for `task` from a `model_type` config (empty: none)."""
    from transformers.models.auto import modeling_auto as auto

    if task == "contrastive":
        name = auto.MODEL_MAPPING_NAMES.get(model_type)
        dual = model_type in getattr(auto, "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES", {})
        return (name,) if name and dual else ()
    table = {
        "image-classification": auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        "audio-classification": auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
        "sequence-classification": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    }[task]
    found = table.get(model_type)
    return tuple(found) if isinstance(found, (list, tuple)) else ((found,) if found else ())


def model_class(config: HFConfig) -> type[nn.Module]:
    transformers = transformers_module()
    names = _task_classes(config.task, config.hf["model_type"])
    if not names:
        tasks = [t for t in TASKS if _task_classes(t, config.hf["model_type"])]
        raise MmkitError(f"hf: model type {config.hf['model_type']!r} has no {config.task} head in transformers "
                         f"{transformers.__version__}; its tasks: {', '.join(tasks) or 'none mmkit trains'}")
    return getattr(transformers, names[0])


def build_module(config: HFConfig) -> nn.Module:
    """The transformers model of `config`, from its config alone, on the device in effect.

    On the meta device (count, memory-plan), what a training step draws at random and shapes itself
    by is off (`RANDOM_STRUCTURE`): a shape-only tensor has no value to draw, and boolean indexing
    has no shape without one. LayerDrop off is the step that skips no layer, the largest; SpecAugment
    off leaves out its mask and indices (392 B at batch 8 for wav2vec2-base: docs/hf-models.md)."""
    cls = model_class(config)
    meta = torch.empty(0).device.type == "meta"
    drawn = {key: off for key, off in RANDOM_STRUCTURE.items() if config.hf.get(key)}
    if meta and drawn:
        config = config.model_copy(update={"hf": {**config.hf, **drawn}})
    hf_config = transformers_config(config)
    try:
        module = cls._from_config(hf_config)
    except MmkitError:
        raise
    except Exception as exc:
        raise user_error(f"hf:{config.hf.get('model_type')}", f"building {cls.__name__}", exc) from exc
    if meta:  # a legacy `torch.Tensor(n)` ignores the device in effect
        module = module.to("meta")
    return module


@dataclass(frozen=True)
class HFBuilder(FactoryBuilder):
    """An hf: model's builder: `config` → the transformers model, wrapped (`HFModel`)."""

    def __call__(self, config: FactoryConfig) -> HFModel:
        assert isinstance(config, HFConfig)
        return HFModel(config, build_module(config), self.spec)

    def complete_config(self, entry: ModelEntry, config: FactoryConfig, **given: Any) -> HFConfig:
        assert isinstance(config, HFConfig)
        return complete_hf_config(entry, config, **given)


@dataclass
class ContrastiveOutput:
    """An image-text model's output: `logits` are each image's scores over the batch's texts [B, B]."""

    logits: torch.Tensor
    logits_per_text: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


class HFModel(ModuleModel):
    """A transformers model with mmkit's model contract: the data's tensors are passed under the
    library's argument names (`feed`); a dual encoder's output is its image-text logits."""

    config: HFConfig

    def forward(self, **inputs: torch.Tensor) -> Any:
        feed = self.config.feed
        arguments = {feed.get(name, name): inputs[name] for name in self.config.inputs}
        try:
            output = self.net(**arguments, return_dict=True)
        except (MmkitError, torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise user_error(self.spec, "forward", exc) from exc
        if self.config.task == "contrastive":
            return ContrastiveOutput(output.logits_per_image, output.logits_per_text, output.image_embeds,
                                     output.text_embeds)
        return output

    def checkpoint_name(self, name: str) -> str:
        """A checkpoint tensor's name as this model names it (`train --weights`): the library's own
        renamings of older checkpoints (transformers 5 renamed many modules and reads the old names
        on load), and its base-model prefix added or removed."""
        if self._renamer is None:
            self._renamer = _checkpoint_renamer(self.net)
        return self._renamer(name)

    _renamer: Any = None


def _checkpoint_renamer(net: nn.Module) -> Any:
    own = net.state_dict()
    prefix = getattr(net, "base_model_prefix", "") or ""
    try:  # transformers 5
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers 4: a checkpoint's names are the model's, up to the prefix
        def with_prefix(name: str) -> str:
            if name in own or not prefix:
                return name
            if name.startswith(prefix + ".") and name[len(prefix) + 1:] in own:
                return name[len(prefix) + 1:]
            return f"{prefix}.{name}" if f"{prefix}.{name}" in own else name
        return with_prefix
    renamings = [t for t in get_model_conversion_mapping(net) if not isinstance(t, WeightConverter)]
    # tensors a converter would merge or split are left unmatched (reported as missing / unexpected)
    return lambda name: rename_source_key(name, renamings, [], prefix or None, own)[0]


# --------------------------------------------------------------------------------------------------
# Inputs and classes


def library_inputs(config: HFConfig) -> dict[str, InputDecl]:
    """The arguments the task's model takes, with per-sample shapes from the config (and `seq_len`)."""
    hf = config.hf
    cls = model_class(config)
    decls: dict[str, InputDecl] = {}
    if config.task in ("image-classification", "contrastive"):
        vision = hf.get("vision_config") or hf
        size = vision.get("image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        decls["pixel_values"] = InputDecl(shape=(int(vision.get("num_channels", 3)), int(height), int(width)))
    if config.task in ("sequence-classification", "contrastive"):
        text = hf.get("text_config") or hf
        length = config.seq_len or int(text.get("max_position_embeddings") or 512)
        decls["input_ids"] = InputDecl(shape=(length,), dtype="int64", high=int(text.get("vocab_size") or 2))
    if config.task == "audio-classification":
        name = getattr(cls, "main_input_name", "input_values")
        if name == "input_features":  # Whisper-style log-mel features [mels, frames]
            frames = config.seq_len or 2 * int(hf.get("max_source_positions") or 1500)
            decls[name] = InputDecl(shape=(int(hf.get("num_mel_bins") or 80), frames))
        elif "num_mel_bins" in hf and "max_length" in hf:  # spectrogram transformers (AST): [frames, mels]
            decls[name] = InputDecl(shape=(config.seq_len or int(hf["max_length"]), int(hf["num_mel_bins"])))
        else:  # a raw waveform
            decls[name] = InputDecl(shape=(config.seq_len or DEFAULT_AUDIO_SAMPLES,))
    return decls


def match_inputs(spec: str, task: str, wanted: Mapping[str, InputDecl],
                 available: Mapping[str, InputDecl], where: str) -> tuple[dict[str, InputDecl], dict[str, str]]:
    """The tensors of `available` (the data's, or `--input`) that feed the library's arguments
    `wanted`, by the library's name or the `DATA_NAMES` table: (inputs by tensor name, feed)."""
    inputs: dict[str, InputDecl] = {}
    feed: dict[str, str] = {}
    optional = [a for a in OPTIONAL_ARGS.get(task, ()) if a not in wanted]
    for argument in [*wanted, *optional]:
        found = next((n for n in (argument, *DATA_NAMES.get(argument, ())) if n in available), None)
        if found is None:
            if argument in wanted:
                names = " or ".join(repr(n) for n in (argument, *DATA_NAMES.get(argument, ())))
                raise MmkitError(f"model {spec!r} ({task}) takes {argument}: {where} has no tensor named {names} "
                                 f"(it has {', '.join(sorted(available)) or 'none'})")
            continue
        inputs[found] = available[found]
        if found != argument:
            feed[found] = argument
    return inputs, feed


def complete_hf_config(
    entry: ModelEntry, config: HFConfig, *, inputs: Mapping[str, InputDecl] | None = None,
    data_inputs: Mapping[str, InputDecl] | None = None, num_classes: int | None = None, need_logits: bool = True,
) -> HFConfig:
    """`config` with its inputs and classes settled: the library's arguments sized by the config
    (or `seq_len`), replaced by `--input` where given, fed from the data's tensors when there is
    data; the head as wide as the data's classes. One forward on the meta device checks it all."""
    spec = entry.name
    check_task(config.task)
    wanted = library_inputs(config)
    if inputs:
        given, feed = match_inputs(spec, config.task, wanted, inputs, "--input")
        decls = {name: given[name] for name in given}
    elif data_inputs:
        decls, feed = match_inputs(spec, config.task, wanted, data_inputs, "the data")
    else:
        decls, feed = wanted, {}
    contrastive = config.task == "contrastive"
    labels = None if contrastive else (num_classes or config.num_classes or config.label_count())
    config = config.model_copy(update={"inputs": decls, "feed": feed, "num_classes": labels})
    with torch.device("meta"):
        model = HFBuilder(spec, build_module)(config)
    try:
        with torch.no_grad():
            output = model(**model.example_inputs(2, device="meta"))
    except UserModelError as exc:
        shapes = ", ".join(f"{feed.get(n, n)} {list(d.shape)} {d.dtype}" for n, d in decls.items())
        raise UserModelError(f"{exc} (on inputs {shapes})") from exc.__cause__
    if contrastive:  # the step's targets are each image's own text: as many "classes" as the batch
        return config.model_copy(update={"num_classes": 1})
    width = logits_width(spec, output)
    if need_logits and num_classes is not None and width != num_classes:
        raise MmkitError(f"model {spec!r} predicts {width} classes, the data has {num_classes}")
    return config.model_copy(update={"num_classes": width})


