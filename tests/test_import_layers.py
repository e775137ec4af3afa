"""The import-layer rule of docs/architecture.md, checked on the source: every module of fastres
(and of kernels/, installed as fastres.kernels) imports only modules of its own layer or below,
and no import cycle exists. Imports are read with ast, function-level ones included, so a lazy
import cannot hide an upward dependency."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Module (or package prefix) -> layer. The longest matching prefix decides.
LAYERS = {
    "fastres.kernels": 0,              # @triton.jit code only
    "fastres.reference": 0,            # the unfused oracle, torch only
    "fastres.activations": 0,          # activation names, codes and torch functions
    "fastres.interpreter_support": 0,
    "fastres.launch": 1,               # host side of the kernels
    "fastres.ops": 2,                  # torch.library custom ops
    "fastres.nn": 3,                   # anatomy, folding, plan, modules, blocks
    "fastres.convert": 4,              # optimize / restore / report
    "fastres": 5,                      # the public API (fastres/__init__.py)
    "fastres.testing": 6,              # tolerance table and poisoning, for tests and the demo
    "fastres.tools": 6,                # command line: demo, compile-check, op tracing
    "fastres.__main__": 6,
}
LAYER_NAMES = {0: "kernels/base", 1: "launch", 2: "ops", 3: "nn", 4: "convert", 5: "API",
               6: "tools"}


def source_modules() -> Dict[str, Path]:
    """Every module by its import name: fastres/**.py, and kernels/*.py as fastres.kernels.*."""
    found = {}
    for base, package in ((ROOT / "fastres", "fastres"), (ROOT / "kernels", "fastres.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package] + parts)] = path
    return found


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len,
               default=None)
    if best is None:
        raise KeyError(module)
    return LAYERS[best]


def fastres_imports(path: Path, known: Set[str]) -> Set[str]:
    """The fastres modules `path` imports (anywhere in the file). `from P import name` counts
    as importing P.name when that is a module, else P."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "fastres" or n.startswith("fastres."))
    return found


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    known = set(modules)
    return {name: fastres_imports(path, known) - {name} for name, path in modules.items()}


def layer_violations(graph: Dict[str, Set[str]]) -> List[str]:
    problems = []
    for module, imported in sorted(graph.items()):
        for dep in sorted(imported):
            if layer_of(dep) > layer_of(module):
                problems.append(f"{module} ({LAYER_NAMES[layer_of(module)]}) imports {dep} "
                                f"({LAYER_NAMES[layer_of(dep)]}): an upward import")
            if module.startswith("fastres.kernels") and not dep.startswith("fastres.kernels"):
                problems.append(f"{module} imports {dep}: kernels/ imports only kernels/")
    return problems


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a list of modules (first == last), or [] if there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_every_module_has_a_layer():
    unknown = []
    for name in source_modules():
        try:
            layer_of(name)
        except KeyError:
            unknown.append(name)
    assert not unknown, f"add these modules to LAYERS (and docs/architecture.md): {unknown}"


def test_imports_only_go_down_the_layers():
    problems = layer_violations(import_graph(source_modules()))
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    cycle = find_cycle(import_graph(source_modules()))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, upward, cyclic", [
    ({"fastres.launch.conv": {"fastres.ops.conv_bn_act"}, "fastres.ops.conv_bn_act": set()},
     True, False),
    ({"fastres.nn.plan": {"fastres.nn.modules"}, "fastres.nn.modules": {"fastres.nn.plan"}},
     False, True),
    ({"fastres.kernels.conv": {"fastres.reference"}, "fastres.reference": set()}, True, False),
    ({"fastres.tools.cli": {"fastres", "fastres.launch.conv"}, "fastres": {"fastres.convert"},
      "fastres.convert": set(), "fastres.launch.conv": set()}, False, False),
])
def test_the_checks_catch_what_they_are_for(graph, upward, cyclic):
    assert bool(layer_violations(graph)) == upward
    assert bool(find_cycle(graph)) == cyclic
