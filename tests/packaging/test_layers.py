"""The import contract (docs/architecture.md): every import of the package points down the layers.

Checked on the source by an AST walk (nothing is imported), every import statement wherever it
stands, except inside a module's ``if __name__ == "__main__":`` block (that block is the module
run as a program, i.e. a command). Rules:

1. a module imports only modules of its own layer or of lower layers;
2. ``hdnas.kernels`` imports nothing of hdnas but itself, and of the rest only torch, triton,
   numpy and the standard library;
3. backends (``hdnas.mixed``) import of the model only its op specs, op modules and the mixed-op
   module, never the cell, the network or the genotype;
4. nothing imports a command module;
5. no import of an hdnas module inside a function (a function-level import hides a cycle),
   except the few listed in ``OPTIONAL`` that load an optional dependency;
6. no cycle among the modules of the package.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]

#: Lowest first. A module belongs to the first entry whose prefix it has.
LAYERS = [
    ("kernels", ("hdnas.kernels",)),
    ("base", ("hdnas.registry", "hdnas.native_build", "hdnas.machine", "hdnas.safeio",
              "hdnas.cliargs")),
    ("model", ("hdnas.model",)),
    ("mixed", ("hdnas.mixed",)),
    ("infer", ("hdnas.infer",)),
    ("io", ("hdnas.io",)),
    ("data", ("hdnas.data",)),
    ("eval", ("hdnas.eval",)),
    ("nas", ("hdnas.nas",)),
    ("darts", ("hdnas.darts",)),
    ("engine", ("hdnas.engine",)),
    ("commands", ("hdnas.search", "hdnas.train", "hdnas.evaluate", "hdnas.upscale",
                  "hdnas.export", "hdnas.latency", "hdnas.visualize")),
    ("testing", ("hdnas.testing",)),
]
COMMANDS = dict(LAYERS)["commands"]
#: What a backend may import of the model.
MODEL_FOR_BACKENDS = ("hdnas.model.space", "hdnas.model.ops", "hdnas.model.mixed_op")
#: Function-level imports of hdnas modules that load an optional dependency (Triton, the
#: compiled extension), as (importing module, imported module).
OPTIONAL = {
    ("hdnas.darts.launches", "hdnas.kernels.aot"),
}
KERNEL_THIRD_PARTY = {"torch", "triton", "numpy"}


def _modules() -> dict[str, Path]:
    out = {}
    for base, pkg in ((ROOT / "hdnas", "hdnas"), (ROOT / "kernels", "hdnas.kernels")):
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if name.startswith("hdnas.csrc"):
                continue
            out[name] = f
    return out


def _layer(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    if name == "hdnas":
        return -1
    raise AssertionError(f"{name} is in no layer of tests/packaging/test_layers.py")


def _is_main_guard(node) -> bool:
    t = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(t, ast.Compare)
            and isinstance(t.left, ast.Name) and t.left.id == "__name__")


def _imports(name: str, path: Path):
    """(imported module, line, in a function) for every import outside a __main__ block."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, f) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg.rsplit(".", child.level - 1)[0] if child.level > 1 else pkg
                    mod = f"{base}.{child.module}" if child.module else base
                else:
                    mod = child.module
                for a in child.names:  # "from pkg import module" imports the module
                    sub = f"{mod}.{a.name}"
                    found.append((sub if sub in MODULES else mod, child.lineno, f))
            visit(child, f)

    visit(tree, False)
    return found


MODULES = _modules()


def violations() -> list[str]:
    bad = []
    graph = {}
    for name, path in sorted(MODULES.items()):
        lay = _layer(name)
        where = f"{path.relative_to(ROOT)}"
        graph[name] = set()
        for mod, line, in_func in _imports(name, path):
            top = mod.split(".")[0]
            if name.startswith("hdnas.kernels"):
                if top == "hdnas" and not mod.startswith("hdnas.kernels"):
                    bad.append(f"{where}:{line}: kernels import {mod}")
                elif top != "hdnas" and top not in KERNEL_THIRD_PARTY and top not in sys.stdlib_module_names:
                    bad.append(f"{where}:{line}: kernels import {mod} (only torch/triton/numpy)")
            if top != "hdnas" or mod == "hdnas":
                continue
            target = mod if mod in MODULES else next(
                (m for m in sorted(MODULES, key=len, reverse=True) if mod.startswith(m + ".")), mod)
            if target == name:
                continue
            if not in_func:
                graph[name].add(target)
            tl = _layer(target)
            if tl > lay:
                bad.append(f"{where}:{line}: {name} ({LAYERS[lay][0]}) imports {target} "
                           f"({LAYERS[tl][0]}), a higher layer")
            if LAYERS[tl][0] == "commands":
                bad.append(f"{where}:{line}: {name} imports the command module {target}")
            if LAYERS[lay][0] == "mixed" and LAYERS[tl][0] == "model" and target not in MODEL_FOR_BACKENDS:
                bad.append(f"{where}:{line}: backend {name} imports {target} (only "
                           f"{', '.join(MODEL_FOR_BACKENDS)} of the model)")
            if in_func and (name, target) not in OPTIONAL:
                bad.append(f"{where}:{line}: function-level import of {target} in {name}")
    # cycles among module-level imports
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                bad.append("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    return bad


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_point_down_the_layers():
    bad = violations()
    assert not bad, "import contract broken (docs/architecture.md):\n" + "\n".join(bad)


def test_the_checker_catches_each_kind_of_violation(tmp_path, monkeypatch):
    """The checker is not vacuous: a planted module breaking each rule is reported."""
    planted = {
        "hdnas.model.zz_bad": "from hdnas.mixed import base\n",                  # upward
        "hdnas.kernels.zz_bad": "import hdnas.model.space\nimport PIL\n",         # kernels
        "hdnas.mixed.zz_bad": "from hdnas.model.network import SuperNet\n",      # backend->net
        "hdnas.engine.zz_bad": "from hdnas.search import main\n",                # command
        "hdnas.eval.zz_bad": "def f():\n    from hdnas.data import imresize\n",  # in function
        "hdnas.io.zz_a": "from hdnas.io import zz_b\n",                           # cycle
        "hdnas.io.zz_b": "from hdnas.io import zz_a\n",
    }
    mods = dict(MODULES)
    for name, src in planted.items():
        p = tmp_path / (name.replace(".", "_") + ".py")
        p.write_text(src)
        mods[name] = p
    monkeypatch.setattr(sys.modules[__name__], "MODULES", mods)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", Path("/"))
    text = "\n".join(violations())
    for needle in ("hdnas.model.zz_bad (model) imports hdnas.mixed.base",
                   "kernels import hdnas.model.space", "kernels import PIL",
                   "backend hdnas.mixed.zz_bad imports hdnas.model.network",
                   "imports the command module hdnas.search",
                   "function-level import of hdnas.data.imresize in hdnas.eval.zz_bad",
                   "import cycle: hdnas.io.zz_a -> hdnas.io.zz_b -> hdnas.io.zz_a"):
        assert needle in text, (needle, text)


def test_commands_are_thin():
    """``python -m hdnas.<command>``: arguments in, one call out."""
    for name in COMMANDS:
        n = len(MODULES[name].read_text().splitlines())
        assert n <= 120, f"{name} has {n} lines; library logic belongs in the layers below"
