import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests/parity.py helpers


@pytest.fixture
def load_script():
    """Import ``train/<name>.py`` as a module so tests call its ``main(argv)`` in-process."""

    def load(name: str):
        path = ROOT / "train" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"train_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
