"""ippo_hyper_smax.py and mappo_hyper_smax.py: the SMAX wrapper, action masking, the recurrent sequences, the
generated weights at init, the authors' network sizes, resume bit for bit, bad flags. Tiny runs: 4 environments
x 8 steps, small networks."""

import dataclasses
import math
import os
import shutil
import signal

import pytest
import torch

from conftest import load_checkpoint, run_alone, run_dirs, run_main, scalar_tags

import ippo_hyper_smax as ippo  # conftest puts the repository on sys.path
import mappo_hyper_smax as mappo
FAMILIES = ["mlp", "linear", "fups", "nops"]
BOTH = pytest.mark.parametrize("script", [ippo, mappo], ids=["ippo", "mappo"])


def tiny(runs_dir, *extra):
    return ["--runs-dir", str(runs_dir), "--num-envs", "4", "--num-steps", "8", "--num-minibatches", "2",
            "--update-epochs", "2", "--total-timesteps", "64", "--eval-episodes", "4", "--eval-interval", "32",
            "--fc-dim", "16", "--gru-hidden-dim", "16", *map(str, extra)]


@pytest.fixture(scope="module")
def env():
    return ippo.SmaxEnv("2s3z", 4, 0, torch.device("cpu"))


def agent_for(family, script=ippo, **flags):
    args = script.read_command_line(["--hypernet", family, "--fc-dim", "16", "--gru-hidden-dim", "16",
                                     *(token for k, v in flags.items() for token in (f"--{k}", str(v)))])[0]
    torch.manual_seed(0)
    return args, script.Agent(args, 127, 10, 120)


@BOTH
@pytest.mark.parametrize("family", FAMILIES)
def test_the_hidden_layers_after_the_gru_are_the_baselines_widths(family, script):
    """--fc-dim and --gru-hidden-dim apart (Table 22 has 128 for both): the actor's hidden layer is the GRU's
    width; the critic's is fc_dim in IPPO (JaxMARL's ActorCriticRNN) and the GRU's width in MAPPO (JaxMARL's
    CriticRNN, the authors' H-MAPPO)."""
    args = script.read_command_line(["--hypernet", family, "--fc-dim", "16", "--gru-hidden-dim", "24"])[0]
    weights = script.Agent(args, 127, 10, 120).generate()
    critic = 16 if script is ippo else 24
    assert [tuple(w.shape[-2:]) for w, _ in weights.actor] == [(24, 24), (24, 10)]
    assert [tuple(w.shape[-2:]) for w, _ in weights.critic] == [(24, critic), (critic, 1)]


@pytest.mark.long
def test_the_wrapper_keeps_time_limits_apart_from_terminations_and_resets_in_place():
    """Terminated (a side destroyed) and truncated (the map's time limit) never coincide; an episode is
    truncated exactly at its max_steps-th step; a won episode is a terminated one; after an end, the next
    observation is a new episode's while the final observation is the old one's. Random play rarely lasts
    to the time limit: 64 environments for three episode lengths see a few truncations (seeded)."""
    env = ippo.SmaxEnv("2s3z", 64, 0, torch.device("cpu"))
    torch.manual_seed(0)
    obs, _, avail = env.reset()
    length, seen_truncation = torch.zeros(64, dtype=torch.long), False
    for _ in range(3 * env.max_steps):
        logits = torch.where(avail, 0.0, -1e10)
        obs, _, avail, reward, terminated, truncated, won, final_obs, _ = env.step(ippo.sample_action(logits))
        length += 1
        assert not (terminated & truncated).any() and not (won & ~terminated).any()
        assert torch.equal(truncated, length == env.max_steps)
        ended = terminated | truncated
        seen_truncation |= bool(truncated.any())
        assert torch.equal(obs[:, ~ended], final_obs[:, ~ended])
        length[ended] = 0
    assert seen_truncation


