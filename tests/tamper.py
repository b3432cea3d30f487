"""Tamper detection over every engine of an export dir (shared by the ONNX and AOTI export tests)."""
from __future__ import annotations

import shutil

import pytest

from fastardiff.errors import EngineError
from fastardiff.runtime.manifest import load_manifest


def assert_every_engine_tamper_refused(engine_dir, tmp_path, load) -> None:
    eng = tmp_path / "tampered"
    shutil.copytree(engine_dir, eng)
    load(eng)                                           # the untouched copy loads
    names = sorted(load_manifest(eng).engines)
    assert {"draft_step", "target_verify", "decoder"} <= set(names)
    for name in names:
        path = eng / load_manifest(eng).engines[name].file
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(EngineError, match="sha256") as err:
            load(eng)
        assert path.name in str(err.value), (name, str(err.value))
        path.write_bytes(original)
    load(eng)                                           # restored: loads again
