"""The package's shape: imports flow one way, modules stay small enough to read."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).parent.parent
PACKAGES = ('sdtl_jax', 'bench')
MAX_LINES = 450


def _modules():
    """{dotted module name: path} for every module of the package and the benchmarks."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob('*.py')):
            parts = path.relative_to(ROOT).with_suffix('').parts
            found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return found


def _imports(path: pathlib.Path, modules) -> set[str]:
    """The package modules `path` imports, anywhere in it (in a function too: a lazy import is
    still a dependency). `from pkg import name` counts as pkg.name when that is a module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules
                     else node.module for alias in node.names]
        else:
            continue
        out |= {name for name in names if name in modules}
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert 'sdtl_jax.train' in graph['sdtl_jax.experiment']
    assert 'bench.torch_step' in graph['bench.measure_step']    # imported inside main()


def test_cycle_finder_finds_a_cycle():
    assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_modules_fit_the_size_limit():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_a_run_never_imports_the_code_that_builds_datasets():
    """sdtl_jax/datasets/ (importers, generator, demo builder) imports sdtl_jax/data/, never the
    other way: the one exception builds the demo data on first use, inside the function."""
    graph = import_graph()
    users = {name: sorted(m for m in deps if m.startswith('sdtl_jax.datasets'))
             for name, deps in graph.items()
             if name.startswith('sdtl_jax.') and not name.startswith('sdtl_jax.datasets')}
    assert {name: deps for name, deps in users.items() if deps} == {
        'sdtl_jax.data.sources': ['sdtl_jax.datasets.digits']}
    source = (ROOT / 'sdtl_jax/data/sources.py').read_text()
    top_level = [node for node in ast.parse(source).body
                 if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not any('datasets' in ast.unparse(node) for node in top_level)
