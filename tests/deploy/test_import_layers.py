"""The layering, checked: which part of the code may import which (docs/architecture.md, "Layers").

Every import in the project's modules is read (module level and inside functions: a lazy import
is still a dependency), each module is put in its layer, and an import that goes up the stack
fails the test with the file and the line. External libraries are checked at module level only:
a core module may import kafka-python lazily where it validates Kafka settings, but importing the
core must never load Kafka, torch or hnswlib.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Package name → source folder (pyproject's package-dir).
PACKAGES = {"streamrecall": "streamrecall", "streamrecall.consumers": "consumers",
            "streamrecall.model": "model", "streamrecall.index": "index"}
#: Lower layers first; a module may import its own layer and those below it.
ORDER = ("core", "model", "index", "stream", "roles", "ops", "devtools")
#: What each layer may import besides the project's lower layers.
MAY_IMPORT = {"core": set(), "model": {"core"}, "index": {"core"}, "stream": {"core", "model", "index"},
              "roles": {"core", "model", "index", "stream"},
              "ops": {"core", "model", "index", "stream", "roles"},
              "devtools": {"core", "model", "index", "stream", "roles", "ops"}}
#: The one import that goes up: ops reach the devtools (an optional extra: the embedded broker for
#: `up`, `generate`, `evaluate`, `bench`) only inside the functions that need them, never at import.
LAZY_ONLY = {"ops": {"devtools"}}
HEAVY = ("kafka", "torch", "hnswlib")


def layer(module: str) -> str | None:
    if not module.startswith("streamrecall"):
        return None
    parts = module.split(".") + [""]
    if parts[1] == "consumers":
        return "roles" if parts[2] == "roles" else "stream"
    if parts[1] in ("model", "index", "ops", "devtools"):
        return parts[1]
    if parts[1] == "__main__":
        return "ops"
    return "core"


def _role(module: str) -> str | None:
    """The role a module of the roles layer belongs to (None for the roles package itself)."""
    parts = module.split(".")
    return parts[3] if len(parts) > 3 else None


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    # streamrecall/ holds the subpackages' folders only by mapping: drop what PACKAGES maps elsewhere
    return {m: p for m, p in out.items() if not (m.startswith("streamrecall.") and
                                                   p.is_relative_to(REPO / "streamrecall") and
                                                   m.split(".")[1] in ("consumers", "model", "index"))}


def imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, runs at import time) for every import in ``path``: an import inside
    a function runs only when it is called."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, not in_function) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, node.lineno, not in_function))
        nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, nested)

    visit(tree, False)
    return out


def type_checking_only(path: Path) -> set[int]:
    """Lines of imports under ``if TYPE_CHECKING:`` (annotations only: not a dependency at run time)."""
    tree = ast.parse(path.read_text())
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def test_every_import_goes_down_the_layers() -> None:
    found = modules()
    assert len(found) > 60 and "streamrecall.consumers.runtime" in found and "streamrecall.model.towers" in found
    wrong = []
    for module, path in sorted(found.items()):
        mine = layer(module)
        annotations = type_checking_only(path)
        for name, line, at_top in imports(module, path):
            where = f"{path.relative_to(REPO)}:{line}"
            theirs = layer(name)
            if theirs is None or line in annotations or theirs == mine or theirs in MAY_IMPORT[mine]:
                pass
            elif theirs in LAZY_ONLY.get(mine, ()) and not at_top:
                pass
            elif theirs in LAZY_ONLY.get(mine, ()):
                wrong.append(f"{where}: {module} ({mine}) imports {name} ({theirs}) at module level: "
                             "the devtools are an optional extra, import them inside the function that needs them")
            else:
                wrong.append(f"{where}: {module} ({mine}) imports {name} ({theirs})")
            if mine == theirs == "roles" and _role(module) and _role(name) and _role(module) != _role(name):
                wrong.append(f"{where}: the {_role(module)} role imports the {_role(name)} role ({name})")
            if mine in ("core",) and at_top and name.split(".")[0] in HEAVY:
                wrong.append(f"{where}: the core ({module}) imports {name} at module level")
            if mine == "model" and at_top and name.split(".")[0] in ("kafka", "hnswlib"):
                wrong.append(f"{where}: the model ({module}) imports {name}")
            if mine == "index" and at_top and name.split(".")[0] in ("kafka", "torch"):
                wrong.append(f"{where}: the index ({module}) imports {name}")
    assert not wrong, "imports against the layering (docs/architecture.md, Layers):\n" + "\n".join(wrong)


def test_the_check_catches_an_import_up_the_stack(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from streamrecall.consumers.runtime import Runtime\nimport torch\n")
    got = imports("streamrecall.model.bad", bad)
    assert [(n, layer(n)) for n, _, _ in got] == [("streamrecall.consumers.runtime", "stream"), ("torch", None)]
    assert layer("streamrecall.settings") == "core" and layer("streamrecall.devtools.bench.query") == "devtools"
    assert layer("streamrecall.ops.cli") == "ops" and "devtools" not in MAY_IMPORT["ops"]
    assert layer("streamrecall.consumers.roles.trainer") == "roles" and "stream" not in MAY_IMPORT["model"]
