"""The package's shape, checked: one module talks across processes, classes stay small, and
the modules that hold a concept are where their names say."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cde_jax"
CONVERT = Path(__file__).resolve().parents[1] / "convert"
SOURCES = sorted(p for root in (PACKAGE, CONVERT) for p in root.rglob("*.py")
                 if "data" not in p.relative_to(root).parts[:1])
# The one module allowed past JAX's public API (tests/test_jax_compat.py checks what it uses).
JAX_COMPAT = PACKAGE / "_jax_compat.py"
CROSS_PROCESS = ("process_index", "process_count", "process_allgather",
                 "make_array_from_process_local_data", "sync_global_devices")


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_only_distributed_talks_across_processes(path):
    """`distributed.py` owns every cross-process operation: no other module imports
    `multihost_utils` or asks JAX for the process index or count itself."""
    if path == PACKAGE / "distributed.py":
        return
    found = []
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and any(
                "multihost_utils" in name for name in [node.module, *(a.name for a in node.names)]):
            found.append(f"line {node.lineno}: imports multihost_utils")
        if isinstance(node, ast.Attribute) and node.attr in CROSS_PROCESS \
                and isinstance(node.value, (ast.Name, ast.Attribute)) \
                and ast.unparse(node.value) in ("jax", "multihost_utils"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not found, found


def private_jax(node: ast.AST) -> bool:
    """`import jax._src...`, `from jax._src... import`, `from jax import _src`, `jax._src.x`,
    or jaxlib's modules (jax's internals too)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    elif isinstance(node, ast.Attribute) and node.attr == "_src":
        names = [ast.unparse(node)]
    else:
        return False
    return any(n.startswith(("jax._src", "jaxlib")) for n in names)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_only_the_compat_module_uses_jax_internals(path):
    """JAX's internals change without notice: one module (`_jax_compat`) reaches them, and
    its own test fails on a jax release it was not checked against."""
    found = [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree(path))
             if private_jax(node)]
    if path == JAX_COMPAT:
        assert found, "_jax_compat no longer needs jax's internals: remove it"
    else:
        assert not found, found


def imported_modules(path: Path) -> set[str]:
    """The cde_jax modules `path` imports (relative imports resolved)."""
    package = ["cde_jax", *path.relative_to(PACKAGE).parts[:-1]] if PACKAGE in path.parents \
        else ["cde_jax", "convert"]
    found = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level \
                else node.module
            base = f"{base}.{node.module}" if node.level and node.module else base
            found |= {base, *(f"{base}.{a.name}" for a in node.names)}
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_runtime_never_imports_the_aot_tooling(path):
    """`aot` and `hlo` (regex reading of optimized HLO text, guarded by tests/test_hlo.py)
    are offline tooling of the `aot` extra: loading, embedding, training and serving never
    import them."""
    allowed = {PACKAGE / "aot.py": {"cde_jax.hlo"}}.get(path, set())
    assert not (imported_modules(path) & {"cde_jax.aot", "cde_jax.hlo"}) - allowed


def test_no_two_modules_import_each_other():
    """Imports run one way (text_api -> context, never back, not even for type checking);
    a package's `__init__` re-exporting its modules is not a circle."""
    modules = {}
    for path in SOURCES:
        root, parts = (CONVERT, ["cde_jax", "convert"]) if CONVERT in path.parents \
            else (PACKAGE, ["cde_jax"])
        if path.name != "__init__.py":
            modules[".".join([*parts, *path.relative_to(root).with_suffix("").parts])] = path
    imports = {name: imported_modules(path) & modules.keys() - {name}
               for name, path in modules.items()}
    circles = sorted((a, b) for a in imports for b in imports[a] if a < b and a in imports[b])
    assert not circles, circles


def test_readme_is_a_users_path():
    """README.md stays short (history goes to CHANGELOG.md, details to docs/), and no test
    helper is installed with the package."""
    assert len((PACKAGE.parent / "README.md").read_text().splitlines()) <= 350
    assert not (PACKAGE / "testing").exists()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_no_class_over_130_lines(path):
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree(path))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 130]
    assert not long, long


def test_the_layout_names_the_architecture():
    """File names alone point to the runner, the text API, the context, the attention
    registry, the sharding rules, the key map and the cross-process module."""
    for name in ("runner.py", "text_api.py", "context.py", "attention.py", "sharding.py",
                 "distributed.py", "outputs.py", "buckets.py"):
        assert (PACKAGE / name).is_file(), name
    assert (CONVERT / "keymap.py").is_file()
