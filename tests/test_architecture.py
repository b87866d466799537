"""The dependency rules (pyproject.toml's [tool.importlinter] contracts) hold, and would be
caught if broken; `import ca_flax` brings nothing of the CPU backend with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_dependency_rules_hold():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_a_model_importing_the_cpu_backend_breaks_the_rules(tmp_path):
    shutil.copytree(REPO / "ca_flax", tmp_path / "ca_flax", ignore=shutil.ignore_patterns("*.so"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    layers = tmp_path / "ca_flax" / "models" / "layers.py"
    layers.write_text(layers.read_text() + "\nimport ca_flax.cpu.kernels  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "Models know nothing of backends, sharding, training or tools BROKEN" in done.stdout


def test_import_ca_flax_loads_no_backend():
    code = (
        "import sys, ca_flax, ca_flax.models\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('ca_flax.cpu', 'ca_flax.bench')))\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
