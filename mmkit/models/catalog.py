"""What the command line knows of the models before it loads torch or any family: the built-in
names, the families installed packages offer, the form of a model spec, and how `--set` and
`--input` values read.

`mmkit count nosuch` (or `train`, `memory-plan`) is answered from here in a few milliseconds
instead of after the second or two that importing torch and the families takes. The registry
stays the authority; tests/test_startup.py keeps BUILTIN_MODELS equal to what it registers.
"""

from __future__ import annotations

import json
from typing import Any

from mmkit.errors import MmkitError, unknown_choice

BUILTIN_MODELS = ("clip", "fusion", "lfm2", "multichannel", "separate")


ENTRY_POINT_GROUP = "mmkit.models"  # installed packages register families under this group
SPEC_FORMS = "NAME, package.module:factory, path/to/file.py:factory or hf:SPEC"
HF_INSTALL = "pip install 'mmkit-cli[hf]'"
HF_SETTING_KEYS = ("task", "seq_len")  # an hf: model's own settings, also taken without `model.`
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "uint8")


def entry_point_models() -> list[str]:
    """Names of the families installed packages offer (their code is not imported here)."""
    from importlib.metadata import entry_points

    return sorted({point.name for point in entry_points(group=ENTRY_POINT_GROUP)})


def split_spec(spec: str) -> tuple[str, str, bool]:
    """`package.module:factory` or `path/to/file.py:factory` → (module or path, attribute, is a file)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise MmkitError(f"model spec {spec!r}: expected {SPEC_FORMS}")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if not is_file and not all(part.isidentifier() for part in target.split(".")):
        raise MmkitError(f"model spec {spec!r}: {target!r} is neither a module name nor a .py file")
    return target, attr, is_file


def check_model_name(name: str) -> None:
    """The registry's unknown-model error (same line, same exit code), without loading the registry:
    a spec's form is checked, a plain name must be built in or offered by an installed package."""
    if is_hf_spec(name):
        check_hf_installed(name)
    elif ":" in name:
        split_spec(name)
    elif name not in BUILTIN_MODELS and name not in entry_point_models():
        error = unknown_choice("model", name, [*BUILTIN_MODELS, *entry_point_models()])
        raise MmkitError(f"{error} (or a spec: {SPEC_FORMS})")


def is_hf_spec(name: str) -> bool:
    """`hf:SPEC`: a Hugging Face transformers model (mmkit.models.hf)."""
    return name.startswith("hf:")


def check_hf_installed(spec: str) -> None:
    """One line saying what to install when transformers or huggingface_hub is missing (found
    without importing them)."""
    import importlib.util
    import sys

    for package in ("transformers", "huggingface_hub"):
        if package in sys.modules:
            present = sys.modules[package] is not None
        else:
            try:
                present = importlib.util.find_spec(package) is not None
            except (ImportError, ValueError):
                present = False
        if not present:
            raise MmkitError(f"model {spec!r}: hf: models need transformers and huggingface_hub ({package} is not "
                             f"installed): {HF_INSTALL}")


def parse_input_option(text: str) -> tuple[str, dict[str, Any]]:
    """`--input NAME=D1xD2x...[:dtype[:high]]` → (name, {"shape", "dtype", "high"}), e.g.
    `text=77:int64:49408` → ("text", {"shape": [77], "dtype": "int64", "high": 49408})."""
    usage = "expected NAME=D1xD2x...[:dtype[:high]], e.g. audio=300x80 or text=77:int64:49408"
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise MmkitError(f"--input {text!r}: {usage}")
    dims, *extra = rest.strip().split(":")
    if len(extra) > 2:
        raise MmkitError(f"--input {text!r}: {usage}")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        raise MmkitError(f"--input {text!r}: the shape {dims!r} is not dimensions joined by x; {usage}") from None
    if any(d < 1 for d in shape):
        raise MmkitError(f"--input {text!r}: every dimension must be at least 1")
    dtype = extra[0] if extra else "float32"
    if dtype not in INPUT_DTYPES:
        raise MmkitError(f"--input {text!r}: unknown dtype {dtype!r}; valid: {', '.join(INPUT_DTYPES)}")
    integer = not dtype.startswith(("float", "bfloat"))
    high = None
    if len(extra) == 2:
        if not integer:
            raise MmkitError(f"--input {text!r}: an upper bound is for integer inputs (token ids), not {dtype}")
        try:
            high = int(extra[1])
        except ValueError:
            raise MmkitError(f"--input {text!r}: the upper bound {extra[1]!r} is not an integer") from None
        if high < 1:
            raise MmkitError(f"--input {text!r}: the upper bound must be at least 1")
    elif integer:
        raise MmkitError(f"--input {text!r}: an integer input needs the upper bound of its values, e.g. "
                         f"{name}={dims}:{dtype}:1000")
    return name, {"shape": shape, "dtype": dtype, "high": high}


def parse_input_options(items: list[str] | None) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Every `--input` in the order given; a name given twice is refused."""
    parsed = [parse_input_option(item) for item in items or []]
    names = [name for name, _ in parsed]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise MmkitError(f"--input {twice[0]} is given twice; keep one")
    return tuple(parsed)


def parse_override_value(text: str) -> Any:
    """A `--set` value: JSON when it parses (numbers, lists, true/false), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
