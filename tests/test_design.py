"""The design: the scripts are self-contained on purpose, so these tests keep their shared copies from
drifting (mappo_hyper_vmas.py is ippo_hyper_vmas.py but for its critic); hypermarl_extras.py is a library
that imports no script; DiCo, a baseline from another paper, stays in dico.py."""

import ast
import dataclasses
import difflib
import importlib
import math
import os
import re

import pytest
import torch

from conftest import ROOT, VMAS_SCRIPTS

SCRIPTS = ["ippo_hyper_vmas", "mappo_hyper_vmas", "mappo_hyper_mamujoco", "reinforce_matrix_games", "ippo_hyper_smax",
           "mappo_hyper_smax"]
MODULES = SCRIPTS + ["dico", "hypermarl_extras"]

# What mappo_hyper_vmas.py may change relative to ippo_hyper_vmas.py: the centralised critic.
ALLOWED_VMAS_DIFFERENCES = {"critic_input", "Args", "ALGO"}
# What mappo_hyper_smax.py may change relative to ippo_hyper_smax.py: the critic's own trunk on the world state
# (Agent), Table 22-23's MAPPO values, and the authors' two optimisers, each clipping its own gradient.
ALLOWED_SMAX_DIFFERENCES = {"Agent", "Args", "MAPS", "gradient_step", "ALGO"}
MAX_CHANGED_SMAX_LINES = 90
MAX_CHANGED_VMAS_LINES = 40
# Pieces every script copies verbatim from ippo_hyper_vmas.py (the canonical copy).
HYPERNETWORKS = ["layer_init", "layer_shapes", "num_target_params", "target_init_vector", "unflatten_params",
                 "batched_mlp", "lecun_normal_", "LinearHypernet", "MLPHypernet"]
METRICS = ["js_distance_categorical", "js_distance_gaussian", "system_neural_diversity",
           "gradient_variance_and_norm", "gradient_interference"]
COPIES = {
    # The matrix games have no observation: their hypernetworks and batched_mlp are pinned by behaviour, below.
    "reinforce_matrix_games": ["layer_shapes", "num_target_params", "target_init_vector", "unflatten_params",
                               "js_distance_categorical", "flags_given", "duration"],
    # batched_mlp: MaMuJoCo's PerAgentMLP interleaves HARL's LayerNorms with the layers instead; its actions are
    # continuous, so its SND compares Gaussians only (on the action dimensions every agent has).
    "mappo_hyper_mamujoco": [p for p in HYPERNETWORKS if p != "batched_mlp"] + [
        "js_distance_gaussian", "gradient_variance_and_norm", "gradient_interference", "SharedNet", "IndependentNets",
        "compute_gae", "parse_args", "flags_given", "read_command_line", "check_args", "duration", "family_net",
        "clip_grad_per_agent"],
    # SMAX: the recurrent trunk and its sequences are its own; the heads, the update's pieces and the checks are IPPO's.
    # gradient_step: VMAS's is the one --compile fuses, which SMAX does not have (its docstring says so).
    "ippo_hyper_smax": HYPERNETWORKS + ["SharedNet", "IndependentNets", "family_net", "Weights", "compute_gae",
                                        "clip_grad_per_agent", "js_distance_categorical",
                                        "gradient_variance_and_norm", "flags_given", "duration"],
}


def top_level_sources(name):
    path = os.path.join(ROOT, f"{name}.py")
    text = open(path).read()
    tree = ast.parse(text)
    sources = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            sources[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            sources[node.targets[0].id] = ast.get_source_segment(text, node)
    return sources


@pytest.mark.smoke
@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name):
    """The installation works: each training script and its two modules import (VMAS, MuJoCo, tyro...)."""
    module = importlib.import_module(name)
    assert module.__doc__


@pytest.mark.smoke
def test_mappo_differs_from_ippo_only_in_the_critic():
    ippo, mappo = top_level_sources("ippo_hyper_vmas"), top_level_sources("mappo_hyper_vmas")
    assert set(ippo) == set(mappo)
    differing = {name for name in ippo if ippo[name] != mappo[name]}
    assert differing <= ALLOWED_VMAS_DIFFERENCES, differing - ALLOWED_VMAS_DIFFERENCES
    assert "critic_input" in differing


