"""Packaging and layering: what `import t2i_kernels` pulls in, imports that run one way with no cycles, the wheel's
contents, the README/CI contract. Coexistence with Hugging Face's `kernels` is tested in test_coexistence.py."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kernels_layer_imports_no_flux_or_training_code():
    out = _python(
        "import sys, t2i_kernels; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'accelerate', 'deepspeed', 't2i_distill') "
        "if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_no_top_level_package_is_named_kernels():
    """Hugging Face's `kernels` owns that import name (transformers imports it): nothing of ours may shadow it."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert not (REPO / "kernels.py").exists()


#: Layers, lowest first: a module may import its own layer and the ones before it, never a later one.
LAYERS = ("t2i_kernels", "t2i_distill", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every first-party module → the first-party modules it imports, at module level or inside functions (a lazy
    import is still an edge: it only moves the cycle to call time)."""
    files = {_module_name(p): p for pkg in LAYERS for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        edges: set[str] = set()
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                prefix = node.module or ""
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in files else prefix for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:  # `a.b.func` → module `a.b`
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    edges.add(name)
        graph[mod] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_first_party_imports_have_no_cycles():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_run_one_way_and_the_cli_is_the_top():
    """t2i_kernels ← t2i_distill ← bench; nothing imports the CLI."""
    problems = []
    for mod, edges in import_graph().items():
        layer = LAYERS.index(mod.split(".")[0])
        for target in edges:
            if LAYERS.index(target.split(".")[0]) > layer:
                problems.append(f"{mod} imports the higher layer {target}")
            if target == "t2i_distill.cli":
                problems.append(f"{mod} imports the CLI (the top layer)")
    assert problems == []


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in readme


def test_setup_pins_a_torch_range_that_keeps_the_installed_build():
    text = (REPO / "setup.py").read_text()
    assert '"torch>=2.11,<2.14"' in text
    import torch
    from packaging.specifiers import SpecifierSet

    installed = torch.__version__.split("+")[0]
    assert installed in SpecifierSet(">=2.11,<2.14"), f"installed torch {installed} is outside setup.py's range"


def test_the_wheel_ships_every_module_of_both_packages(tmp_path):
    """A non-editable install must contain t2i_kernels/ and t2i_distill/ with all their subpackages, and no
    top-level `kernels` (Hugging Face's import name)."""
    import zipfile

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("t2i_distill-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(REPO)) for pkg in ("t2i_kernels", "t2i_distill") for p in (REPO / pkg).rglob("*.py")}
    assert expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    assert not any(name.startswith(("tests/", "bench/", "kernels/")) for name in shipped)
