"""The package's import structure (issue 24): no import circles, and the core never reaches the wings.

The core is everything a model needs (batch, transition, potentials, decoder, models, guides,
training, posterior, spec, checks, members, crossval ...). The wings use it: the command line
(``cli``, ``options``, ``console``), the benchmark's wing ``nlb/`` and the recording wing
``recording/``. Read from the code's own ``import`` statements (at any depth in a module, lazy
imports included), so a circle hidden inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Source folder -> package name (pyproject's package-dir mapping).
ROOTS = {"pyro_langevin": "pyro_langevin", "models": "pyro_langevin.models", "guides": "pyro_langevin.guides"}
#: Modules and packages that sit on the core and may import it (never the other way round).
WINGS = ("pyro_langevin.cli", "pyro_langevin.options", "pyro_langevin.console", "pyro_langevin.nlb",
         "pyro_langevin.recording")
#: The core the issue names; every other module outside WINGS is held to the same rule.
NAMED_CORE = ("pyro_langevin.models.langevin_flow", "pyro_langevin.guides.gru", "pyro_langevin.guides.bigru",
              "pyro_langevin.transition", "pyro_langevin.potentials", "pyro_langevin.decoder", "pyro_langevin.batch",
              "pyro_langevin.training", "pyro_langevin.posterior")


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                origin = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
                targets = [f"{origin}.{a.name}" for a in node.names] + [origin]
            for target in targets:
                found = resolve(target)
                # a package's __init__ is not an edge into its submodules' users (pyro_langevin's own is tiny)
                if found and found != module and found != "pyro_langevin" and not module.startswith(found + "."):
                    edges[module].add(found)
    return edges


def _reach(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        for nxt in edges.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _is_wing(module: str) -> bool:
    return any(module == w or module.startswith(w + ".") for w in WINGS)


def test_the_graph_reads_the_real_imports():
    edges = _graph()
    assert "pyro_langevin.transition" in edges["pyro_langevin.models.langevin_flow"]
    assert "pyro_langevin.nlb.members" in edges["pyro_langevin.nlb.pipeline"]
    assert all(m in edges for m in NAMED_CORE)


def test_no_import_circles():
    edges = _graph()
    circles = sorted(f"{m} -> {t}" for m, targets in edges.items() for t in targets if m in _reach(edges, t))
    assert circles == [], "imports on a circle:\n" + "\n".join(circles)


def test_the_core_never_reaches_the_command_line_or_nlb():
    edges = _graph()
    core = [m for m in edges if not _is_wing(m)]
    assert set(NAMED_CORE) <= set(core)
    offending = {m: sorted(t for t in _reach(edges, m) if _is_wing(t)) for m in core}
    offending = {m: ts for m, ts in offending.items() if ts}
    assert offending == {}, offending
