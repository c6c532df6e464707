"""The scripts are self-contained on purpose; these tests keep their shared copies from drifting."""

import ast
import difflib
import math
import os

import pytest
import torch

from conftest import ROOT

# What mappo_hyper_vmas.py may change relative to ippo_hyper_vmas.py: the centralised critic.
ALLOWED_VMAS_DIFFERENCES = {"critic_input", "Args", "CHECKPOINT_FORMAT"}
MAX_CHANGED_VMAS_LINES = 40
# Pieces every script copies verbatim from ippo_hyper_vmas.py (the canonical copy).
HYPERNETWORKS = ["layer_init", "layer_shapes", "num_target_params", "target_init_vector", "unflatten_params",
                 "batched_mlp", "LinearHypernet", "MLPHypernet"]
METRICS = ["js_distance_categorical", "js_distance_gaussian", "system_neural_diversity",
           "gradient_variance_and_norm", "gradient_interference"]
COPIES = {
    # The matrix games have no observation: their hypernetworks and batched_mlp are pinned by behaviour, below.
    "reinforce_matrix_games": ["layer_shapes", "num_target_params", "target_init_vector", "unflatten_params",
                               "js_distance_categorical", "flags_given", "new_run_folder", "duration"],
    # batched_mlp: MaMuJoCo's PerAgentMLP interleaves HARL's LayerNorms with the layers instead
    "mappo_hyper_mamujoco": [p for p in HYPERNETWORKS if p != "batched_mlp"] + METRICS + ["SharedNet", "IndependentNets", "compute_gae", "parse_args",
                                                       "flags_given", "read_command_line", "StopOnSignal",
                                                       "new_run_folder", "duration"],
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


def test_mappo_differs_from_ippo_only_in_the_critic():
    ippo, mappo = top_level_sources("ippo_hyper_vmas"), top_level_sources("mappo_hyper_vmas")
    assert set(ippo) == set(mappo)
    differing = {name for name in ippo if ippo[name] != mappo[name]}
    assert differing <= ALLOWED_VMAS_DIFFERENCES, differing - ALLOWED_VMAS_DIFFERENCES
    assert "critic_input" in differing


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
