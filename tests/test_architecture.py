"""The folder tree is the architecture: the layer contract holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_layers_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    r = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "0 broken" in r.stdout


def test_models_import_without_the_engine():
    code = ("import sys, geoseg.models.loading, geoseg.models.backends; "
            "bad = [m for m in sys.modules if m.startswith(('geoseg.engine', 'geoseg.workflow', 'geoseg.post'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