def test_smax_mappo_differs_from_ippo_only_in_the_agent_and_its_values():
    ippo, mappo = top_level_sources("ippo_hyper_smax"), top_level_sources("mappo_hyper_smax")
    assert set(ippo) == set(mappo)
    differing = {name for name in ippo if ippo[name] != mappo[name]}
    assert differing <= ALLOWED_SMAX_DIFFERENCES, differing - ALLOWED_SMAX_DIFFERENCES
    ippo_lines, mappo_lines = (source(name).splitlines() for name in ("ippo_hyper_smax", "mappo_hyper_smax"))
    changed = sum(1 for line in difflib.unified_diff(ippo_lines, mappo_lines, lineterm="", n=0)
                  if line[:1] in "+-" and not line.startswith(("+++", "---")))
    assert changed <= MAX_CHANGED_SMAX_LINES, changed


def test_mappo_diff_is_small():
    ippo = open(os.path.join(ROOT, "ippo_hyper_vmas.py")).read().splitlines()
    mappo = open(os.path.join(ROOT, "mappo_hyper_vmas.py")).read().splitlines()
    changed = sum(1 for line in difflib.unified_diff(ippo, mappo, lineterm="", n=0)
                  if line[:1] in "+-" and not line.startswith(("+++", "---")))
    assert changed <= MAX_CHANGED_VMAS_LINES, changed


def test_mappo_args_have_the_same_fields_as_ippo():
    import dataclasses

    import ippo_hyper_vmas
    import mappo_hyper_vmas

    def fields(module):
        return [(f.name, str(f.type)) for f in dataclasses.fields(module.Args) if f.name != "exp_name"]

    assert fields(ippo_hyper_vmas) == fields(mappo_hyper_vmas)


@pytest.mark.parametrize("name", sorted(COPIES))
def test_copied_pieces_are_identical_to_the_canonical_ones(name):
    canonical, copy = top_level_sources("ippo_hyper_vmas"), top_level_sources(name)
    gone = [piece for piece in COPIES[name] if piece not in canonical]
    assert not gone, f"ippo_hyper_vmas.py has no {gone} any more: update COPIES"
    missing = [piece for piece in COPIES[name] if piece not in copy]
    assert not missing, f"{name}.py lacks {missing}"
    drifted = [piece for piece in COPIES[name] if copy[piece] != canonical[piece]]
    assert not drifted, f"{name}.py changed {drifted}: copy them from ippo_hyper_vmas.py"


@pytest.mark.parametrize("family", ["linear", "linear-no-bias", "mlp"])
def test_matrix_hypernetworks_are_ippos_without_observations(family):
    """Same seed, same parameters (names and values), same generated weights, same policy outputs."""
    import ippo_hyper_vmas as ippo
    import reinforce_matrix_games as mg

    sizes, gains = [1, 4, 3], [math.sqrt(2), 0.01]
    make = {"linear": lambda m, **kw: m.LinearHypernet(3, sizes, gains, shared_bias=True, **kw),
            "linear-no-bias": lambda m, **kw: m.LinearHypernet(3, sizes, gains, shared_bias=False, **kw),
            "mlp": lambda m, **kw: m.MLPHypernet(3, sizes, gains, 4, [8, 5], **kw)}[family]
    torch.manual_seed(0)
    canonical = make(ippo, init="scaled")
    torch.manual_seed(0)
    copy = make(mg)
    assert canonical.state_dict().keys() == copy.state_dict().keys()
    assert all(torch.equal(canonical.state_dict()[k], copy.state_dict()[k]) for k in canonical.state_dict())
    x = torch.randn(3, 7, 1)
    for (w1, b1), (w2, b2) in zip(canonical(), copy()):
        assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert torch.equal(ippo.batched_mlp(x, canonical(), torch.relu), mg.batched_mlp(x, copy(), torch.relu))


# ===== Design rules =====
def source(name):
    return open(os.path.join(ROOT, f"{name}.py")).read()


