"""The package's layers, enforced: every import (at module level or inside a function) points to
the same layer or one below it, and no modules import each other in a circle. docs/design.md
draws the same layers; a change that needs an upward import belongs in a lower layer."""

import ast
import pathlib

from conftest import ROOT

# top to bottom; a module belongs to the first entry that is it or a package above it
LAYERS = (
    ("jaxllm.__main__", "jaxllm.command"),
    ("jaxllm.jobs", "jaxllm.bench", "jaxllm.compare"),
    ("jaxllm.chat", "jaxllm.export"),
    ("jaxllm.cli", "jaxllm.orbax_noise"),
    ("jaxllm.options",),
    ("jaxllm.pretrained",),
    ("jaxllm.training",),
    ("jaxllm.generate", "jaxllm.interop", "jaxllm.torch_ref"),
    ("jaxllm.models",),
    ("jaxllm.nn",),
    ("jaxllm.data",),
    ("jaxllm.config", "jaxllm.validate", "jaxllm.cpu_devices", "jaxllm.compile_cache", "jaxllm.runio", "jaxllm.tolerance",
     "jaxllm.jax_internals"),
)
PACKAGE = ROOT / "jaxllm"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    for depth, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return depth
    return None


def imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The jaxllm modules ``path`` imports anywhere in it (``from pkg import sub`` names the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if m != "jaxllm" and layer_of(m) is None] == []


def test_no_import_points_up_a_layer():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() if a != "jaxllm" for b in sorted(targets)
              if b != "jaxllm" and layer_of(b) < layer_of(a)]
    assert upward == []


def circles_in(edges: dict[str, set[str]]) -> list[str]:
    """Every import circle a depth-first walk meets, as ``a -> b -> a``."""
    circles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return circles


def test_no_import_circle():
    # a package's __init__ re-exporting its own modules (and they importing it) is not a circle of the code
    within = lambda a, b: a.startswith(b + ".") or b.startswith(a + ".")  # noqa: E731
    assert circles_in({a: {b for b in targets if not within(a, b)} for a, targets in import_graph().items()}) == []


def test_the_checks_see_a_violation(tmp_path):
    """The contract is not vacuous: an upward import in a file is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from jaxllm.training import loop\n")
    assert imports(bad, {"jaxllm.training", "jaxllm.training.loop"}) == {"jaxllm.training", "jaxllm.training.loop"}
    assert layer_of("jaxllm.training.loop") < layer_of("jaxllm.nn.lora")
    assert circles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
