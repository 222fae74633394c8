"""Code-shape rules of the "one home" design, checked on the library's source."""

import ast
import pathlib

from jaxcircuits.interventions import sites

LIB = pathlib.Path(__file__).resolve().parent.parent / "jaxcircuits"


def _modules():
    return [(p, ast.parse(p.read_text())) for p in sorted(LIB.rglob("*.py"))]


def test_sites_are_listed_only_in_the_registry():
    """No module but sites.py holds a tuple/list/set/dict of three or more site names, except as the
    entries a run collects (a `collect=` / `sites=` argument: a use, not a list of sites),
    `dictionaries.core.HOSTS` (where a dictionary reads and writes: models/ reads it, below sites) and
    a run's per-site rules (a dict assigned to a name ending in `_SITE_RULES`: what that run does at
    the sites it changes, a use)."""
    names = set(sites.NAMES)
    offenders = []
    for path, tree in _modules():
        if path.name == "sites.py":
            continue
        uses = {id(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords
                if k.arg in ("collect", "sites")}
        uses |= {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)
                 and getattr(n.target, "id", None) == "HOSTS" and path.parent.name == "dictionaries"}
        uses |= {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
                 and any(getattr(t, "id", "").endswith("_SITE_RULES") for t in n.targets)}
        for node in ast.walk(tree):
            if id(node) in uses:
                continue
            elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and elts:
                listed = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in names}
                if len(listed) >= 3:
                    offenders.append(f"{path.relative_to(LIB)}:{node.lineno} {sorted(listed)}")
    assert not offenders, offenders


def test_no_function_takes_more_than_eight_parameters():
    """No function takes more than 8 parameters (self and cls aside): group options in a struct."""
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
            params = [p for p in params if p.arg not in ("self", "cls")]
            if len(params) > 8:
                offenders.append(f"{path.relative_to(LIB)}:{node.lineno} {node.name} ({len(params)})")
    assert not offenders, offenders


def test_no_model_family_switch():
    """Model behaviour follows config features: no `cfg.family`, and `cfg.checkpoint` (the HF tensor
    naming) is read only by the loaders."""
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("family", "checkpoint") and \
                    isinstance(node.value, ast.Name) and node.value.id == "cfg":
                assert node.attr == "checkpoint" and path.parent.name == "weights", f"{path}:{node.lineno}"


def test_no_study_imports_another_study():
    """A module under studies/ imports no other study: what studies share lives in the kit."""
    studies = {p.stem for p in (LIB / "studies").glob("*.py")} - {"__init__", "kit"}
    offenders = []
    for path, tree in _modules():
        if path.parent.name != "studies":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = ".".join(filter(None, ["jaxcircuits.studies" if node.level else "", node.module]))
                names = [f"{module}.{a.name}" for a in node.names] + [module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            hit = {n.split(".")[2] for n in names if n.startswith("jaxcircuits.studies.")} & (studies - {path.stem})
            if hit:
                offenders.append(f"{path.relative_to(LIB)}:{node.lineno} {sorted(hit)}")
    assert not offenders, offenders


# The subpackages along the data's way: each may import the ones before it, the shared modules, and
# the top-level modules at or before its layer.
LAYERS = ("models", "weights", "interventions", "stats", "engine", "dictionaries", "methods", "reports", "tasks",
          "studies")
# dictionaries.core (a sparse dictionary's math, imported by models/ for splices) imports only checks.
SHARED = {"checks", "logs", "storage", "dictionaries.core"}
TOP_LEVEL = {"bundle": "interventions"}          # jc.load's Model: params, config, tokenizer, hook names


def _imported_packages(tree) -> set:
    """The jaxcircuits subpackages or top-level modules a module imports ('' for the package itself)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxcircuits") and not node.level:
            parts = node.module.split(".")
            module = ".".join(parts[1:3])
            out |= {module if module in SHARED else parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jaxcircuits.")}
    return out


def test_subpackages_import_only_the_layers_before_them():
    """models <- weights <- interventions <- stats <- engine <- dictionaries <- methods <- reports <- tasks <- studies:
    no subpackage imports a later one (the arrows point one way)."""
    offenders = []
    for path, tree in _modules():
        rel = path.relative_to(LIB).parts
        if len(rel) < 2 or rel[0] not in LAYERS:
            continue
        allowed = set(LAYERS[:LAYERS.index(rel[0]) + 1]) | SHARED
        allowed |= {m for m, layer in TOP_LEVEL.items() if LAYERS.index(layer) < LAYERS.index(rel[0])}
        bad = _imported_packages(tree) - allowed
        if bad:
            offenders.append(f"{'/'.join(rel)} imports {sorted(bad)}")
    assert not offenders, offenders


def test_shared_modules_import_only_shared_modules():
    """The shared modules (`SHARED`) import no subpackage but each other: every layer may import them."""
    offenders = []
    for path, tree in _modules():
        name = ".".join(path.relative_to(LIB).with_suffix("").parts)
        bad = _imported_packages(tree) - SHARED if name in SHARED else set()
        if bad:
            offenders.append(f"{name} imports {sorted(bad)}")
    assert not offenders, offenders