def imported_modules(tree):
    """Every module a source imports, anywhere in it: import statements, importlib.import_module and
    __import__ with a constant name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = ast.unparse(node.func)
            if function in ("importlib.import_module", "import_module", "__import__"):
                names.add(str(node.args[0].value).split(".")[0])
    return names


@pytest.mark.smoke
@pytest.mark.parametrize("name", MODULES)
def test_no_module_reaches_for_its_own_module_object(name):
    """A script never hands itself (sys.modules[__name__]) to another module: each call passes what it needs."""
    text = source(name)
    assert not re.search(r"sys\s*\.\s*modules\s*\[\s*__name__\s*\]", text)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "sys.modules":
            assert ast.unparse(node.slice) != "__name__", ast.unparse(node)


@pytest.mark.parametrize("name", ["hypermarl_extras", "dico"])
def test_the_library_and_the_baseline_import_no_script(name):
    """hypermarl_extras.py is a library (and dico.py a baseline handed its building blocks): neither
    imports a training script, each other or a benchmark."""
    imported = imported_modules(ast.parse(source(name)))
    assert not imported & set(MODULES + ["benchmark"]), imported & set(MODULES + ["benchmark"])


def test_the_library_keeps_no_scripts_tables():
    """What a script's checkpoints hold and what --resume may change are the script's (each script has
    its own): hypermarl_extras.py receives them, it names none of them."""
    text = source("hypermarl_extras")
    for name in ("COMPAT_FIELDS", "RESUME_MAY_CHANGE", "CHECKPOINT_KEYS"):
        assert not re.search(rf"\b{name}\b", text), name


@pytest.mark.parametrize("name", VMAS_SCRIPTS)
def test_dico_stays_in_its_module(name):
    """DiCo is a baseline from another paper: the VMAS scripts name it in a handful of lines (the flag's
    choices, its one flag and where that flag applies, the module to import)."""
    lines = [line for line in source(name).splitlines() if "dico" in line.lower()]
    assert len(lines) <= 6, lines


@pytest.mark.parametrize("name", VMAS_SCRIPTS + ["ippo_hyper_smax", "mappo_hyper_smax"])
def test_the_scripts_tables_name_their_own_flags(name):
    """Every flag in a VMAS or SMAX script's tables (checkpoints, --resume, ranges, families) is one of its Args."""
    script = importlib.import_module(name)
    fields = {f.name for f in dataclasses.fields(script.Args)}
    for table in ("MODEL_FIELDS", "RESUME_MAY_CHANGE", "NEEDS_EXTRAS", "POSITIVE", "SIZES", "FAMILY_FLAGS"):
        assert set(getattr(script, table, ())) <= fields, (table, set(getattr(script, table)) - fields)
    assert {"format", "args", "model", "optimizer"} <= set(script.CHECKPOINT_KEYS)
    assert not set(script.MODEL_FIELDS) & set(script.RESUME_MAY_CHANGE)  # the model never changes on --resume


def script_map_row(name, entry):
    """The README's row for a script: its lines, where its entry point and loop start, each section's lines."""
    lines = source(name).splitlines()
    marks = [(i + 1, re.match(r"# ===== (.*?)(?: \(|:| =====)", line).group(1))
             for i, line in enumerate(lines) if line.startswith("# ===== ")]
    start = next(i + 1 for i, line in enumerate(lines) if line.startswith(f"def {entry}("))
    loop = next(i + 1 for i, line in enumerate(lines)
                if i + 1 > start and re.match(r"\s+for (iteration|update) in range", line))
    ends = [line - 1 for line, _ in marks[1:]] + [len(lines)]
    parts = [f"docstring and imports 1-{marks[0][0] - 1}"] + [f"{title} {line}-{end}"
                                                             for (line, title), end in zip(marks, ends)]
    return f"| `{name}.py` | {len(lines)} | {start} (`{entry}`), {loop} (its loop) | {', '.join(parts)} |"


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_readmes_map_of_the_files_matches_the_scripts(name):
    """The README's table of lines and sections is the scripts' own (a script edited, its row follows)."""
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
    row = script_map_row(name, "train" if name == "reinforce_matrix_games" else "main")
    assert row in readme, row
