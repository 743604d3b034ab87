"""The layout is the architecture: one thin module per stage on top of one package per concern, no import cycle, no
module over 400 lines, and the same stage names in dvc.yaml, the CLI and cpt/stages/."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from cpt.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGES = ("data", "tok", "training", "evaluation", "ops", "sft", "merge", "stages")
MAX_LINES = 400
STAGE_MAX_LINES = 160  # "about 150": a stage reads its config, calls its package, writes outputs and metrics


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the cpt modules it imports, at any depth of the file (lazy imports inside functions count: a cycle
    through them is still a cycle, only hidden until the call)."""
    modules = {module_name(p, src): p for p in (src / "cpt").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from cpt.ops import tracking` imports the module cpt.ops.tracking
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("cpt"):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None. Iterative DFS with colours."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for root in sorted(graph):
        if colour[root] != WHITE:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour[child] == GREY:
                return path[path.index(child):] + [child]
            elif colour[child] == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "cpt"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from cpt.a import y\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from cpt.a.x import g  # lazy: still a cycle\n")
    (pkg / "z.py").write_text("from .a import x\n")
    graph = import_graph(tmp_path)
    assert graph["cpt.z"] == {"cpt.a.x"}
    assert find_cycle(graph) in (["cpt.a.x", "cpt.a.y", "cpt.a.x"], ["cpt.a.y", "cpt.a.x", "cpt.a.y"])
    (pkg / "a" / "y.py").write_text("import json\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in (SRC / "cpt").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_stages_are_thin_and_named_alike():
    stage_dir = SRC / "cpt" / "stages"
    modules = {p.stem for p in stage_dir.glob("*.py") if p.stem != "__init__"}
    assert modules == set(STAGES), "one module per stage in cpt/stages, named as the stage"
    fat = {s: n for s in STAGES if (n := len((stage_dir / f"{s}.py").read_text().splitlines())) > STAGE_MAX_LINES}
    assert not fat, f"stage modules hold config + a call into their package; these are long: {fat}"
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == list(STAGES), "dvc.yaml stages = cpt.stages.STAGES, in order"
    for name, stage in dvc["stages"].items():
        assert stage["cmd"].split()[:2] == ["cpt", name]


def test_stages_depend_on_packages_not_the_other_way():
    """Packages never import a stage (a stage is the top of the stack), and the core imports no package above it."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith(tuple(f"cpt.{p}" for p in PACKAGES if p != "stages")):
            assert not {d for d in deps if d.startswith("cpt.stages.")}, f"{mod} imports a stage: {deps}"


def test_dvc_deps_are_package_folders():
    """A stage's code deps are folders, so a helper moved between modules of a package can never escape them: every
    package the stage reaches through its imports (transitively) is a dep. cpt/ops (tracking) changes no output;
    eval lists it anyway, for the gate that runs after it."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    graph = import_graph()
    for name, stage in dvc["stages"].items():
        code = [d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith("src/")]
        assert f"src/cpt/stages/{name}.py" in code, name
        for dep in code:
            path = REPO / dep
            assert path.exists(), f"{name}: dep {dep} does not exist"
            assert path.is_dir() or dep == f"src/cpt/stages/{name}.py", f"{name}: {dep} should be its package folder"
        reached, todo = set(), [f"cpt.stages.{name}"]
        while todo:
            for dep in graph[todo.pop()] - reached:
                reached.add(dep)
                todo.append(dep)
        for pkg in PACKAGES:
            if pkg not in ("ops", "stages") and any(m.startswith(f"cpt.{pkg}.") for m in reached):
                assert f"src/cpt/{pkg}" in code, f"{name} reaches cpt.{pkg} but dvc.yaml does not depend on it"
