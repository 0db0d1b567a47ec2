"""The package's layers, as each subpackage's `__init__` docstring states them: what every
module under cas_jax/ may import of cas_jax, and no private name reached across modules.
Read from the source with `ast` (every import, at module level or inside a function). And the
README's layout table lists the tree as it is."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "cas_jax"
UTILITIES = {"progress", "config_flags", "distributed"}
SUBPACKAGES = {"model", "documents", "cartridges", "training", "evaluation", "interop", "serving",
               "studies"}

# What each part may import besides itself; "utilities" are the top-level modules.
ALLOWED = {
    "model": set(),
    "documents": {"utilities"},
    "cartridges": {"model"},
    "training": {"model", "documents", "cartridges", "utilities"},
    "evaluation": {"model", "documents", "cartridges", "utilities"},
    "interop": {"model", "cartridges", "training", "utilities"},
    "serving": {"model", "documents", "cartridges", "utilities"},
    "studies": {"model", "documents", "cartridges", "training", "evaluation", "interop",
                "utilities"},
    "utilities": set(),
    "face": {"model", "cartridges"},  # cas_jax/__init__.py: the library API
}


def _modules():
    """(dotted name, part, path) of every module under cas_jax/."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        if len(parts) == 1:
            part = "face"
        elif parts[1] in SUBPACKAGES:
            part = parts[1]
        else:
            assert parts[1] in UTILITIES, f"{path}: a top-level module that is not a utility"
            part = "utilities"
        yield name, part, path


def _part_of(module: str) -> str:
    """The part a dotted cas_jax module (or `cas_jax` itself) belongs to."""
    parts = module.split(".")
    if len(parts) == 1:
        return "face"
    return parts[1] if parts[1] in SUBPACKAGES else "utilities"


def _imports(tree: ast.AST):
    """(imported cas_jax module, names imported from it or None, line) of every import."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "cas_jax" or a.name.startswith("cas_jax."):
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "cas_jax" or node.module.startswith("cas_jax.")):
            yield node.module, [a.name for a in node.names], node.lineno


def _targets(module: str, names):
    """The cas_jax modules an import statement reads: a package's submodules where it names
    them, else the module itself."""
    if names is None:
        return [module]
    out = []
    for n in names:
        sub = module + "." + n
        is_module = (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() or \
            (ROOT.parent / sub.replace(".", "/") / "__init__.py").exists()
        out.append(sub if is_module else module)
    return out


def layer_violations(sources) -> list[str]:
    """Imports that break ALLOWED, for (name, part, source text) triples."""
    bad = []
    for name, part, text in sources:
        for module, names, line in _imports(ast.parse(text)):
            for target in _targets(module, names):
                other = _part_of(target)
                if other != part and other not in ALLOWED[part]:
                    bad.append(f"{name}:{line}: {part} imports {target} ({other})")
    return bad


def private_uses(sources) -> list[str]:
    """Private names of one cas_jax module used by another: imported by name, or read as an
    attribute of a cas_jax module imported under a local name."""
    bad = []
    for name, _, text in sources:
        tree = ast.parse(text)
        module_names = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and (
                    node.module == "cas_jax" or node.module.startswith("cas_jax.")):
                for a in node.names:
                    if a.name.startswith("_"):
                        bad.append(f"{name}:{node.lineno}: imports {node.module}.{a.name}")
                    target = _targets(node.module, [a.name])[0]
                    if target != node.module:
                        module_names[a.asname or a.name] = target
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("cas_jax.") and a.asname:
                        module_names[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_names and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{name}:{node.lineno}: reads {module_names[node.value.id]}."
                           f"{node.attr}")
    return bad


def _sources():
    return [(name, part, path.read_text()) for name, part, path in _modules()]


def test_every_subpackage_is_a_part_with_a_docstring_naming_its_imports():
    for pkg in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text()))
        assert doc and "May import:" in doc, pkg
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} \
        == SUBPACKAGES


def test_imports_follow_the_layers():
    assert layer_violations(_sources()) == []


def test_no_private_name_is_used_across_modules():
    assert private_uses(_sources()) == []


@pytest.mark.parametrize("part, text, found", [
    ("model", "from cas_jax.cartridges import attention\n", "model imports"),
    ("model", "def f():\n    from cas_jax import progress\n", "model imports cas_jax.progress"),
    ("cartridges", "from cas_jax.training.train import TrainConfig\n", "(training)"),
    ("serving", "import cas_jax.evaluation.scoring\n", "(evaluation)"),
])
def test_the_layer_check_finds_a_forbidden_import(part, text, found):
    bad = layer_violations([("cas_jax.x.y", part, text)])
    assert len(bad) == 1 and found in bad[0]


@pytest.mark.parametrize("text", [
    "from cas_jax.model.llama import _layer\n",
    "from cas_jax.model import llama as model_lib\nmodel_lib._linear(1)\n",
    "import cas_jax.model.sampling as s\ns._generate\n",
])
def test_the_private_check_finds_a_private_name(text):
    assert len(private_uses([("cas_jax.x.y", "cartridges", text)])) == 1


def test_the_readme_layout_table_names_every_module():
    """Each package row of the README's layout table lists exactly that package's modules."""
    readme = (ROOT.parent / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`cas_jax/"):
            pkg = cells[0].split("`")[1].rstrip("/").split("/")
            rows[pkg[1] if len(pkg) > 1 else "utilities"] = set(
                re.findall(r"`([a-z_]+)`", cells[1]))
    tree = {pkg: {p.stem for p in (ROOT / pkg).glob("*.py") if p.stem != "__init__"}
            for pkg in SUBPACKAGES}
    tree["utilities"] = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert rows == tree
