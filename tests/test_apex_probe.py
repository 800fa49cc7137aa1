"""The apex probe reads a broken apex build as absent (so callers fall back or name the fix), a working one as present.

The builds are real packages written to a temporary directory and put on sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ssltrain.engine.apex_probe import load_apex


@pytest.fixture
def fake_apex(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def write(extension_body: str) -> None:
        (tmp_path / "apex").mkdir()
        (tmp_path / "apex" / "__init__.py").write_text("")
        (tmp_path / "apex" / "parallel.py").write_text("def convert_syncbn_model(model):\n    return model\n")
        (tmp_path / "fake_ext.py").write_text(extension_body)
        monkeypatch.syspath_prepend(str(tmp_path))
        for name in ("apex", "apex.parallel", "fake_ext"):
            monkeypatch.delitem(sys.modules, name, raising=False)

    return write


def test_a_working_build_is_found(fake_apex) -> None:
    fake_apex("")
    module = load_apex("parallel", "fake_ext")
    assert module is not None and module.convert_syncbn_model("m") == "m"


def test_an_extension_that_fails_to_load_reads_as_absent(fake_apex) -> None:
    fake_apex("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    assert load_apex("parallel", "fake_ext") is None


def test_a_missing_extension_or_module_reads_as_absent(fake_apex) -> None:
    fake_apex("")
    assert load_apex("parallel", "no_such_extension") is None
    assert load_apex("no_such_module", "fake_ext") is None
