"""The one atomic writer (`mmkit.atomic`), also used by the CPU probe's timing cache."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mmkit import atomic
from mmkit.plan.probe import _Cache


def test_temp_names_match_the_pattern_that_finds_leftovers(tmp_path: Path) -> None:
    temp = atomic.temp_path(tmp_path / "run.json")
    match = re.fullmatch(atomic.TEMP_FILE_PATTERN, temp.name)
    assert temp.parent == tmp_path and match is not None and int(match.group(1)) == os.getpid()


def test_the_probe_cache_is_written_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "cpu-probe.json"
    cache = _Cache(path, "this machine")
    cache.put("linear 64x64#b8", {"fp32": 1.0})
    cache.save()
    assert json.loads(path.read_text()) == {"this machine": {"linear 64x64#b8": {"fp32": 1.0}}}
    assert [p.name for p in path.parent.iterdir()] == ["cpu-probe.json"]
    assert _Cache(path, "this machine").get("linear 64x64#b8") == {"fp32": 1.0}


def test_a_failed_probe_cache_write_keeps_the_old_cache_and_no_temp(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    path = tmp_path / "cpu-probe.json"
    path.write_text('{"old": {}}')
    cache = _Cache(path, "this machine")
    cache.put("key", 1.0)

    def full_disk(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    cache.save()  # a cache: a failed write is not an error
    assert path.read_text() == '{"old": {}}'
    assert [p.name for p in tmp_path.iterdir()] == ["cpu-probe.json"]
