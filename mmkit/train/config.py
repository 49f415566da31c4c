"""The resolved configuration of a run: everything `resume` and `eval` need, saved as run.json.

`mmkit resume RUN --set KEY=V` may change the training settings of `RESUME_KEYS` (and no other);
each change is recorded in run.json's `resume_overrides`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from mmkit import __version__
from mmkit.atomic import write_json_atomic
from mmkit.data.datasets import relocated_data_spec
from mmkit.errors import MmkitError, first_error, validation_message
from mmkit.models.registry import ModelConfig, ModelEntry, get_model_entry
from mmkit.settings import TrainingRecipe
from mmkit.train.rundir import RESUME_KEYS, RUN_FILE


class ResumeOverride(BaseModel):
    """One `resume --set KEY=V`, as run.json records it."""

    model_config = ConfigDict(extra="forbid")

    key: str
    old: Any
    new: Any
    at_step: int | None = None  # the step training went on from (None until that resume has loaded it)


class RunConfig(BaseModel):
    """One serializable object from which a run is rebuilt (litgpt-style)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    size: str  # resolved: a named size or wN, never "auto"
    model_settings: dict[str, Any]  # the full model config, data-derived widths included
    preset: str
    training: TrainingRecipe  # resolved: batch_size is an int, size is the resolved size
    data: str
    data_seed: int = 0  # built-in data are generated from this seed (kept apart from the training seed)
    device: str  # cpu, cuda, cuda:1
    precision: str  # what actually runs on the device (fp16 only on CUDA)
    fit: dict[str, Any] | None = None  # what `auto` chose and for which GPU
    precision_probe: dict[str, Any] | None = None  # the CPU's measured bf16 speed-up that chose `precision`
    model_source: dict[str, Any] | None = None  # a model spec's origin: a file's path and sha256, a module
    weights: dict[str, Any] | None = None  # `train --weights`: the safetensors the run started from
    notes: list[str] = []
    log: list[str] = []  # `train --log`: the loggers the run writes to (mmkit.train.loggers), resume included
    resume_overrides: list[ResumeOverride] = []  # what `resume --set` changed, oldest first
    mmkit_version: str = __version__
    torch_version: str = torch.__version__
    _source_sha256: str | None = PrivateAttr(default=None)  # of run.json's bytes, when loaded from it

    @property
    def source_sha256(self) -> str | None:
        """The sha256 of the run.json bytes this config was loaded from (None: not loaded from a file)."""
        return self._source_sha256

    @property
    def entry(self) -> ModelEntry:
        if (self.model_source or {}).get("kind") == "hf":  # run.json holds the whole config: nothing to read
            from mmkit.models.hf import HFConfig, hf_entry

            return hf_entry(self.model, HFConfig.model_validate(self.model_settings), self.model_source)
        return get_model_entry(self.model)

    def model_config_object(self) -> ModelConfig:
        return self.entry.config_class.model_validate(self.model_settings)

    def save(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / RUN_FILE, self.model_dump(mode="json"))

    @classmethod
    def load(cls, run_dir: Path, *, allow_changed_model: bool = False) -> RunConfig:
        """run.json, validated; a model file that changed since the run was written is refused
        (unless `allow_changed_model`), one that is gone says where it was expected."""
        path = run_dir / RUN_FILE
        if not run_dir.is_dir():
            raise MmkitError(f"run directory not found: {run_dir}")
        if not path.is_file():
            raise MmkitError(f"{run_dir} is not an mmkit run: {RUN_FILE} is missing")
        data = path.read_bytes()
        try:
            config = cls.model_validate(json.loads(data))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MmkitError(f"{path}: invalid JSON: {exc}") from None
        except ValidationError as exc:
            raise MmkitError(validation_message(path, exc)) from None
        config._source_sha256 = hashlib.sha256(data).hexdigest()
        config.check_model_source(allow_changed=allow_changed_model)
        return config.with_data_found(run_dir)

    def with_resume_overrides(self, overrides: Mapping[str, Any], epochs_flag: int | None = None) -> RunConfig:
        """This config with `resume --set` `overrides` applied and recorded (`resume_overrides`,
        `at_step` left for the resume to fill in), and `--epochs` (`epochs_flag`) applied.

        Refuses, in one line: a key not in `RESUME_KEYS`, a value the setting does not take, epochs
        given both ways or below the run's, and any epochs for a continual run (its length is
        tasks × epochs_per_task)."""
        refused = next((key for key in overrides if key not in RESUME_KEYS), None)
        if refused is not None:
            raise MmkitError(f"--set {refused}: resume can change only {', '.join(RESUME_KEYS)}; the run's other "
                             f"settings are fixed by its checkpoints (train a new run to change them)")
        if epochs_flag is not None and "epochs" in overrides:
            raise MmkitError("epochs is given twice, as --epochs and as --set epochs=...; keep one")
        recipe = self.training
        given = dict(overrides) | ({"epochs": epochs_flag} if epochs_flag is not None else {})
        if "epochs" in given and recipe.tasks:
            raise MmkitError(f"a continual run trains tasks × epochs_per_task epochs ({recipe.tasks} × "
                             f"{recipe.epochs_per_task}); its length cannot change on resume")
        try:
            training = TrainingRecipe.model_validate(recipe.model_dump() | given)
        except ValidationError as exc:
            field, message = first_error(exc)
            source = "--epochs" if epochs_flag is not None and field == "epochs" else f"--set {field}={given.get(field)}"
            raise MmkitError(f"{source}: {message}") from None
        if training.epochs < recipe.epochs:
            source = f"--epochs {epochs_flag}" if epochs_flag is not None else f"--set epochs={training.epochs}"
            raise MmkitError(f"{source} is below the run's {recipe.epochs} epochs")
        changes = [ResumeOverride(key=key, old=getattr(recipe, key), new=getattr(training, key))
                   for key in overrides if getattr(recipe, key) != getattr(training, key)]
        return self.model_copy(update={"training": training, "resume_overrides": [*self.resume_overrides, *changes]})

    def pending_overrides(self) -> list[ResumeOverride]:
        """The `resume --set` changes the running resume has made (their `at_step` still unknown)."""
        return [override for override in self.resume_overrides if override.at_step is None]

    def check_model_source(self, *, allow_changed: bool = False) -> None:
        """The run's model file is where it was and as it was (its sha256), before any of it runs."""
        source = self.model_source or {}
        if source.get("kind") != "file":
            return
        model_file = Path(source["path"])
        if not model_file.is_file():
            raise MmkitError(f"the run's model file is missing: expected {model_file} (model {self.model!r})")
        from mmkit.models.spec import file_sha256

        now = file_sha256(model_file)
        if now == source.get("sha256"):
            return
        if not allow_changed:
            raise MmkitError(f"the run's model file {model_file} changed since the run was written (sha256 "
                             f"{str(source.get('sha256'))[:12]}… → {now[:12]}…); restore it, or pass "
                             "--allow-changed-model to use it as it is now")
        print(f"mmkit: warning: the run's model file {model_file} changed since the run was written; using it as "
              "it is now (--allow-changed-model)", file=sys.stderr)

    def with_data_found(self, run_dir: Path) -> RunConfig:
        """A relative data path (recorded by mmkit 0.1.0) that is not found from the working
        directory is looked up above the run directory, with a warning."""
        found = relocated_data_spec(self.data, run_dir)
        if found is None:
            return self
        print(f"mmkit: warning: {run_dir}/{RUN_FILE} records the relative data path {self.data!r}, not found "
              f"from here; using {found}", file=sys.stderr)
        return self.model_copy(update={"data": found})