@BOTH
@pytest.mark.parametrize("family", FAMILIES)
def test_an_unavailable_action_is_never_sampled_nor_the_mode(family, script, env):
    torch.manual_seed(1)
    _, agent = agent_for(family, script)
    obs, world_state, avail = env.reset()
    hidden, start = agent.initial_hidden(4, "cpu"), torch.ones(1, 4)
    for _ in range(30):
        hidden, actor_in, _ = agent.step(obs, world_state, hidden, start)
        logits = agent.policy(actor_in * 50, agent.generate(), avail)  # large features: peaked policies
        for action in (script.sample_action(logits), logits.argmax(-1)):
            assert avail.gather(-1, action.unsqueeze(-1)).all()
        obs, world_state, avail, *_ = env.step(script.sample_action(logits))
        start = torch.zeros(1, 4)


@BOTH
def test_a_dead_agents_one_action_is_sampled_even_when_a_uniform_draw_is_exactly_zero(script, monkeypatch):
    """torch.rand can return 0: -log(-log 0) = -inf would make every action's noise -inf, and the argmax
    the first action, unavailable, instead of a dead agent's only one (stop)."""
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)
    assert script.sample_action(torch.tensor([[[-1e10] * 4 + [0.0] + [-1e10] * 5]])).item() == 4


@BOTH
def test_snd_leaves_out_the_steps_where_the_source_agent_is_dead(script, env):
    """A dead agent can only stop, so every agent's policy on its history is the same one-hot there: those
    steps are left out, not averaged in as distance 0. Every agent dead after the first of six steps: SND is
    the first step's alone (averaged in, the later steps would divide it by about six)."""
    _, agent = agent_for("mlp", script)
    obs, _, avail = env.reset()
    dead = torch.zeros_like(avail)
    dead[..., 4] = True  # SMAX's action 4, stop, is a dead unit's only one
    obs, avail, active = torch.stack([obs] * 6), torch.stack([avail] + [dead] * 5), torch.ones(6, 4, dtype=torch.bool)
    with torch.no_grad():
        first = script.shared_history_snd(agent, obs[:1], avail[:1], active[:1])
        assert first > 0
        assert script.shared_history_snd(agent, obs, avail, active) == pytest.approx(first, rel=1e-9)


@BOTH
@pytest.mark.parametrize("family", FAMILIES)
def test_the_first_policy_is_nearly_uniform_over_the_available_actions(family, script, env):
    """Section 4.3: the generated last actor layer starts at the target's scale (gain 0.01), as FuPS's and
    NoPS's do, so every agent's first policy is within 1% of the uniform entropy over its available actions."""
    _, agent = agent_for(family, script)
    obs, world_state, avail = env.reset()
    _, actor_in, _ = agent.step(obs, world_state, agent.initial_hidden(4, "cpu"), torch.ones(1, 4))
    _, entropy = script.log_prob_entropy(agent.policy(actor_in, agent.generate(), avail), torch.zeros(5, 4, dtype=torch.long))
    assert torch.all(entropy > 0.99 * avail.sum(-1).float().log())


@pytest.mark.parametrize("script, family, actor, critic", [
    (ippo, "fups", 149_643, None), (ippo, "mlp", 1_253_119, None),
    (mappo, "fups", 133_002, 131_585), (mappo, "mlp", 422_314, 401_681)], ids=["ippo-fups", "ippo-mlp", "mappo-fups", "mappo-mlp"])
def test_the_networks_have_the_authors_sizes_on_2s3z(script, family, actor, critic):
    """The parameters of the authors' JaxMARL networks on 2s3z (IPPO: one network, the trunk shared; MAPPO:
    the actor's, and the critic's on the world state, FuPS's with the agent's ID, HyperMARL's with its own
    embedding table), counted in their code with Table 23's sizes."""
    args = script.read_command_line(["--map", "2s3z", "--hypernet", family])[0]
    agent = script.Agent(args, 127, 10, 120)
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    if critic is None:
        assert count(agent.parameters()) == actor
    else:
        assert (count(agent.actor_parameters()), count(agent.critic_parameters())) == (actor, critic)
        assert count(agent.parameters()) == actor + critic


