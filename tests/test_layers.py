"""The layer rule of docs/architecture.md: imports only go down, and nothing imports in a circle.

Every import counts, including those inside functions and under TYPE_CHECKING: a lazy import that goes up a
layer is still a dependency a reader has to hold in mind. A new top-level module must be given a layer here.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "attar"
LAYERS = [  # lowest first; a module may import its own layer and any below
    {"errors", "registry", "specs", "rng", "io", "paths", "checkpoint", "store", "report", "console", "metrics",
     "lifecycle", "threads", "allocator"},
    {"data", "models", "text"},
    {"train"},
    {"distill", "select", "adapt", "condense", "merge"},
    {"stages", "recipe", "pipeline"},
    {"cli", "__main__", "__init__"},
]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(("attar",) + p.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _layer(mod: str) -> int:
    top = mod.split(".")[1] if "." in mod else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{mod}: give its top-level name {top!r} a layer in tests/test_layers.py (and the docs)")


def _edges() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name in `base`
            else:
                continue
            for t in targets:
                r = resolve(t) if t.startswith("attar") else None
                if r and r != m:
                    edges[m].add(r)
    return edges


def test_every_module_has_a_layer():
    for m in _modules():
        _layer(m)


def test_no_import_goes_up_a_layer():
    up = sorted(f"{a} -> {b}" for a, bs in _edges().items() for b in bs if _layer(b) > _layer(a))
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def _package_of(mod: str) -> str:
    return mod.rpartition(".")[0]


def test_no_import_circles():
    """Strongly connected components of the import graph; a package __init__ re-exporting its own
    submodules is not a circle (it only collects them)."""
    edges = _edges()
    for m in edges:  # drop package -> own-submodule edges (re-exports)
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10_000)
    for v in list(edges):
        if v not in index:
            strong(v)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("bad", ["attar.train.trainer -> attar.pipeline"])
def test_the_check_can_fail(bad):
    """The rule itself: an upward edge is recognised as one."""
    a, b = bad.split(" -> ")
    assert _layer(b) > _layer(a)


def test_the_cli_starts_without_torch():
    """`attar --help` stays fast (well under a second) because the CLI's start-up path imports neither torch nor
    transformers; commands import them when they run."""
    import subprocess
    import sys

    code = "import sys, attar.cli; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"the CLI's start-up imports {out}"
