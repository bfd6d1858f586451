"""The shape of the code base (DESIGN: imports flow one way, no cycles; strategy files stay short;
the code cites papers or docs/, never files a user who clones recrl does not have)."""

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "fastdecode", "algorithms", "rewards", "models", "experiments")
# what each package may import from the project (itself included)
ALLOWED = {
    "engine": {"engine"},
    "fastdecode": {"fastdecode", "engine"},
    "algorithms": {"algorithms", "engine"},
    "rewards": {"rewards"},
    "models": {"models", "engine"},
    "experiments": set(PACKAGES),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at module level or inside functions."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


def source_files():
    return [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]


def test_no_import_cycles():
    modules = {module_name(path): path for path in source_files()}
    graph = {name: {imported for imported in project_imports(path) if imported in modules and imported != name}
             for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name, stack):
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycle = stack[stack.index(imported):] + [imported]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, stack + [imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_imports_flow_one_way():
    for path in source_files():
        package = module_name(path).split(".")[0]
        for imported in project_imports(path):
            assert imported.split(".")[0] in ALLOWED[package], f"{path.relative_to(ROOT)} imports {imported}"


def code_lines_after_docstring(path: Path) -> int:
    """Lines holding code: not blank, not comments, not the module docstring."""
    tree = ast.parse(path.read_text())
    docstring_end = tree.body[0].end_lineno if tree.body and isinstance(tree.body[0], ast.Expr) else 0
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER) and token.start[0] > docstring_end:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines)


@pytest.mark.parametrize("path", sorted((ROOT / "algorithms").glob("*.py")), ids=lambda path: path.name)
def test_strategy_files_stay_short(path):
    assert code_lines_after_docstring(path) <= 150


def test_citations_stay_inside_the_repository():
    outside = ("shared/reference", "../shared", "reference/rank_grpo", "recpo_rerec.md", "gr2_dapo_gspo.md",
               "rl_engine_anchors.md", "/work/")
    for path in [*source_files(), *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "docs").glob("*.md")),
                 ROOT / "README.md"]:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        for needle in outside:
            assert needle not in text, f"{path.relative_to(ROOT)} points outside the repository: {needle!r}"
