"""Tests for reinforce_matrix_games.py: payoffs, Theorem B.1, Table 8 parameter counts, --hypernet
linear (no shared bias) == NoPS, seed batching, a single run end to end, and bad input (from the
repository and from a copy of the script alone). The sweep (benchmark/matrix_games.py) and the
fidelity findings are in test_fidelity_matrix.py."""

import dataclasses
import functools
import itertools
import os
import re
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "reinforce_matrix_games.py")
sys.path.insert(0, REPO)

import reinforce_matrix_games as mg  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "benchmark"))
import matrix_games as bench  # noqa: E402  (the paper's values live with the sweep)
from conftest import HANG, run_alone  # noqa: E402
from conftest import matrix_args as make_args  # noqa: E402

HYPERNETS = typing.get_args(typing.get_type_hints(mg.Args)["hypernet"])
GAMES = typing.get_args(typing.get_type_hints(mg.Args)["game"])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one thread, restored after


# ----- payoffs -----
def test_two_player_payoff_matrices_are_table_1_and_its_inverse():
    spec = torch.tensor([[[mg.payoff("specialisation", torch.tensor([a, b]), 2)[0].item() for b in range(2)]
                          for a in range(2)]])
    sync = torch.tensor([[[mg.payoff("synchronisation", torch.tensor([a, b]), 2)[0].item() for b in range(2)]
                          for a in range(2)]])
    assert torch.equal(spec[0], torch.tensor([[0.5, 1.0], [1.0, 0.5]]))  # Table 1
    assert torch.equal(sync[0], torch.tensor([[1.0, 0.5], [0.5, 1.0]]))  # section 3.1: the inverse


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_n_player_payoffs(n):
    distinct = torch.randperm(n)
    same = torch.full((n,), n - 1)
    # Specialisation: unique choices get 1, all agents on one food get 1/n each.
    assert torch.allclose(mg.payoff("specialisation", distinct, n), torch.ones(n))
    assert torch.allclose(mg.payoff("specialisation", same, n), torch.full((n,), 1.0 / n))
    # Synchronisation: the reverse.
    assert torch.allclose(mg.payoff("synchronisation", same, n), torch.ones(n))
    assert torch.allclose(mg.payoff("synchronisation", distinct, n), torch.full((n,), 1.0 / n))
    # One agent deviating from the crowd: it is unique (1) in Specialisation, everyone gets 1/n in
    # Synchronisation; in Specialisation the other n-1 split their food (1 / (n-1)).
    deviate = same.clone()
    deviate[0] = 0
    spec = mg.payoff("specialisation", deviate, n)
    assert spec[0] == 1.0 and torch.allclose(spec[1:], torch.full((n - 1,), 1.0 / (n - 1)))
    assert torch.allclose(mg.payoff("synchronisation", deviate, n), torch.full((n,), 1.0 / n))
    # Batched input (..., n_agents) gives per-agent rewards of the same shape.
    batch = torch.stack([distinct, same, deviate]).unsqueeze(0)
    assert mg.payoff("specialisation", batch, n).shape == (1, 3, n)


@pytest.mark.parametrize("game", GAMES)
def test_expected_team_reward_matches_enumeration(game):
    n = 3
    probs = torch.softmax(torch.randn(n, n, generator=torch.Generator().manual_seed(0)), -1).double()
    total = 0.0
    for joint in itertools.product(range(n), repeat=n):
        p = np.prod([probs[i, a].item() for i, a in enumerate(joint)])
        total += p * mg.payoff(game, torch.tensor(joint), n).mean().item()
    assert abs(bench.expected_team_reward(game, probs).item() - total) < 1e-6  # payoffs are float32


# ----- Theorem B.1 -----
def test_theorem_b1_closed_form_on_a_grid():
    alphas = torch.linspace(0, 1, 1001, dtype=torch.float64)
    closed = -alphas ** 2 + alphas + 0.5  # Eq. (13): a shared policy with P(a = 0) = alpha
    probs = torch.stack([alphas, 1 - alphas], -1).unsqueeze(-2).expand(-1, 2, 2)  # both agents share alpha
    exact = bench.expected_team_reward("specialisation", probs)
    assert torch.allclose(closed, exact, atol=1e-12)  # Eq. (13) is the game's expected return
    assert closed.max() <= 0.75 + 1e-12
    assert abs(closed[500].item() - 0.75) < 1e-12  # maximum at alpha = 0.5


