"""The structure DESIGN.md draws, checked on the sources: imports point one way with no cycles
(top-level or inside functions), and each pass touches only the compile state it declares."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"patchc": ROOT / "patchc", "patchc.passes": ROOT / "passes", "patchc.codegen": ROOT / "codegen"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg] + parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every patchc module ``name`` imports, at the top or inside a function."""
    base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module
            if node.level:
                b = base
                for _ in range(node.level - 1):
                    b = b.rsplit(".", 1)[0]
                mod = f"{b}.{node.module}" if node.module else b
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}


GRAPH = nx.DiGraph([(a, b) for a, p in MODULES.items() for b in _imports(a, p)])
GRAPH.add_nodes_from(MODULES)


def _cycles(keep) -> list:
    return [c for c in nx.simple_cycles(GRAPH.subgraph([m for m in MODULES if keep(m)]))]


def test_no_import_cycles_outside_codegen():
    cycles = _cycles(lambda m: not m.startswith("patchc.codegen"))
    assert not cycles, f"import cycles: {cycles}"


def test_no_import_cycles_in_codegen():
    cycles = _cycles(lambda m: m.startswith("patchc.codegen"))
    assert not cycles, f"import cycles: {cycles}"


def _reaches(src_prefix: str, dst_prefixes) -> list:
    return sorted((a, b) for a, b in GRAPH.edges
                  if a.startswith(src_prefix) and any(b == d or b.startswith(d + ".") for d in dst_prefixes))


def test_imports_point_the_way_design_md_draws():
    # codegen: cost model, rendering and kernels; never the runtime, the passes or the front end
    assert not _reaches("patchc.codegen", ["patchc.runtime", "patchc.ops", "patchc.passes", "patchc.backend",
                                           "patchc.api", "patchc.learn", "patchc.release"])
    # passes: never the front end or learning
    assert not _reaches("patchc.passes", ["patchc.backend", "patchc.api", "patchc.learn", "patchc.cli"])
    # learning needs neither Triton nor dynamo: only the leaves
    assert not _reaches("patchc.learn", ["patchc.codegen", "patchc.passes", "patchc.runtime", "patchc.ops",
                                         "patchc.backend", "patchc.api", "patchc.release"])
    # the core never imports learning (only the command line does)
    core = [m for m in MODULES if not m.startswith(("patchc.learn", "patchc.cli", "patchc.demo"))]
    assert not [(a, b) for a, b in GRAPH.edges if a in core and b.startswith("patchc.learn")]


def test_no_pass_imports_another_pass():
    from patchc.passes import PIPELINE
    passes = {f"patchc.passes.{p.__module__.rsplit('.', 1)[1]}" for p in PIPELINE}
    assert not [(a, b) for a, b in GRAPH.edges if a in passes and b in passes]


# ---- declared pass contracts -------------------------------------------------------------------------
def _touched(path: Path, names: set[str]) -> tuple[set[str], set[str]]:
    """(read, written) field names of ``names`` accessed as ``x.field`` in a module."""
    read, written = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in names:
            (written if isinstance(node.ctx, ast.Store) else read).add(node.attr)
    return read, written


def test_each_pass_touches_only_the_state_it_declares():
    from patchc.passes import PIPELINE
    from patchc.passes.state import FIELDS
    fields = {f.split(".")[-1] for f in FIELDS}
    for p in PIPELINE:
        declared = {f.split(".")[-1] for f in p.reads + p.writes}
        wrote = {f.split(".")[-1] for f in p.writes}
        path = MODULES[p.__module__]
        read, written = _touched(path, fields)
        assert read <= declared | wrote, f"{p.__name__} reads undeclared {sorted(read - declared)}"
        assert written <= wrote, f"{p.__name__} writes undeclared {sorted(written - wrote)}"


def test_the_pipeline_reads_only_what_earlier_passes_wrote():
    from patchc.passes import PIPELINE
    inputs = {"gm", "example_inputs", "config", "plan", "model", "graph_id"}
    have = set(inputs)
    for p in PIPELINE:
        missing = [f for f in p.reads if f not in have and not f.startswith("group.")]
        assert not missing, f"{p.__name__} reads {missing} before any pass writes them"
        have |= set(p.writes)