@pytest.mark.parametrize("family", ["fups", "nops"])
def test_the_baselines_heads_start_as_jaxmarls(family):
    """JaxMARL's FuPS heads initialise their hidden layers orthogonally with gain 2, not sqrt(2) (its SMAX
    baselines; NoPS takes FuPS's network), the last layers with 0.01 (actor) and 1 (critic)."""
    _, agent = agent_for(family)
    weights = agent.generate()
    for (hidden, _), (last, _) in (weights.actor, weights.critic):
        for agent_id in range(hidden.shape[0]):  # (fan_in, fan_out) = (16, 16): square, so W^T W = 4 I
            assert torch.allclose(hidden[agent_id].T @ hidden[agent_id], 4 * torch.eye(16), atol=1e-4)
    assert torch.allclose(weights.actor[1][0][0].T @ weights.actor[1][0][0], 1e-4 * torch.eye(10), atol=1e-7)
    assert torch.allclose(weights.critic[1][0][0].norm(), torch.tensor(1.0), atol=1e-5)


@BOTH
def test_the_authors_smax_hypernetwork_starts_g_orthogonal_and_generates_per_agent_weights(script):
    """Their SMAX code initialises the hypernetwork's hidden layers orthogonally (gain sqrt 2), unlike the
    VMAS one; the generated layers differ between agents."""
    _, agent = agent_for("mlp", script)
    for trunk in agent.actor.trunks:
        weight = trunk[0].weight
        gram = weight @ weight.T if weight.shape[0] <= weight.shape[1] else weight.T @ weight
        assert torch.allclose(gram, 2 * torch.eye(gram.shape[0]), atol=1e-4)
    (w1, _), (w2, _) = agent.generate().actor
    assert not torch.allclose(w1[0], w1[1]) and not torch.allclose(w2[0], w2[1])


def test_a_hidden_state_never_crosses_an_episode_start():
    """After a start, unroll gives what a fresh hidden state gives on the rest of the sequence, whatever came
    before; without the start the history matters."""
    _, agent = agent_for("mlp")
    torch.manual_seed(2)
    obs, h0 = torch.randn(10, 5, 3, 127), torch.randn(5, 3, 16)
    starts = torch.zeros(10, 1, 3)
    starts[4, 0, 1] = 1.0  # environment 1 starts an episode at step 4
    with torch.no_grad():
        features = agent.trunk.unroll(obs, h0, starts)
        fresh = agent.trunk.unroll(obs[4:], torch.zeros(5, 3, 16), torch.zeros(6, 1, 3))
    assert torch.allclose(features[4:, :, 1], fresh[:, :, 1], atol=1e-6)
    assert not torch.allclose(features[4:, :, 0], fresh[:, :, 0], atol=1e-3)


@pytest.mark.parametrize("script, family", [(ippo, "mlp"), (ippo, "nops"), (mappo, "fups")],
                         ids=["ippo-mlp", "ippo-nops", "mappo-fups"])
def test_the_minibatch_recomputation_gives_the_rollouts_log_probabilities(script, family, tmp_path, monkeypatch, capsys):
    """Before any update, the sequences rerun from the rollout's first hidden state (a minibatch of whole
    environments, episode starts resetting it) give every log-probability and value the rollout recorded."""
    checked = []

    def check_then_update(agent, optimizer, batch, args):
        with torch.no_grad():
            for envs in (torch.tensor([0, 2]), torch.arange(4)):
                mb = {k: v[:, envs] if k == "h0" else v[:, :, envs] for k, v in batch.items()}
                actor_in, critic_in = agent.unroll(mb["obs"], mb["world_states"], mb["h0"], mb["starts"])  # (T, n, B, .)
                weights = agent.generate()
                for t in range(actor_in.shape[0]):
                    logits = agent.policy(actor_in[t], weights, mb["avails"][t])
                    logprob, _ = script.log_prob_entropy(logits, mb["actions"][t])
                    assert torch.allclose(logprob, mb["logprobs"][t], atol=1e-5)
                    assert torch.allclose(agent.get_value(critic_in[t], weights), mb["values"][t], atol=1e-5)
        checked.append(bool(batch["starts"][1:].any()))  # an episode started inside the rollout
        return real(agent, optimizer, batch, args)

    real = script.ppo_update
    monkeypatch.setattr(script, "ppo_update", check_then_update)
    code, _, err = run_main(script, tiny(tmp_path, "--hypernet", family, "--num-steps", "64", "--total-timesteps", "512",
                                       "--eval-interval", "512"), capsys)
    assert code == 0, err
    assert len(checked) == 2 and any(checked)


