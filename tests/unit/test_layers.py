"""The layer rule, checked on the source: each layer imports only the layers below it.

    topology <- comms.core <- comms.kernels <- comms.transport <- comms.algorithms
             <- comms.plan <- comms.api <- comms.torch, comms.bootstrap <- comms.moe
             <- comms (the package's own modules: __init__, cli, testing)

Imports inside functions count. Also: no import circle between modules, no `__class__`
assignment, and no module reads another package's underscored names (`from x import _y`,
or `module._y` on an imported module of another package).
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS = ["topology", "comms.core", "comms.kernels", "comms.transport", "comms.algorithms",
          "comms.plan", "comms.api", ("comms.torch", "comms.bootstrap"), "comms.moe", "comms"]


def layer_of(module: str) -> int | None:
    """The layer index of one of our modules (None: not ours, e.g. numpy or torch)."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in (names if isinstance(names, tuple) else (names,)):
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    return best


def package_of(module: str) -> str:
    """The package a module belongs to for the underscore rule: comms.<sub> or topology."""
    parts = module.split(".")
    if parts[0] == "comms" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def source_modules():
    """{module name: path} of every .py under comms/ and topology/."""
    out = {}
    for top in ("comms", "topology"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-9] if rel.endswith(".__init__") else rel] = path
    return out


def resolve(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    """The absolute module of a relative import `from .{level} name import ...`."""
    parts = module.split(".")
    if not is_pkg:
        parts = parts[:-1]
    parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def imports_of(module: str, path: str, known) -> list:
    """[(line, imported module)] of every import in the file, function bodies included;
    `from pkg import sub` names the submodule when sub is one of ours."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, is_pkg, node.level, node.module) if node.level else node.module
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((node.lineno, full if full in known else base))
    return out


MODULES = source_modules()


def test_the_rule_knows_every_module():
    assert all(layer_of(m) is not None for m in MODULES), \
        [m for m in MODULES if layer_of(m) is None]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    mine = layer_of(module)
    bad = []
    for line, target in imports_of(module, MODULES[module], MODULES):
        theirs = layer_of(target)
        if theirs is None or target == module:
            continue
        # a package may import its own submodules (re-exports); anything else goes down
        if theirs > mine or (theirs == mine and package_of(target) != package_of(module)
                             and module != "comms"):
            bad.append(f"{module}:{line} imports {target} (layer {LAYERS[theirs]} is not below "
                       f"{LAYERS[mine]})")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = {m: {t for _, t in imports_of(m, p, MODULES) if t in MODULES and t != m}
             for m, p in MODULES.items()}
    # a package importing its own submodules (re-exports) is not a circle through them
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_class_swap_and_no_foreign_private_names(module):
    path = MODULES[module]
    tree = ast.parse(open(path).read(), path)
    mine = package_of(module)
    imported = {}       # local name -> module it is bound to (our modules only)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            base = (resolve(module, path.endswith("__init__.py"), node.level, node.module)
                    if isinstance(node, ast.ImportFrom) and node.level else
                    getattr(node, "module", None))
            for a in node.names:
                target = a.name if isinstance(node, ast.Import) else f"{base}.{a.name}"
                if isinstance(node, ast.ImportFrom) and a.name.startswith("_") and \
                        not a.name.startswith("__") and layer_of(base or "") is not None and \
                        package_of(base) != mine:
                    bad.append(f"{module}:{node.lineno} imports {base}.{a.name}")
                if target in MODULES:
                    imported[a.asname or a.name.split(".")[0]] = target
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr == "__class__":
                    bad.append(f"{module}:{node.lineno} assigns __class__")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.attr.startswith("_") and not node.attr.startswith("__"):
            target = imported.get(node.value.id)
            if target is not None and package_of(target) != mine:
                bad.append(f"{module}:{node.lineno} reads {target}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The rule's helpers on known cases (so a broken walker cannot pass everything)."""
    assert layer_of("comms.core.store") < layer_of("comms.api.host") < layer_of("comms.moe.api")
    assert layer_of("comms.torch.backend") == layer_of("comms.bootstrap")
    assert layer_of("numpy") is None and layer_of("topology.probe") == 0
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from comms.api import host\n    import comms.plan.select\n")
    got = [t for _, t in imports_of("comms.core.m", str(src), MODULES)]
    assert got == ["comms.api.host", "comms.plan.select"]
    assert resolve("comms.api.host", False, 2, "core") == "comms.core"
