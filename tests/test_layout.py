"""raytl's layers: each package imports only from the layers below it (or its own), so that the code reads
bottom up and a change low down is seen by what sits above it, never the other way round."""

from __future__ import annotations

import ast
import pathlib

import raytl

PACKAGE = pathlib.Path(raytl.__file__).parent

# Lowest first. A module may import raytl modules of its own layer and of the layers before it.
LAYERS = [
    {"errors", "version"},
    {"config"},
    {"files"},  # storage, parts, embeddings, OUTPUT folders
    {"vision"},  # preprocessing, JPEG on the GPU, backbones
    {"corpus"},  # image corpora: folders, manifests, archives, shards
    {"modeling"},  # MODEL_DIR, the probe, the network, the training core: Ray-free
    {"reporting"},  # logs, the report, tracking
    {"cluster"},  # Ray: the session, the pipeline and its actors, the Ray Train loop
    {"commands"},  # one module a verb
    {"cli", "__init__", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.startswith("raytl.") else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "raytl":
            found += [
                f"{node.module}.{a.name}" if node.module == "raytl" else node.module for a in node.names
            ]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "raytl"]
    return found


def test_every_module_sits_in_a_layer_and_imports_only_downwards():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("raytl", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        own = _layer(module)
        for imported in _imports(path):
            assert imported != "raytl", f"{module} imports raytl itself (take what it needs from its module)"
            if _layer(imported) > own:
                wrong.append(f"{module} -> {imported}")
    assert wrong == []


def test_the_layers_are_the_packages():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert packages | modules == set().union(*LAYERS)