def test_trained_fups_stays_below_075_but_nops_does_not():
    args = make_args(num_trials=2000, eval_interval=2000)
    seeds = [1, 2, 3]
    fups = mg.train("specialisation", "fups-noid", 2, seeds, args)
    # Exact expected return of the learned shared policy: never above 0.75.
    with torch.no_grad():
        expected = bench.expected_team_reward("specialisation", torch.softmax(fups["population"].logits(), -1))
    assert expected.shape == (3,) and expected.max() <= 0.75 + 1e-6
    # Sampled evaluation (1000 trials, team reward in {0.5, 1}: std <= 0.25): within sampling error.
    se = 0.25 / np.sqrt(args.eval_trials)
    assert max(fups["sampled"]) <= 0.75 + 4 * se
    assert np.mean(fups["sampled"]) > 0.70  # and it does find the mixed optimum (alpha near 0.5)
    # The same budget lets independent policies beat the bound: the cap is FuPS's, not the evaluator's.
    nops = mg.train("specialisation", "nops", 2, seeds, args)
    assert min(nops["sampled"]) > 0.9


# ----- architectures -----
@pytest.mark.parametrize("hypernet", ["nops", "fups-noid", "fups"])
def test_parameter_counts_match_table_8(hypernet):
    args = make_args()
    assert bench.PAPER_PARAMS[hypernet] == {"nops": {2: 36, 4: 112, 8: 384}, "fups-noid": {2: 34, 4: 100, 8: 328},
                                            "fups": {2: 42, 4: 148, 8: 552}}[hypernet]  # Table 8
    for n, count in bench.PAPER_PARAMS[hypernet].items():
        assert mg.count_params(hypernet, n, args) == count


def test_linear_hypernet_without_shared_bias_is_nops():
    n, seeds = 4, [1, 2]
    args = make_args(hypernet="linear", hyper_linear_shared_bias=False, num_trials=250, eval_interval=250)
    assert mg.count_params("linear", n, args) == mg.count_params("nops", n, args)
    hyper = mg.Population("linear", n, seeds, args)
    nops = mg.Population("nops", n, seeds, args)
    with torch.no_grad():  # give NoPS the networks the hypernetwork generates
        generated = vmap_generate(hyper)
        for k, (weight, bias) in enumerate(generated):
            nops.params[f"weights.{k}"].copy_(weight)
            nops.params[f"biases.{k}"].copy_(bias)
        assert torch.allclose(hyper.logits(), nops.logits(), atol=1e-7)
    for game in GAMES:
        out_h = mg.train(game, "linear", n, seeds, args, pop=hyper)
        out_n = mg.train(game, "nops", n, seeds, args, pop=nops)
        # Same actions every update (same seeds, same probabilities) -> same SGD steps -> same policies.
        assert torch.allclose(hyper.logits(), nops.logits(), atol=1e-5)
        assert out_h["sampled"] == out_n["sampled"] and out_h["argmax"] == out_n["argmax"]
        assert np.allclose(out_h["grad_var"], out_n["grad_var"], rtol=1e-4)
        assert max(abs(x) for x in out_h["interference"]) < 1e-6  # disjoint rows of W: no interference


def vmap_generate(pop):
    from torch.func import functional_call, vmap

    prefix = "weight_net."
    return vmap(lambda p, b: functional_call(pop.base.weight_net, ({k[len(prefix):]: v for k, v in p.items()},
                                                                   {k[len(prefix):]: v for k, v in b.items()}), ()))(
        pop.params, {k: v for k, v in pop.buffers.items() if k.startswith(prefix)})


def test_shared_bias_couples_agents():
    # Negative control for the test above: with Eq. (5)'s shared bias the agents' gradients overlap.
    args = make_args(num_trials=200, eval_interval=200)
    out = mg.train("specialisation", "linear", 4, [1, 2], args)
    assert min(abs(x) for x in out["interference"]) > 1e-4
    # Eq. (5)'s shared bias b is one more agent's network: 2h + (h+1) n = 8 + 20 = 28 for h = n = 4
    assert mg.count_params("linear", 4, args) == mg.count_params("nops", 4, args) + 28


