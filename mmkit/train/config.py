"""The resolved configuration of a run: everything `resume` and `eval` need, saved as run.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mmkit import __version__
from mmkit.atomic import write_json_atomic
from mmkit.data.datasets import relocated_data_spec
from mmkit.errors import MmkitError, validation_message
from mmkit.models.registry import ModelConfig, ModelEntry, get_model_entry
from mmkit.settings import TrainingRecipe
from mmkit.train.rundir import RUN_FILE



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
    notes: list[str] = []
    mmkit_version: str = __version__
    torch_version: str = torch.__version__

    @property
    def entry(self) -> ModelEntry:
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
        try:
            config = cls.model_validate(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise MmkitError(f"{path}: invalid JSON: {exc}") from None
        except ValidationError as exc:
            raise MmkitError(validation_message(path, exc)) from None
        config.check_model_source(allow_changed=allow_changed_model)
        return config.with_data_found(run_dir)

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

