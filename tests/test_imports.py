"""The package's imports flow one way: no module reaches back to one that reaches it (imports
inside functions count too), and the shared ground (data, models, prompts, extract, artifacts,
settings) imports no capability. Read from the source with ``ast``; nothing is imported."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "helpers"
GROUND = {"helpers.data", "helpers.models", "helpers.prompts", "helpers.extract", "helpers.artifacts",
          "helpers.settings"}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (f, is_package)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name imported from a package counts as its
    submodule when there is one, else as the package)."""
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    where = ".".join(base + ([node.module] if node.module else []))
                else:
                    where = node.module or ""
                targets |= {f"{where}.{a.name}" if f"{where}.{a.name}" in modules else where for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, path = [], {}, []

    def visit(u):
        state[u] = "open"
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def test_the_graph_reader_sees_a_circle_where_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_imports_flow_one_way():
    graph = import_graph()
    assert {"helpers.kd.distill", "helpers.kd.on_policy", "helpers.backends.vllm_engine"} <= set(graph)
    assert "helpers.backends.transformers_engine" in graph["helpers.kd.on_policy"]  # imports inside functions count
    assert cycles(graph) == []


def test_the_ground_imports_no_capability():
    graph = import_graph()
    for module in GROUND:
        assert graph[module] <= GROUND | {"helpers"}, (module, graph[module] - GROUND)


def test_co_llm_and_the_benchmark_read_one_way_inside():
    graph = import_graph()

    def inside(module, package):
        return {t for t in graph[module] if t.startswith(package + ".")}

    # Co-LLM: head <- train <- threshold <- decode; report stands alone
    below = {"head": set(), "train": {"head"}, "threshold": {"head", "train"},
             "decode": {"head", "train", "threshold"}, "report": set()}
    assert {m for m in graph if m.startswith("helpers.collm.")} == {f"helpers.collm.{m}" for m in below}
    for module, allowed in below.items():
        assert inside(f"helpers.collm.{module}", "helpers.collm") <= {f"helpers.collm.{m}" for m in allowed}, module
    # the benchmark: each capability's entries use only ``common``, the runner uses the entries, and
    # nothing outside the benchmark imports it
    bench = {m for m in graph if m.startswith("helpers.bench.")}
    assert {"helpers.bench.runner", "helpers.bench.common", "helpers.bench.__main__"} < bench
    for module in bench - {"helpers.bench.runner", "helpers.bench.__main__"}:
        assert inside(module, "helpers.bench") <= {"helpers.bench.common"}, module
    assert inside("helpers.bench.__main__", "helpers.bench") == {"helpers.bench.runner"}
    outside = {m: t for m, ts in graph.items() if not m.startswith("helpers.bench") for t in ts
               if t == "helpers.bench" or t.startswith("helpers.bench.")}
    assert outside == {}
