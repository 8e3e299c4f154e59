"""The package's modules form no import cycle, counting imports inside functions too: a
cycle works only while every import stays deferred, and breaks as soon as one moves up."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules that `path` imports (any depth of the tree, relative or absolute)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # "from pkg import mod" imports the module pkg.mod when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def import_graph(packages=("piip", "piip_kernels")) -> dict[str, set[str]]:
    files = [p for pkg in packages for p in (ROOT / pkg).rglob("*.py")]
    known = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, _module_name(p), known) for p in files}
    # A package's __init__ importing its own submodules is how packages are built, not a cycle.
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "piip.layers.projector" in graph["piip.models.piip"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def _top_level_imports(path: Path) -> set[str]:
    """Top-level package names a module imports when it is imported (module level, not
    inside functions or classes)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_only_piip_hf_imports_transformers():
    """transformers is a peer of piip.hf only: no other module of either package imports it
    when imported, and piip's __init__ does not import piip.hf."""
    users = sorted(_module_name(p) for pkg in ("piip", "piip_kernels") for p in (ROOT / pkg).rglob("*.py")
                   if "transformers" in _top_level_imports(p))
    assert users and all(m == "piip.hf" or m.startswith("piip.hf.") for m in users), users
    assert "piip.hf" not in import_graph()["piip"]


def test_import_piip_leaves_transformers_unimported():
    import subprocess
    import sys

    code = ("import sys, piip, piip_kernels, piip_kernels.hf; assert 'transformers' not in sys.modules, 'piip imported transformers'; "
            "import piip.hf; from transformers import AutoConfig; assert type(AutoConfig.for_model('piip', preset="
            "'mask_rcnn_deit_vit_b_fpn_1x_coco_bs16')).__name__ == 'PIIPBackboneConfig'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
