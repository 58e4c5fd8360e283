"""Packaging: the wheel carries convert, metal and the chat templates, and imports from itself."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_convert_and_metal_and_imports(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("mlx_gemma4-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mlx_gemma4/convert/mapping.py" in names and "mlx_gemma4/metal/__init__.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import mlx_gemma4, mlx_gemma4.convert.mapping as m, mlx_gemma4.load as l; "
        "from mlx_gemma4.prompt import bundled_template; "
        "print(mlx_gemma4.__file__); print(callable(mlx_gemma4.convert) and callable(l) and "
        "'<|turn>' in bundled_template(large=True) + bundled_template(large=False))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(site)}
    )
    assert result.returncode == 0, result.stderr
    module_file, is_callable = result.stdout.split()
    assert Path(module_file).is_relative_to(site) and is_callable == "True"