@BOTH
def test_training_logs_the_papers_metrics(script, tmp_path, capsys):
    code, out, err = run_main(script, tiny(tmp_path), capsys)
    assert code == 0, err
    (run_dir,) = run_dirs(tmp_path)
    tags = scalar_tags(run_dir)
    for tag in ("eval/episodic_return", "eval/win_rate", "diversity/snd", "grad/actor_var", "losses/policy_loss",
                "losses/value_loss", "losses/approx_kl", "charts/SPS"):
        assert tag in tags and all(math.isfinite(v) for v in tags[tag])
    assert 0 <= tags["diversity/snd"][-1] <= 1 and 0 <= tags["eval/win_rate"][-1] <= 1
    assert "win_rate=" in out


@BOTH
def test_the_ablation_without_gradient_decoupling_trains_and_evaluates(script, tmp_path, capsys):
    """--hypernet-input agent+obs (w/o GD) generates the heads per sample: the rollout, the update and the
    evaluation's SND (the actors alone, on shared histories) all take it."""
    code, out, err = run_main(script, tiny(tmp_path, "--hypernet-input", "agent+obs"), capsys)
    assert code == 0, err
    snd = scalar_tags(run_dirs(tmp_path)[0])["diversity/snd"]
    assert len(snd) == 2 and all(0 <= value <= 1 for value in snd)


