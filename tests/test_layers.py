"""The import contract: one-way layers, a device runtime free of the method, no private names across modules.

Layers, each importing only those below it: ``common`` (standard library only) <- ``dgq`` (the method) <-
``export`` (graphs) <- ``runtime`` (engines) <- ``app`` (CLI, generation from an export). ``runtime`` may
import ``export`` only where that does not reach ``dgq`` through further imports, and no diffusers models
or pipelines (schedulers are data it needs). Every import statement counts, function-local ones
included; the source is read, nothing is imported. ``scripts/`` sit above ``app`` and are checked for
private names only.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("common", "dgq", "export", "runtime", "app")
MAY_IMPORT = {
    "common": {"common"},
    "dgq": {"common", "dgq"},
    "export": {"common", "dgq", "export"},
    "runtime": {"common", "export", "runtime"},
    "app": set(LAYERS),
}
# What the runtime may take from diffusers: its schedulers (looked up by the class name in an export's
# scheduler config) and its version. Models and pipelines belong to the calibration stack.
RUNTIME_DIFFUSERS_NAMES = ("Scheduler", "SchedulerMixin", "__version__")  # name endings

# Private names still imported across modules, keyed by importing file and imported name (none left);
# an entry that no longer matches a violation fails the test, so the list can only shrink.
PRIVATE_ALLOWLIST: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    file: str  # relative to the tree's root
    line: int
    module: str  # absolute module name imported, or imported from
    name: str | None  # the name taken by ``from module import name``; None for ``import module``

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class Tree:
    """The first-party source of a checkout (the repository, or a small tree a test builds)."""

    def __init__(self, root: Path):
        self.root = root
        self.files = [p for top in LAYERS for p in sorted((root / top).rglob("*.py"))]
        self.modules = {self.module(p) for p in self.files}

    def module(self, path: Path) -> str:
        parts = list(path.relative_to(self.root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def imports(self, path: Path) -> tuple[list[Import], list[tuple[int, str, str]]]:
        """Every import statement of a file, and every read of a private attribute of a first-party
        module bound by an import there: ``(line, module, attribute)``."""
        module = self.module(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        found: list[Import] = []
        bound: dict[str, str] = {}  # local name -> the module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(Import(self.rel(path), node.lineno, alias.name, None))
                    top = alias.name.split(".")[0]
                    bound[alias.asname or top] = alias.name if alias.asname else top
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                for alias in node.names:
                    found.append(Import(self.rel(path), node.lineno, source, alias.name))
                    if f"{source}.{alias.name}" in self.modules:
                        bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        reads = [
            (node.lineno, bound[node.value.id], node.attr)
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and bound.get(node.value.id, "").split(".")[0] in LAYERS
            and _is_private(node.attr)
        ]
        return found, reads

    def reached(self, imp: Import) -> list[str]:
        """The first-party modules an import statement loads: each package on the way, and the imported
        name when it is a submodule."""
        parts = (imp.module if imp.name is None else f"{imp.module}.{imp.name}").split(".")
        return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in self.modules]


def upward_imports(tree: Tree) -> list[str]:
    bad = []
    for path in tree.files:
        layer = tree.rel(path).split("/")[0]
        for imp in tree.imports(path)[0]:
            top = imp.module.split(".")[0]
            if top in LAYERS and top not in MAY_IMPORT[layer]:
                bad.append(f"{imp.where()}: {layer} imports {imp.module}, a layer above it")
            elif layer == "common" and top not in sys.stdlib_module_names | {"common", "__future__"}:
                bad.append(f"{imp.where()}: common imports {imp.module}; it is standard library only")
    return bad


def runtime_reaches_the_method(tree: Tree) -> list[str]:
    graph = {tree.module(p): [(m, imp) for imp in tree.imports(p)[0] for m in tree.reached(imp)] for p in tree.files}
    bad = []
    for start in sorted(m for m in graph if m.split(".")[0] == "runtime"):
        paths, queue = {start: start}, deque([start])
        while queue:
            current = queue.popleft()
            for target, imp in graph.get(current, []):
                if target in paths:
                    continue
                paths[target] = f"{paths[current]} -> {target} ({imp.where()})"
                if target.split(".")[0] in ("dgq", "app"):
                    bad.append(paths[target])
                    queue.clear()  # one chain per runtime module says enough
                    break
                queue.append(target)
    for path in tree.files:
        if tree.rel(path).split("/")[0] != "runtime":
            continue
        for imp in tree.imports(path)[0]:
            if imp.module.startswith(("diffusers.models", "diffusers.pipelines")) or (
                imp.module == "diffusers" and imp.name and not imp.name.endswith(RUNTIME_DIFFUSERS_NAMES)
            ):
                bad.append(f"{imp.where()}: runtime imports {imp.module}.{imp.name or ''}")
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "diffusers"
                and not node.attr.endswith(RUNTIME_DIFFUSERS_NAMES)
            ):
                bad.append(f"{tree.rel(path)}:{node.lineno}: runtime uses diffusers.{node.attr}")
    return bad


def private_names(tree: Tree, extra: list[Path] = ()) -> dict[tuple[str, str], str]:
    """``(file, module.name) -> "file:line"`` for each private name one module takes from another."""
    found = {}
    for path in [*tree.files, *extra]:
        imports, reads = tree.imports(path)
        for imp in imports:
            parts = [*imp.module.split("."), *([imp.name] if imp.name else [])]
            if parts[0] in LAYERS and any(_is_private(p) for p in parts):
                found.setdefault((tree.rel(path), ".".join(parts)), imp.where())
        for line, module, name in reads:
            found.setdefault((tree.rel(path), f"{module}.{name}"), f"{tree.rel(path)}:{line}")
    return found


REPO = Tree(ROOT)


def test_layers_import_only_downward():
    bad = upward_imports(REPO)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_runtime_reaches_neither_dgq_nor_diffusers_models():
    bad = runtime_reaches_the_method(REPO)
    assert not bad, "runtime reaches the calibration stack:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    found = private_names(REPO, sorted((ROOT / "scripts").glob("*.py")))
    bad = sorted(
        f"{where}: uses the private name {name}"
        for (file, name), where in found.items()
        if (file, name) not in PRIVATE_ALLOWLIST
    )
    assert not bad, "private names used across modules:\n" + "\n".join(bad)
    stale = sorted(PRIVATE_ALLOWLIST - set(found))
    assert not stale, f"allowlisted violations that are gone (remove them from PRIVATE_ALLOWLIST): {stale}"


def test_the_checks_catch_each_kind_of_violation(tmp_path):
    # A small tree with one violation of each kind, in the forms the repository's walk must not miss:
    # function-local, aliased, relative, transitive, attribute reads.
    files = {
        "common/__init__.py": "import numpy\n",
        "dgq/__init__.py": "",
        "dgq/zoo/__init__.py": "",
        "dgq/zoo/builders.py": "_private_thing = 1\n_other_private = 2\n",
        "dgq/probe.py": (
            "def f():\n"
            "    from export.qdq import lower\n"
            "    import runtime.pipeline as rp\n"
            "    from .zoo import builders\n"
            "    from dgq.zoo.builders import _private_thing\n"
            "    return builders._other_private, rp, lower\n"
        ),
        "export/__init__.py": "",
        "export/qdq.py": "from dgq.zoo import builders\n",
        "export/manifest.py": "",
        "runtime/__init__.py": "",
        "runtime/pipeline.py": "from export import manifest\n\ndef g():\n    from export.qdq import lower\n",
        "runtime/models.py": (
            "import diffusers\nfrom diffusers import UNet2DConditionModel\nx = diffusers.AutoencoderKL\n"
        ),
        "app/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    tree = Tree(tmp_path)
    assert upward_imports(tree) == [
        "common/__init__.py:1: common imports numpy; it is standard library only",
        "dgq/probe.py:2: dgq imports export.qdq, a layer above it",
        "dgq/probe.py:3: dgq imports runtime.pipeline, a layer above it",
    ]
    assert runtime_reaches_the_method(tree) == [
        "runtime.pipeline -> export.qdq (runtime/pipeline.py:4) -> dgq (export/qdq.py:1)",
        "runtime/models.py:2: runtime imports diffusers.UNet2DConditionModel",
        "runtime/models.py:3: runtime uses diffusers.AutoencoderKL",
    ]
    assert private_names(tree) == {
        ("dgq/probe.py", "dgq.zoo.builders._private_thing"): "dgq/probe.py:5",
        ("dgq/probe.py", "dgq.zoo.builders._other_private"): "dgq/probe.py:6",
    }


def test_every_error_the_project_defines_derives_from_the_one_base():
    from common.errors import DGQError

    defined = {}
    for path in REPO.files:
        for node in ast.parse(path.read_text()).body:
            bases = [ast.unparse(b).rpartition(".")[2] for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and any(b.endswith(("Error", "Exception")) for b in bases):
                defined[node.name] = getattr(importlib.import_module(REPO.module(path)), node.name)
    named = {"ExportError", "LoweringError", "LintError", "RecipeError", "ManifestError", "FeedError"}
    named |= {"EngineBuildError", "EngineCompatibilityError", "ModelLoadError", "RunnerError", "BackendUnavailable"}
    assert named <= set(defined), sorted(named - set(defined))
    outside = sorted(name for name, cls in defined.items() if not issubclass(cls, DGQError))
    assert not outside, f"errors outside the DGQError hierarchy: {outside}"


def test_console_entry_point_is_the_application_layer():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, _, func = project["project"]["scripts"]["dgq"].partition(":")
    assert module.split(".")[0] == "app"
    assert callable(getattr(importlib.import_module(module), func))
    packaged = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in packaged) == sorted(LAYERS)