def test_seed_batching_does_not_change_a_seed():
    args = make_args(num_trials=300, eval_interval=300)
    alone = mg.train("specialisation", "mlp", 4, [2], args)
    batched = mg.train("specialisation", "mlp", 4, [1, 2], args)
    assert abs(alone["sampled"][0] - batched["sampled"][1]) < 1e-6
    assert abs(alone["grad_var"][0] - batched["grad_var"][1]) < 1e-6 * max(1.0, alone["grad_var"][0])


def test_evaluations_at_the_first_update_past_each_eval_interval():
    # 25 is not a multiple of the batch (10): each multiple of 25 is evaluated at the update that passes it
    out = mg.train("specialisation", "nops", 2, [1], make_args(num_trials=110, eval_interval=25))
    assert out["curve"]["trials"] == [0, 30, 50, 80, 100, 110]


# ----- end to end -----
def test_single_run_in_process(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = mg.main(["--hypernet", "fups", "--n-agents", "4", "--num-trials", "100", "--num-seeds", "2",
                    "--runs-dir", str(runs), "--save-model"])
    assert code == 0
    out = capsys.readouterr().out
    assert "parameters: fups 148" in out  # Table 8's FuPS+ID
    dirs = sorted(os.listdir(runs))
    assert len(dirs) == 2 and all(d.startswith("matrix_specialisation_n4__") and "__fups__" in d for d in dirs)
    assert all(any(f.startswith("events.out.tfevents") for f in os.listdir(runs / d)) for d in dirs)
    # --save-model: every seed's own final parameters, loadable without pickled code
    saved = [torch.load(runs / d / "model.pt", weights_only=True) for d in dirs]
    assert [s["seed"] for s in saved] == [1, 2] and saved[0]["args"]["hypernet"] == "fups"
    assert saved[0]["model"]["net.0.weight"].shape == (16, 4)
    assert not torch.equal(saved[0]["model"]["net.0.weight"], saved[1]["model"]["net.0.weight"])


def test_a_diverged_run_exits_1_and_saves_no_model(tmp_path, capsys):
    assert mg.main(["--learning-rate", "1e30", "--num-trials", "200", "--runs-dir", str(tmp_path), "--save-model"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: the loss became NaN/inf; use a smaller --learning-rate\n"
    assert "grad/actor_var=nan" in captured.out  # every seed's line still says which one diverged
    assert not list(tmp_path.rglob("model.pt"))


@pytest.mark.parametrize("argv, flag", [
    (["--n-agents", "1"], "--n-agents"),
    (["--num-trials", "0"], "--num-trials"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-trials", "5", "--batch-size", "10"], "--num-trials"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),  # NumPy seeds stop below 2**32
    (["--seed", str(2**32 - 1 - 10_000), "--num-seeds", "2"], "--num-seeds"),  # the last seed is past the range
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--exp-name", "../../x"], "--exp-name"),
    (["--exp-name", ""], "--exp-name"),
    (["--hypernet", "mlp", "--hypernet-hidden-dims", "0"], "--hypernet-hidden-dims"),
    (["--hypernet", "mlp", "--hypernet-embedding-dim", "0"], "--hypernet-embedding-dim"),
    # flags marked [family] in --help are refused with the other families, even given with their default
    (["--hypernet-embedding-dim", "8"], "--hypernet-embedding-dim"),
    (["--hypernet", "linear", "--hypernet-hidden-dims", "8"], "--hypernet-hidden-dims"),
    (["--hypernet", "mlp", "--no-hyper-linear-shared-bias"], "--no-hyper-linear-shared-bias"),
    (["--hypernet", "fups", "--hyper-linear-shared-bias"], "--hyper-linear-shared-bias"),
    (["--n-agents", "1000"], "--n-agents"),  # more memory than the machine: refused before a run folder is made
    (["--exp-name", "e" * 200], "--exp-name"),  # the run folder's name would pass the file system's 255 bytes
    (["--runs-dir", "/proc/hypermarl-runs"], "--runs-dir"),  # access() lets root write there; the kernel does not
])
def test_bad_input_in_process(argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert mg.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}:"), captured.err
    assert captured.out == ""
    assert os.listdir(tmp_path) == []


def test_a_run_larger_than_the_machine_is_refused_with_its_estimate_unless_told_to_try(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mg.extras, "machine_memory", lambda cuda: 2**10)
    assert mg.main(["--num-trials", "20"]) == 2 and os.listdir(tmp_path) == []
    err = capsys.readouterr().err
    assert err.startswith("error: --n-agents: 2 agents x 1 seeds need at least ") and "--no-memory-check" in err, err
    assert mg.main(["--num-trials", "20", "--no-memory-check"]) == 0


def test_the_memory_estimate_grows_with_agents_seeds_and_batches():
    base = mg.Args(n_agents=8, hypernet="linear", eval_trials=10)
    for bigger in (dict(n_agents=16), dict(num_seeds=2), dict(batch_size=100), dict(eval_trials=10_000),
                   dict(hidden_size=8)):
        assert mg.memory_needed(dataclasses.replace(base, **bigger)) > mg.memory_needed(base), bigger
    assert mg.memory_needed(dataclasses.replace(base, n_agents=1000, hypernet="nops")) > 30 * 2**30  # OOM on 24 GB
    mlp = dataclasses.replace(base, hypernet="mlp")  # its trunks and embeddings too
    for bigger in (dict(hypernet_embedding_dim=10**6), dict(hypernet_hidden_dims=[10**4, 10**4])):
        assert mg.memory_needed(dataclasses.replace(mlp, **bigger)) > mg.memory_needed(mlp), bigger


@pytest.mark.parametrize("argv, needle", [(["--n-agents", "abc"], "--n-agents"), (["--bogus"], "--bogus"),
                                          (["--num-trials"], "--num-trials"), (["--hypernet", "ippo"], "'ippo'"),
                                          (["--hypernet", "fups-id"], "'fups-id'"), (["--method", "nops"], "--method"),
                                          (["--game", "chess"], "'chess'"), (["--returns", "gae"], "'gae'"),
                                          (["--reward", "mine"], "'mine'")])
def test_tyro_refuses_bad_choices_and_types_with_exit_2(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        mg.main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and needle in captured.err, captured.err
    assert captured.out == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--n-agents", "0"], "--n-agents: must be at least 2, got 0"),
    (["--learning-rate", "-1"], "--learning-rate: must be positive, got -1.0"),
    (["--hypernet", "mlp", "--hypernet-embedding-dim", "0"], "--hypernet-embedding-dim: must be positive, got 0"),
    (["--num-trials", "0"], "--num-trials: must be positive, got 0"),
])
def test_a_copy_of_the_script_alone_refuses_bad_flags_as_the_repository_does(argv, message, tmp_path):
    # The checks live in the script: without hypermarl_extras.py beside it, the same one line, exit 2, nothing written
    code, out, err = run_alone("reinforce_matrix_games", tmp_path, *argv)
    assert code == 2 and err.splitlines() == [f"error: {message}"], err
    assert out == "" and os.listdir(tmp_path) == ["reinforce_matrix_games.py"]


def test_bad_input_exits_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--n-agents", "1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=HANG)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --n-agents: must be at least 2, got 1"]
    assert proc.stdout == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["a file", "inside a file", "not writable"])
def test_runs_dir_that_cannot_be_written_is_refused_before_anything(where, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep")
    runs_dir = {"a file": "notes.txt", "inside a file": "notes.txt/runs", "not writable": "/proc/sys/x"}[where]
    assert mg.main(["--num-trials", "20", "--runs-dir", runs_dir]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --runs-dir: "), captured.err
    assert captured.out == "" and os.listdir(tmp_path) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "keep"


def bracketed_flags(help_text):
    """{flag: the families in its "[...]" mark} from --help."""
    family = "|".join(re.escape(h) for h in HYPERNETS)
    marked = {}
    for block in re.split(r"\n(?=│ --)", help_text):
        found = re.search(rf"\[((?:{family})(?:, (?:{family}))*)\]", block)
        if block.startswith("│ --") and found:
            marked[block.split()[1].rstrip(",")] = found.group(1).split(", ")
    return marked


@functools.lru_cache(maxsize=1)
def script_help():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=HANG,
                          env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 0
    return proc.stdout


# The argv that gives each [family] flag; a new flag marked in --help must be added here.
FAMILY_FLAG_ARGV = {"--hyper-linear-shared-bias": ["--no-hyper-linear-shared-bias"],
                    "--hypernet-embedding-dim": ["--hypernet-embedding-dim", "8"],
                    "--hypernet-hidden-dims": ["--hypernet-hidden-dims", "16"]}


def test_every_family_only_flag_in_the_help_is_enforced(tmp_path, monkeypatch, capsys):
    marked = bracketed_flags(script_help())
    assert set(marked) == set(FAMILY_FLAG_ARGV), marked
    monkeypatch.chdir(tmp_path)
    for flag, families in marked.items():
        for hypernet in HYPERNETS:
            argv = ["--hypernet", hypernet, "--num-trials", "10", "--runs-dir", "runs"] + FAMILY_FLAG_ARGV[flag]
            code = mg.main(argv)
            captured = capsys.readouterr()
            if hypernet in families:
                assert code == 0, (argv, captured.err)
            else:
                assert code == 2 and captured.err == (f"error: {FAMILY_FLAG_ARGV[flag][0]}: only with --hypernet "
                                                      f"{families[0]}, got --hypernet {hypernet}\n"), argv


def test_family_defaults_are_literal_and_given_values_kept():
    args = mg.Args()
    assert args.hypernet_embedding_dim == 4 and args.hypernet_hidden_dims == [8] and args.hyper_linear_shared_bias
    assert mg.count_params("mlp", 2, args) == 330  # the help's count for the default hidden layer 8
    assert mg.Args().hypernet_hidden_dims is not args.hypernet_hidden_dims  # a fresh list per Args
    given = make_args(hypernet="mlp", hypernet_embedding_dim=8, hypernet_hidden_dims=[16])
    assert given.hypernet_embedding_dim == 8 and given.hypernet_hidden_dims == [16]


def test_help_shows_each_default_once():
    blocks = re.split(r"\n(?=│ --)", script_help())
    options = [" ".join(block.split()) for block in blocks if block.startswith("│ --")]
    assert len(options) == len(dataclasses.fields(mg.Args))
    doubled = [text for text in options if text.count("(default:") > 1]
    assert not doubled, doubled
    assert not [text for text in options if "(default: None)" in text and not text.startswith("│ --wandb-entity")]


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch, capsys):
    ticks = itertools.count()
    monkeypatch.setattr(mg.time, "time", lambda: 1_800_000_000.0 + 1e-6 * next(ticks))  # never the next second
    argv = ["--num-trials", "20", "--num-seeds", "2", "--runs-dir", str(tmp_path)]
    assert mg.main(argv) == 0 and mg.main(argv) == 0
    folders = sorted(os.listdir(tmp_path))
    assert len(folders) == 4, folders  # two runs x two seeds, none shared
    assert all(len(os.listdir(tmp_path / folder)) == 1 for folder in folders)  # one event file each


def test_a_long_run_prints_its_progress_with_elapsed_time_and_an_estimate(tmp_path, monkeypatch, capsys):
    clock = itertools.count(start=1_800_000_000, step=7)  # every reading of the clock: 7 s later
    monkeypatch.setattr(mg.time, "time", lambda: float(next(clock)))
    assert mg.main(["--num-trials", "200", "--runs-dir", str(tmp_path)]) == 0
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trials=")]
    assert progress, "no progress line"
    assert all(re.fullmatch(r"trials=\d+/200 train_reward=\S+ elapsed=\S+ eta=\S+", line) for line in progress), progress
    assert progress[0].startswith("trials=") and "elapsed=1m" in progress[0]


def test_a_short_run_prints_no_progress(tmp_path, monkeypatch, capsys):
    ticks = itertools.count()
    monkeypatch.setattr(mg.time, "time", lambda: 1_800_000_000.0 + 1e-3 * next(ticks))  # however loaded the machine
    assert mg.main(["--num-trials", "200", "--runs-dir", str(tmp_path)]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("trials=")]


def test_per_agent_gradients_sum_to_the_update_gradient():
    # One seed: the batched per-agent gradients (used for interference and for the update) must add
    # up to what a plain backward of the summed loss gives.
    args = make_args()
    for hypernet in HYPERNETS:
        pop = mg.Population(hypernet, 4, [3], args)
        params = list(pop.params.values())
        actions = mg.sample_actions(torch.softmax(pop.logits(), -1).detach(), 10, [torch.Generator().manual_seed(0)])
        rewards = mg.payoff("specialisation", actions, 4)
        summed = mg.per_agent_gradients(mg.reinforce_loss(pop.logits(), actions, rewards, "normalize"), params).sum(0)[0]
        mg.reinforce_loss(pop.logits(), actions, rewards, "normalize").sum().backward()
        assert summed.abs().max() > 0, hypernet
        assert torch.allclose(summed, torch.cat([p.grad.flatten() for p in params]), atol=1e-6), hypernet
