"""The package's import graph: every module imports on its own, and no module imports itself back through others
(deferred imports inside functions included), so the layers stay one-way as the package grows."""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dex

PACKAGE = Path(dex.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "dex."))
IMPORTABLE = [name for name in MODULES if not name.endswith("__main__")]  # importing __main__ runs the command


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """The dex modules that ``module`` (the file ``path``) imports anywhere in it, relative imports resolved."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(MODULES)
            # ``from package import submodule`` needs the submodule, not the package's __init__ to have run
            names |= submodules if len(submodules) == len(node.names) else submodules | {base}
    return {name for name in names if name in MODULES or name == "dex"}


def import_graph() -> dict[str, set[str]]:
    return {_module_of(path): _imports(path, _module_of(path)) - {_module_of(path)} for path in PACKAGE.rglob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == 1:
                return path[path.index(other):] + [other]
            if other not in state and (found := visit(other)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_finds_a_cycle_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert "dex.models.dex_vit" in graph["dex.models.mae"] and "dex.models" in graph["dex.train.pretrain"]


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module")
def test_every_module_imports_on_its_own():
    """Each module in a child that has loaded the third-party libraries but no dex module (forked from one process:
    a fresh interpreter per module would cost a torch import each)."""
    script = f"""
import os, sys, traceback
import numpy, torch, timm, torchvision, monai, pydicom, nibabel, PIL, scipy, sklearn, yaml, pydantic, matplotlib
failed = []
for name in {IMPORTABLE!r}:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


#: The package's layers, lowest first: a module may import its own layer and those below it, never one above.
#: ``dex`` itself (the package's __init__) offers the models and ``load_model``, so it sits with downstream.
LAYERS = (
    ("dex._version", "dex.threads", "dex.config", "dex.files", "dex.safeload", "dex.seeding", "dex.schedules",
     "dex.parallel",
     "dex.collectives", "dex.checkpoint", "dex.figures"),
    ("dex.models", "dex.data"),
    ("dex.train",),
    ("dex.downstream", "dex"),
    ("dex.eval",),
    ("dex.analysis",),
    ("dex.cluster",),
    ("dex.cli", "dex.__main__"),
)


def layer(module: str) -> int:
    """The index in :data:`LAYERS` of the most specific prefix naming ``module``; a module no layer names fails."""
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".") and prefix != "dex"]
    assert matches, f"{module} is in no layer of LAYERS: add it"
    return max(matches)[1]


def upward_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((module, other) for module, imported in graph.items() for other in imported
                  if layer(other) > layer(module))


def test_the_layer_rule_finds_an_upward_arrow():
    assert layer("dex.downstream.task_model") == layer("dex") == 3 and layer("dex.models.mae") == 1
    assert upward_arrows({"dex.downstream.task_model": {"dex.analysis.plots", "dex.models"}}) == [
        ("dex.downstream.task_model", "dex.analysis.plots")]
    assert upward_arrows({"dex.models.mae": {"dex"}, "dex.eval.suite": {"dex.downstream.finetune"}}) == [
        ("dex.models.mae", "dex")]


def test_layers_point_one_way():
    """No module imports a layer above its own (deferred imports inside functions included): data and models know
    nothing of training, training nothing of downstream use, downstream use nothing of evaluation or analysis."""
    assert upward_arrows(import_graph()) == []


def test_the_pretraining_loop_imports_no_method():
    """The loop finds methods through the objective registry, never by importing one."""
    graph = import_graph()
    assert not {name for name in graph["dex.train.pretrain"] if name.startswith("dex.train.objectives.")}


def test_import_dex_loads_no_evaluation_or_analysis_code():
    """``import dex`` gives the models and ``load_model`` without loading the evaluation suites, the analyses, the
    command line or matplotlib."""
    done = subprocess.run([sys.executable, "-c", "import dex, sys; print(sorted(sys.modules))"], capture_output=True,
                          text=True, timeout=300, cwd=PACKAGE.parent, check=True)
    loaded = ast.literal_eval(done.stdout)
    assert not [m for m in loaded if m.startswith(("dex.eval", "dex.analysis", "dex.cli", "dex.train"))], loaded
    assert "matplotlib" not in loaded
