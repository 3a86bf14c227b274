"""The package's shape, checked on its own import graph (every import statement, function-level ones included):
no import loops, entry points imported by nobody, the core importing only itself, trainers naming no task,
no link out of the repository, and every relative link of the README present in a clone."""

import ast
import re
import subprocess
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "grade_trl"
ENTRY_POINTS = {"grade_trl.run", "grade_trl.compare", "grade_trl.probe", "grade_trl.doctor", "grade_trl.analysis", "grade_trl.train_reward", "grade_trl.pretrain"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the grade_trl modules it imports}, relative imports resolved; `from . import x` is an edge to the submodule x."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name.startswith("grade_trl")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("grade_trl"):
                    continue
                submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
                edges |= set(submodules) if submodules else {target}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_loops():
    assert cycles(import_graph()) == []


def test_the_checker_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_entry_points_are_imported_by_nobody():
    graph = import_graph()
    assert ENTRY_POINTS <= set(graph)
    importers = {module: sorted(m for m, edges in graph.items() if module in edges) for module in ENTRY_POINTS}
    assert importers == {module: [] for module in ENTRY_POINTS}


def test_core_imports_only_itself_and_trainers_name_no_task():
    graph = import_graph()
    for module, edges in graph.items():
        if module.startswith("grade_trl.core"):
            assert all(e.startswith("grade_trl.core") for e in edges), (module, edges)
        if module.startswith("grade_trl.trainers"):
            assert not any(e.startswith(("grade_trl.tasks", "grade_trl.data", "grade_trl.evaluation")) for e in edges), (module, edges)


def tracked_files() -> set[str]:
    return set(subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout.split())


def test_no_link_points_outside_the_repository():
    offenders = [str(p.relative_to(REPO)) for p in [*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"), *(REPO / "recipes").rglob("*.yaml"), REPO / "README.md"] if "../shared" in p.read_text()]
    assert offenders == []


def test_every_relative_link_of_the_readme_is_committed():
    tracked = tracked_files()
    folders = {str(Path(p).parent) for p in tracked} | {str(parent) for p in tracked for parent in Path(p).parents}
    links = re.findall(r"\]\(([^)\s]+)\)", (REPO / "README.md").read_text())
    local = [link.split("#")[0] for link in links if not re.match(r"^[a-z]+://|#|mailto:", link)]
    missing = [link for link in local if str(Path(link)) not in tracked | folders]
    assert local and missing == []


def test_reading_commands_and_the_exit_helpers_import_no_transformers():
    """`import grade_trl`, its plumbing (cli, errors, recipe) and the doctor load no transformers or TRL (6-8 s):
    `python -m grade_trl.doctor RUN` answers at once, and the package's names load on first use."""
    import sys

    script = ("import sys, grade_trl, grade_trl.cli, grade_trl.errors, grade_trl.recipe, grade_trl.doctor\n"
              "print(sorted(m for m in ('transformers', 'trl', 'torch', 'datasets') if m in sys.modules))\n"
              "from grade_trl import GumbelGRADETrainer, LengthReward\n"
              "print(GumbelGRADETrainer.__module__, LengthReward.__module__, 'transformers' in sys.modules, grade_trl.trainers.__name__)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True).stdout.splitlines()
    assert out == ["[]", "grade_trl.trainers.grade grade_trl.rewards.length True grade_trl.trainers"]  # a submodule as an attribute, as before