def test_jax_is_told_not_to_take_the_gpu_before_it_starts(monkeypatch):
    """XLA_PYTHON_CLIENT_PREALLOCATE is read when JAX's backend starts (its first jax.devices()): the wrapper
    sets it before that call, so torch keeps the GPU's memory."""
    import jax

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    seen, devices = [], jax.devices
    monkeypatch.setattr(jax, "devices", lambda *a: seen.append(os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
                        or devices(*a))
    for script in (ippo, mappo):
        script.SmaxEnv("2s3z", 4, 0, torch.device("cpu"))
        assert seen[-1] == "false"
        monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")


@BOTH
def test_resume_continues_bit_for_bit(script, tmp_path, capsys):
    """Two iterations straight, or one, a checkpoint, and --resume for the second: the same model (a constant
    learning rate: with --anneal-lr a new budget would change the schedule, and --resume refuses it)."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_main(script, tiny(straight, "--save-model", "--no-anneal-lr"), capsys)[0] == 0
    assert run_main(script, tiny(stopped, "--save-model", "--no-anneal-lr", "--total-timesteps", "32"), capsys)[0] == 0
    (run_dir,) = run_dirs(stopped)
    assert run_main(script, ["--resume", os.path.join(run_dir, "checkpoint.pt"), "--total-timesteps", "64"], capsys)[0] == 0
    a = load_checkpoint(os.path.join(run_dirs(straight)[0], "checkpoint.pt"))
    b = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    assert a["global_step"] == b["global_step"] == 64
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["env"]["leaves"], b["env"]["leaves"]))


@BOTH
def test_a_run_stopped_by_a_signal_resumes_on_its_annealed_schedule(script, tmp_path, capsys, monkeypatch):
    """SMAX anneals the learning rate (Table 22, JaxMARL's schedule). A Ctrl-C in the first iteration: the run
    saves when the iteration ends, and --resume with the same budget goes on along the same schedule, to the
    model, optimizer and environments of the run that was never stopped."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_main(script, tiny(straight, "--save-model"), capsys)[0] == 0
    update = script.ppo_update

    def interrupted_update(*args):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before os.kill returns
        return update(*args)

    monkeypatch.setattr(script, "ppo_update", interrupted_update)
    code, out, err = run_main(script, tiny(stopped), capsys)
    assert code == 0 and "signal 2: saving a checkpoint" in out, err
    monkeypatch.setattr(script, "ppo_update", update)
    (run_dir,) = run_dirs(stopped)
    path = os.path.join(run_dir, "checkpoint.pt")
    saved = load_checkpoint(path)
    assert saved["global_step"] == 32 and saved["args"]["anneal_lr"] is True
    assert run_main(script, ["--resume", path, "--save-model"], capsys)[0] == 0
    a, b = load_checkpoint(os.path.join(run_dirs(straight)[0], "checkpoint.pt")), load_checkpoint(path)
    assert a["global_step"] == b["global_step"] == 64
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"] < script.Args.learning_rate
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert all(torch.equal(x, y) for x, y in zip(a["env"]["leaves"], b["env"]["leaves"]))


def test_eval_only_prints_the_checkpoints_return_win_rate_and_snd(tmp_path, capfd):
    """capfd: jaxmarl, on its first import (mabrax_env.py), points sys.stdout and sys.stderr at the process's own."""
    assert run_main(ippo, tiny(tmp_path, "--save-model"), capfd)[0] == 0
    (run_dir,) = run_dirs(tmp_path)
    code, out, _ = run_main(ippo, ["--eval-only", "--checkpoint", os.path.join(run_dir, "checkpoint.pt"),
                                   "--eval-episodes", "4"], capfd)
    assert code == 0 and "eval/win_rate=" in out and "diversity/snd=" in out
    code, _, err = run_main(ippo, ["--eval-only", "--checkpoint", os.path.join(run_dir, "checkpoint.pt"),
                                   "--num-envs", "2"], capfd)  # training's: it would be silently ignored
    assert code == 2 and err.startswith("error: --num-envs: only for training, not with --eval-only"), err
    assert "--capture-video" not in err  # SMAX has no videos
    assert run_dirs(tmp_path) == [run_dir]


SMAX_DAMAGES = {  # a change to a checkpoint, and the start of the reason --resume gives
    "NaN weight": (lambda s: next(v for v in s["model"].values() if v.is_floating_point()).view(-1).__setitem__(
        0, float("nan")), "holds NaN or inf (in model/"),
    "an environment array missing": (lambda s: s["env"]["leaves"].pop(), "does not fit this script's model (env"),
    "an environment array of another map": (lambda s: s["env"]["leaves"].__setitem__(0, torch.zeros(
        (7,) + s["env"]["leaves"][0].shape[1:], dtype=s["env"]["leaves"][0].dtype)),
        "does not fit this script's model (env/leaves[0]: "),
    "a hidden state of another width": (lambda s: s["carry"].__setitem__("hidden", torch.zeros(3)),
                                        "does not fit this script's model (carry/hidden: "),
    "the optimizer's state emptied": (lambda s: s["optimizer"]["state"].clear(), "does not fit this script's model "
                                      "(optimizer's state is empty, yet the run has made updates)"),
}


def test_a_damaged_checkpoint_is_one_line_exit_2_and_writes_nothing(tmp_path, capfd):
    """Each damage alone, to a copy of one saved run: refused before anything is written (capfd: see
    test_eval_only_prints_the_checkpoints_return_win_rate_and_snd)."""
    argv = tiny(tmp_path / "runs", "--save-model", "--total-timesteps", "32", "--no-anneal-lr")
    assert run_main(ippo, argv, capfd)[0] == 0
    (run_dir,) = run_dirs(tmp_path / "runs")
    for damage, (change, message) in SMAX_DAMAGES.items():
        copy = tmp_path / "damaged"
        shutil.copytree(run_dir, copy)
        path = str(copy / "checkpoint.pt")
        state = load_checkpoint(path)
        change(state)
        torch.save(state, path)
        before = sorted(os.listdir(copy))
        code, _, err = run_main(ippo, ["--resume", path, "--total-timesteps", "64"], capfd)
        assert code == 2 and err.startswith(f"error: --resume: {path!r} {message}") and err.count("\n") == 1, (damage, err)
        assert sorted(os.listdir(copy)) == before and os.path.getsize(copy / "evaluations.jsonl") == os.path.getsize(
            os.path.join(run_dir, "evaluations.jsonl")), damage
        shutil.rmtree(copy)


@pytest.mark.parametrize("flags, message", [
    (["--num-envs", "0"], "--num-envs: must be positive"),
    (["--num-minibatches", "3"], "--num-minibatches: must divide --num-envs"),
    (["--learning-rate", "-1"], "--learning-rate: must be positive"),
    (["--hypernet", "fups", "--hypernet-embedding-dim", "8"], "--hypernet-embedding-dim: only with --hypernet mlp"),
    (["--hypernet", "linear", "--hypernet-init", "matched"], "--hypernet-init: matched is for --hypernet mlp"),
    (["--gamma", "1.5"], "--gamma: must be in [0, 1]"),
    (["--num-steps", str(2**70)], "--num-steps: must be at most 2**53"),
    (["--hypernet-embedding", "onehot", "--hypernet-embedding-dim", "8"],
     "--hypernet-embedding-dim: only with --hypernet-embedding learned, got --hypernet-embedding onehot"),
    (["--script", "mappo", "--hypernet-embedding", "onehot", "--no-hypernet-separate-embeddings"],
     "--no-hypernet-separate-embeddings: only with --hypernet-embedding learned"),
    (["--script", "mappo", "--hypernet", "nops", "--no-hypernet-separate-embeddings"],
     "--no-hypernet-separate-embeddings: only with --hypernet mlp"),
])
def test_a_bad_flag_is_one_line_exit_2_nothing_written(flags, message, tmp_path, capsys):
    script = mappo if flags[:2] == ["--script", "mappo"] else ippo
    flags = flags[2:] if script is mappo else flags
    code, _, err = run_main(script, tiny(tmp_path / "runs", *flags), capsys)
    assert code == 2 and err.strip().startswith(f"error: {message}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_each_map_and_family_takes_table_23s_values():
    args = ippo.read_command_line(["--map", "3s5z"])[0]
    assert (args.learning_rate, args.hypernet_embedding_dim, args.hypernet_hidden_dims, args.n_agents) == (0.004, 64, [16], 8)
    args = ippo.read_command_line(["--map", "smacv2_10_units", "--hypernet", "fups"])[0]
    assert args.learning_rate == 0.001 and args.n_agents == 10
    args = ippo.read_command_line(["--map", "smacv2_20_units", "--learning-rate", "0.01"])[0]
    assert args.learning_rate == 0.01 and args.hypernet_embedding_dim == 64
    args = mappo.read_command_line(["--map", "3s5z"])[0]
    assert (args.learning_rate, args.hypernet_embedding_dim, args.clip_coef, args.ent_coef) == (0.0003, 64, 0.2, 0.0)
    args = mappo.read_command_line(["--map", "2s3z", "--hypernet", "fups"])[0]
    assert args.learning_rate == 0.002 and args.hypernet_separate_embeddings


@pytest.mark.long
def test_a_copy_alone_trains_and_refuses_what_needs_the_helper(tmp_path):
    """ippo_hyper_smax.py alone in an empty folder trains (jaxmarl installed), and --save-model, which needs
    hypermarl_extras.py, is one line, exit 2, nothing written."""
    code, out, err = run_alone("ippo_hyper_smax", tmp_path, *tiny("runs"))
    assert code == 0 and "eval_return=" in out, err
    shutil.rmtree(tmp_path / "runs")
    code, out, err = run_alone("ippo_hyper_smax", tmp_path, *tiny("runs"), "--save-model")
    assert code == 2 and err.strip().splitlines() == ["error: --save-model: needs hypermarl_extras.py beside this script"]
    assert os.listdir(tmp_path) == ["ippo_hyper_smax.py"]
    (tmp_path / "blocker").write_text("")  # a file where --runs-dir needs a folder: the first write fails, one line
    code, out, err = run_alone("ippo_hyper_smax", tmp_path, *tiny("blocker/runs"))
    assert code == 2 and err.strip().splitlines() == [
        "error: --runs-dir: cannot create a run folder in 'blocker/runs' (Not a directory)"], err


def test_the_memory_estimate_counts_the_networks_and_the_evaluation():
    """A GRU of a million units would ask for terabytes: refused by the memory check, not a traceback."""
    args = ippo.read_command_line(["--map", "2s3z"])[0]
    for script in (ippo, mappo):
        for bigger in (dict(hypernet_embedding_dim=10**5), dict(hypernet_hidden_dims=[10**4]), dict(fc_dim=1024),
                       dict(eval_episodes=10**4)):
            assert sum(script.memory_needed(dataclasses.replace(args, **bigger)).values()) > \
                sum(script.memory_needed(args).values()), bigger
        assert script.memory_needed(dataclasses.replace(args, gru_hidden_dim=10**6))["networks"] > 2**42
        # refused at once, not a crash at the first evaluation, after training
        assert script.memory_needed(dataclasses.replace(args, eval_episodes=10**8))["evaluation"] > 2**37
