"""Tests of mappo_hyper_mamujoco.py: tasks, padding and masks, HAPPO's factor, value loss and
normalisers, checkpoints, bad input, and every task x actor family x algorithm end to end."""

import contextlib
import dataclasses
import io
import itertools
import math
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import hypermarl_extras as extras
import mappo_hyper_mamujoco as mj  # conftest puts the repository on sys.path
from conftest import (HANG, ROOT, alive, children, eval_args, gone, only_the_first_save_succeeds, parsed, read_args,
                      run_alone, run_dirs, run_mamujoco as run_main, run_python, scalar_tags, tiny_mamujoco_args as tiny_argv,
                      tiny_or_eval_args, wait_until_blocked)

TASKS = list(mj.TASK_PRESETS)
FAMILIES = ["mlp", "linear", "fups", "nops"]


def unpad(padded, mask):
    """The real entries of every row of a padded array."""
    return [padded[i][mask[i]] for i in range(padded.shape[0])]


def last_eval(stdout):
    line = [ln for ln in stdout.splitlines() if "eval_return=" in ln][-1]
    return float(line.split("eval_return=")[1].split()[0])


# ----- tasks, padding and masks -----
@pytest.mark.parametrize("task,n_agents,act_dims,state_dim", [
    ("HalfCheetah-2x3", 2, [3, 3], 17), ("Walker2d-2x3", 2, [3, 3], 17), ("Ant-4x2", 4, [2, 2, 2, 2], 105),
    ("Humanoid-17x1", 17, [1] * 17, 348), ("Humanoid-9|8", 2, [9, 8], 348)])
def test_task_shapes(task, n_agents, act_dims, state_dim):
    env = mj.MaMuJoCoEnv(task, "local")
    assert env.n_agents == n_agents and env.act_dims == act_dims and env.state_dim == state_dim
    assert env.act_mask.sum(1).tolist() == act_dims
    assert env.obs_mask.sum(1).tolist() == env.local_obs_dims
    env.close()


def test_humanoid_17x1_is_one_joint_per_agent():
    env = mj.MaMuJoCoEnv("Humanoid-17x1", "local")
    partitions = env.ma.agent_action_partitions
    assert env.n_agents == 17 and all(len(p) == 1 for p in partitions)
    assert sorted(p[0].act_ids for p in partitions) == list(range(17))  # every actuator, once
    assert len({p[0].label for p in partitions}) == 17
    assert min(env.local_obs_dims) < max(env.local_obs_dims)  # unequal observations: padding needed
    env.close()


def test_pad_stack_keeps_every_row_and_pads_with_zeros():
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(d).astype(np.float32) for d in (5, 2, 7, 1)]
    padded, mask = mj.pad_stack(rows, 7)
    assert padded.shape == (4, 7) and np.all(padded[~mask] == 0)
    for row, back in zip(rows, unpad(padded, mask)):
        np.testing.assert_array_equal(row, back)


@pytest.mark.parametrize("task", ["Humanoid-9|8", "Humanoid-17x1", "Ant-4x2"])
def test_action_padding_matches_gymnasium_robotics(task):
    env = mj.MaMuJoCoEnv(task, "global")
    rng = np.random.default_rng(1)
    local = (rng.uniform(-0.4, 0.4, env.act_mask.shape) * env.act_mask).astype(np.float32)
    flat = env.local_to_global_action(local)  # every real entry exactly once
    np.testing.assert_array_equal(np.sort(flat), np.sort(local[env.act_mask]))
    # the same mapping as Gymnasium-Robotics' own (on unpadded per-agent actions)
    per_agent = {a: row for a, row in zip(env.ma.possible_agents, unpad(local, env.act_mask))}
    np.testing.assert_array_equal(env.ma.map_local_actions_to_global_action(per_agent), env.local_to_global_action(local))
    # padded slots are ignored
    noisy = local + 5.0 * ~env.act_mask
    np.testing.assert_array_equal(env.local_to_global_action(noisy), env.local_to_global_action(local))
    env.close()


@pytest.mark.parametrize("task", ["Humanoid-9|8", "Humanoid-17x1", "Walker2d-2x3"])
def test_env_step_equals_parallel_env_step(task):
    """Observations (unpadded), state, reward, terminated and truncated are exactly PettingZoo's."""
    ours = mj.MaMuJoCoEnv(task, "local", max_episode_steps=30)
    reference = mj.MaMuJoCoEnv(task, "local", max_episode_steps=30).ma  # its PettingZoo ParallelEnv
    flat, _ = ours.reset(seed=3)
    ref_obs, _ = reference.reset(seed=3)
    rng = np.random.default_rng(2)
    for t in range(40):
        local, state = ours.split(flat)
        for i, row in enumerate(unpad(local, ours.obs_mask)):
            np.testing.assert_array_equal(row, ref_obs[reference.possible_agents[i]].astype(np.float32))
        np.testing.assert_array_equal(state, reference.state().astype(np.float32))
        assert np.all(local[~ours.obs_mask] == 0)
        actions = rng.uniform(-1, 1, ours.act_mask.shape).astype(np.float32) * ours.act_mask
        flat, reward, terminated, truncated, _ = ours.step(actions)
        joints = ours.action_low + (actions + 1) / 2 * (ours.action_high - ours.action_low)  # HARL's rescaling
        per_agent = dict(zip(reference.possible_agents, unpad(joints, ours.act_mask)))
        ref_obs, ref_rew, ref_term, ref_trunc, _ = reference.step(per_agent)
        agent0 = reference.possible_agents[0]
        assert reward == ref_rew[agent0] and terminated == ref_term[agent0] and truncated == ref_trunc[agent0]
        if terminated or truncated:
            break
    ours.close()
    reference.close()


def test_global_actor_inputs_are_state_plus_one_hot():
    env = mj.MaMuJoCoEnv("Ant-4x2", "global")
    state = np.random.default_rng(0).standard_normal((2, env.state_dim)).astype(np.float32)
    x, state_n = mj.ObsNormalizer(env, enabled=False)(state)  # global mode: the flat observation is the state
    assert x.shape == (4, 2, env.state_dim + 4) == (4, 2, env.actor_obs_dim)
    np.testing.assert_array_equal(x[:, :, : env.state_dim], np.broadcast_to(state, (4, 2, env.state_dim)))
    np.testing.assert_array_equal(x[:, 0, env.state_dim:], np.eye(4))
    np.testing.assert_array_equal(state_n, state)
    env.close()


def test_local_actor_inputs_are_each_agents_padded_observation():
    env = mj.MaMuJoCoEnv("Humanoid-9|8", "local")
    flat = np.stack([env.reset(seed=seed)[0] for seed in range(3)])
    x, state_n = mj.ObsNormalizer(env, enabled=False)(flat)
    local, state = env.split(flat)
    assert x.shape == (2, 3, env.local_obs_dim) == (2, 3, env.actor_obs_dim)
    np.testing.assert_array_equal(x, np.swapaxes(local, 0, 1))
    np.testing.assert_array_equal(state_n, state)
    env.close()


def test_vector_env_autoreset_gives_fresh_obs_and_final_obs():
    """SAME_STEP autoreset: with done=True comes the next episode's first observation (what the next
    action must see) and, in info, the last observation of the ended one (for the bootstrap)."""
    args = mj.Args(task="HalfCheetah-2x3", num_envs=2, max_episode_steps=5, async_envs=False)
    envs = mj.make_vector_env(args)
    flat, _ = envs.reset(seed=0)
    reference = mj.MaMuJoCoEnv("HalfCheetah-2x3", max_episode_steps=5)
    ref_flat, _ = reference.reset(seed=0)  # env 0 of the vector env is seeded with seed 0
    np.testing.assert_array_equal(flat[0], ref_flat)
    actions = np.random.default_rng(0).uniform(-1, 1, (5, 2, 2, 3)).astype(np.float32)
    for t in range(5):
        flat, reward, terminated, truncated, info = envs.step(actions[t])
        ref_flat, ref_reward, _, ref_truncated, _ = reference.step(actions[t, 0])
        assert reward[0] == ref_reward
    assert truncated.all() and ref_truncated and not terminated.any()
    np.testing.assert_array_equal(info["final_obs"][0], ref_flat)
    np.testing.assert_array_equal(flat[0], reference.reset()[0])  # the fresh episode's observation
    envs.close()
    reference.close()


# ----- networks, normalisers, losses -----
def test_masked_log_prob_and_entropy_ignore_padded_dims():
    torch.manual_seed(0)
    args = parsed(mj, hypernet="nops", actor_hidden_dims=[8])
    actor = mj.GaussianActor(args, 2, 3, 4, np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool))
    with torch.no_grad():
        actor.log_std.add_(torch.randn_like(actor.log_std))
    x, actions, weights = torch.randn(2, 5, 3), torch.randn(2, 5, 4), actor.generate()
    logp, ent = actor.log_prob_entropy(x, actions, weights)
    dist = actor(x, weights)
    assert isinstance(dist, torch.distributions.Normal)
    ref = torch.distributions.Normal(dist.mean[1, :, :2], dist.stddev[1, :, :2])
    torch.testing.assert_close(logp[1], ref.log_prob(actions[1, :, :2]).sum(-1))
    torch.testing.assert_close(ent[1], ref.entropy().sum(-1))
    full = torch.distributions.Normal(dist.mean[0], dist.stddev[0])
    torch.testing.assert_close(logp[0], full.log_prob(actions[0]).sum(-1))
    changed = actions.clone()
    changed[1, :, 2:] += 100.0  # padded action entries change nothing
    torch.testing.assert_close(actor.log_prob_entropy(x, changed, weights)[0], logp)


def test_harl_bounded_std():
    args = parsed(mj, hypernet="nops")
    actor = mj.GaussianActor(args, 2, 5, 3, np.ones((2, 3), bool))
    std = actor(torch.zeros(2, 4, 5), actor.generate()).stddev
    torch.testing.assert_close(std, torch.full_like(std, 0.5 / (1 + math.exp(-1.0))))  # sigmoid(1) * 0.5


def test_obs_normalizer_keeps_padding_zero_and_round_trips_state():
    env = mj.MaMuJoCoEnv("Humanoid-9|8", "local")  # 9 and 8 joints: the second agent's observation is padded
    mask, (n, width), rng = env.obs_mask, env.obs_mask.shape, np.random.default_rng(0)
    assert not mask.all()

    def observations(batch):  # flat observations: padded local ones (zeros where mask is False), then the state
        local = (rng.standard_normal((batch, n, width)) * 3 + 1) * mask
        return np.concatenate([local.reshape(batch, -1), rng.standard_normal((batch, env.state_dim))], 1)

    norm = mj.ObsNormalizer(env)
    for _ in range(5):
        norm(observations(8), update=True)
    state = extras.running_stats(norm.rms)
    assert state["state"]["count"] > 40 and state["local"]["count"] > 40
    x, _ = norm(observations(4))  # (n_agents, batch, width)
    assert np.all(np.swapaxes(x, 0, 1)[:, ~mask] == 0) and np.any(x != 0)
    restored = mj.ObsNormalizer(env)
    extras.load_running_stats(restored.rms, state)
    flat = observations(3)
    for a, b in zip(restored(flat), norm(flat)):
        np.testing.assert_array_equal(a, b)
    env.close()


def test_value_norm_matches_harl_and_inverts():
    vn = mj.ValueNorm(2)
    a, b = torch.tensor([[1.0, 3.0], [10.0, 30.0]]), torch.tensor([[5.0, 7.0], [50.0, 70.0]])
    vn.update(a)
    vn.update(b)
    beta = 0.99999
    debias = (1 - beta) * beta + (1 - beta)
    mean = ((1 - beta) * beta * a.mean(1).double() + (1 - beta) * b.mean(1).double()) / debias
    mean_sq = ((1 - beta) * beta * (a**2).mean(1).double() + (1 - beta) * (b**2).mean(1).double()) / debias
    got_mean, got_var = vn.mean_var()
    torch.testing.assert_close(got_mean, mean)
    torch.testing.assert_close(got_var, (mean_sq - mean**2).clamp(min=1e-2))
    x = torch.randn(2, 6)
    torch.testing.assert_close(vn.denormalize(vn.normalize(x)), x)


def test_value_norm_is_updated_with_every_critic_minibatch_as_harl():
    """HARL's cal_value_loss updates ValueNorm with each minibatch's returns, then normalises them with it."""
    args = parsed(mj, critic_epochs=3, critic_num_minibatches=2)
    torch.manual_seed(0)
    critics, vn = mj.CentralCritics(args, 1, 5), mj.ValueNorm(1)
    batch = dict(state=torch.randn(8, 5), values=torch.zeros(1, 8), returns=100 + 10 * torch.randn(1, 8))
    mj.critic_update(critics, torch.optim.Adam(critics.parameters()), vn, batch, args)
    beta = 0.99999
    torch.testing.assert_close(vn.debiasing_term, torch.tensor(1 - beta**6, dtype=torch.float64))  # 3 x 2 updates


def test_value_loss_huber_and_clipping_by_hand():
    args = parsed(mj, clip_coef=0.2, huber_delta=1.0)
    values, old, targets = torch.tensor([[0.5, 3.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]])
    # sample 1: unclipped error 0.5 -> 0.125; clipped value 0.2, error 0.8 -> 0.32; max 0.32
    # sample 2: unclipped error -4 -> huber 3.5; clipped value 0.2, error -1.2 -> 0.7; max 3.5
    torch.testing.assert_close(mj.value_loss(values, old, targets, args), torch.tensor([(0.32 + 3.5) / 2]))
    args.clip_vloss = False
    torch.testing.assert_close(mj.value_loss(values, old, targets, args), torch.tensor([(0.125 + 3.5) / 2]))


def test_clipped_surrogate_with_factor_by_hand():
    new, old = torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2)
    adv, factor = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 2.0]])
    loss, ratio = mj.clipped_surrogate(new, old, adv, 0.2, factor)
    # min(1.5*2, 1.2*2) = 2.4, times 0.5 = 1.2; min(0.5*-1, 0.8*-1) = -0.8, times 2 = -1.6
    torch.testing.assert_close(loss, torch.tensor([-(1.2 - 1.6) / 2]))
    torch.testing.assert_close(ratio, torch.tensor([[1.5, 0.5]]))


def happo_setup(n_agents=3, batch=24):
    torch.manual_seed(0)
    args = parsed(mj, hypernet="nops", algo="happo", actor_hidden_dims=[8], update_epochs=2, num_minibatches=1,
                  learning_rate=0.05, ent_coef=0.0)
    actor = mj.GaussianActor(args, n_agents, 4, 2, np.ones((n_agents, 2), bool))
    obs = torch.randn(n_agents, batch, 4)
    with torch.no_grad():
        actions = actor(obs, actor.generate()).sample()
        logprobs = actor.log_prob_entropy(obs, actions, actor.generate())[0]
    batch = dict(obs=obs, actions=actions, logprobs=logprobs, advantages=torch.randn(n_agents, batch))
    return args, actor, batch


def test_per_agent_adam_equals_separate_adams_and_steps_only_chosen_agents():
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 4, 2))
    separate = [torch.nn.Parameter(stacked[i].detach().clone()) for i in range(3)]
    ours = mj.PerAgentAdam([stacked], 3, lr=0.01, eps=1e-5)
    theirs = [torch.optim.Adam([p], lr=0.01, eps=1e-5) for p in separate]
    for k in range(6):
        grad = torch.randn(3, 4, 2)
        agents = None if k % 2 == 0 else torch.tensor([2 - k % 3])  # all agents, then one agent
        stacked.grad = grad.clone()
        ours.step(agents)
        for i in (range(3) if agents is None else agents.tolist()):
            separate[i].grad = grad[i].clone()
            theirs[i].step()
        torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in separate]))


def test_happo_sequential_update_uses_previous_agents_ratio_product(monkeypatch):
    """Every minibatch step of agent i_m is weighted, sample by sample, by the ratio product of the agents updated
    before it: recorded from the surrogate's arguments, matched to its samples by the minibatch indices."""
    args, actor, batch = happo_setup()
    optimizer = mj.PerAgentAdam(actor.parameters(), 3, lr=args.learning_rate)
    order, factors, indices = [2, 0, 1], [], []
    surrogate, minibatches = mj.clipped_surrogate, mj.minibatches

    def recording_surrogate(newlogprob, oldlogprob, advantages, clip_coef, factor=None):
        factors.append(factor.detach().clone())
        return surrogate(newlogprob, oldlogprob, advantages, clip_coef, factor)

    def recording_minibatches(*args_):
        for idx in minibatches(*args_):
            indices.append(idx.clone())
            yield idx

    monkeypatch.setattr(mj, "clipped_surrogate", recording_surrogate)
    monkeypatch.setattr(mj, "minibatches", recording_minibatches)
    mj.actor_update(actor, optimizer, batch, args, order)
    with torch.no_grad():  # independent actors: later updates leave earlier agents' policies as they were
        new_logp = actor.log_prob_entropy(batch["obs"], batch["actions"], actor.generate())[0]
    ratio = torch.exp(new_logp - batch["logprobs"])  # (n, B): pi_new / pi_old of each agent
    expected = [torch.ones(24), ratio[2], ratio[2] * ratio[0]]  # of agents 2, 0 and 1, in that order
    assert len(factors) == len(indices) == 3 * args.update_epochs
    for k, (factor, idx) in enumerate(zip(factors, indices)):
        torch.testing.assert_close(factor, expected[k // args.update_epochs][idx].unsqueeze(0))
    assert (expected[2] - 1).abs().max() > 1e-3  # the updates did move the policies


def test_mappo_update_weights_no_sample(monkeypatch):
    args, actor, batch = happo_setup()
    factors, surrogate = [], mj.clipped_surrogate

    def recording_surrogate(newlogprob, oldlogprob, advantages, clip_coef, factor=None):
        factors.append(factor)
        assert newlogprob.shape == (3, 24)  # every agent at once
        return surrogate(newlogprob, oldlogprob, advantages, clip_coef, factor)

    monkeypatch.setattr(mj, "clipped_surrogate", recording_surrogate)
    mj.actor_update(actor, mj.PerAgentAdam(actor.parameters(), 3, lr=args.learning_rate), batch, args)
    assert factors == [None] * args.update_epochs


def test_happo_first_agent_update_equals_plain_ppo_on_that_agent():
    args, actor, batch = happo_setup(n_agents=2)
    twin = mj.GaussianActor(args, 2, 4, 2, np.ones((2, 2), bool))
    twin.load_state_dict(actor.state_dict())
    torch.manual_seed(5)

    class SGD(torch.optim.SGD):  # steps every agent: the others' gradients are 0, so only agent 1 moves
        def step(self, agents=None):
            super().step()

    mj.actor_update(actor, SGD(actor.parameters(), lr=0.1), batch, args, [1])
    # by hand: agent 1's PPO loss, factor 1, full batch, update_epochs SGD steps
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(args.update_epochs):
        new_logp = twin.log_prob_entropy(batch["obs"], batch["actions"], twin.generate())[0][1]
        ratio = torch.exp(new_logp - batch["logprobs"][1])
        adv = batch["advantages"][1]
        loss = -torch.min(ratio * adv, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * adv).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p, q in zip(actor.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_per_sample_ablation_chunks_equal_the_unchunked_forward_and_gradients():
    torch.manual_seed(3)
    args = parsed(mj, hypernet="mlp", hypernet_input="agent+obs", actor_hidden_dims=[8], hypernet_hidden_dims=[4],
                  hypernet_embedding_dim=4)
    actor = mj.GaussianActor(args, 3, 5, 2, np.ones((3, 2), bool))
    x, weights = torch.randn(3, 40, 5), actor.generate()
    assert weights.per_sample and weights.layers == []  # the forward pass makes them, from each input
    full = actor.net(x, weights)
    actor.chunk_size = lambda x, max_elements=0: 7  # force 6 chunks
    chunked = actor(x, weights).mean
    torch.testing.assert_close(chunked, full)
    grads_full = torch.autograd.grad(full.square().sum(), list(actor.net.parameters()))
    grads_chunked = torch.autograd.grad(chunked.square().sum(), list(actor.net.parameters()))
    for a, b in zip(grads_full, grads_chunked):
        torch.testing.assert_close(a, b)


def test_per_agent_grad_clip_is_per_agent():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.tensor([[30.0, 40.0, 0.0], [0.3, 0.4, 0.0]])
    mj.clip_grad_per_agent([p], 10.0, 2)
    torch.testing.assert_close(p.grad[0].norm(), torch.tensor(10.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p.grad[1], torch.tensor([0.3, 0.4, 0.0]))  # under the limit: untouched


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipping, and not
def test_shared_actor_step_clips_as_clip_grad_norm_and_reports_the_norm_before(max_norm):
    torch.manual_seed(0)
    args = parsed(mj, actor_hidden_dims=[8], hypernet_hidden_dims=[4], hypernet_embedding_dim=4,
                  max_grad_norm=max_norm)
    actor = mj.GaussianActor(args, 3, 5, 2, np.ones((3, 2), bool))
    mb = dict(obs=torch.randn(3, 10, 5), actions=torch.randn(3, 10, 2), advantages=torch.randn(3, 10))
    with torch.no_grad():
        mb["logprobs"] = actor.log_prob_entropy(mb["obs"], mb["actions"], actor.generate())[0] + 0.01
    # by hand: the clipped surrogate and the entropy bonus, the mean over agents, clip_grad_norm_, SGD of lr 1
    newlogprob, entropy = actor.log_prob_entropy(mb["obs"], mb["actions"], actor.generate())
    ratio = torch.exp(newlogprob - mb["logprobs"])
    clipped = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
    surrogate = torch.min(ratio * mb["advantages"], clipped * mb["advantages"]).mean(-1)
    (-surrogate - args.ent_coef * entropy.mean(-1)).mean().backward()
    params = list(actor.parameters())
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    expected = [p.detach() - p.grad for p in params]
    stats = mj.actor_step(actor, torch.optim.SGD(params, lr=1.0), mb, args)
    norm = stats["grad/actor_norm"]
    assert (total > max_norm) == (max_norm < 1) and float(norm) == pytest.approx(float(total), rel=1e-5)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)


def test_happos_gradient_variance_is_that_of_the_agent_it_updates():
    """HAPPO steps one agent: the other agents' gradient slices are zeros, which would dilute the variance."""
    torch.manual_seed(0)
    args = parsed(mj, algo="happo", hypernet="nops", actor_hidden_dims=[8], max_grad_norm=1e9)
    actor, agents = mj.GaussianActor(args, 3, 5, 2, np.ones((3, 2), bool)), torch.tensor([1])
    mb = dict(obs=torch.randn(1, 10, 5), actions=torch.randn(1, 10, 2), advantages=torch.randn(1, 10))
    with torch.no_grad():
        mb["logprobs"] = actor.log_prob_entropy(mb["obs"], mb["actions"], actor.generate(), agents)[0] + 0.01
    optimizer = mj.PerAgentAdam(actor.parameters(), 3, lr=1e-3, eps=1e-5)
    stats = mj.actor_step(actor, optimizer, mb, args, agents, torch.ones(1, 10))
    params = list(actor.parameters())
    assert all(not p.grad[[0, 2]].any() for p in params)  # what diluted it
    own = torch.cat([p.grad[1].flatten() for p in params])
    assert float(stats["grad/actor_var"]) == pytest.approx(float(own.var()), rel=1e-5)


def test_snd_compares_the_action_dimensions_every_agent_has():
    """Humanoid-9|8: the second agent's 9th action dimension is padding, which would count as diversity."""
    torch.manual_seed(0)
    mean, std = torch.randn(2, 5, 9), torch.rand(2, 5, 9) + 0.1
    mask = torch.tensor([[1.0] * 9, [1.0] * 8 + [0.0]]).unsqueeze(1)

    def snd(m, s, mask_):
        return mj.system_neural_diversity(m, s, mask_, 16, torch.Generator().manual_seed(0))

    expected = snd(mean[..., :8], std[..., :8], torch.ones(2, 1, 8))
    assert snd(mean, std, mask) == expected > 0
    changed_mean, changed_std = mean.clone(), std.clone()
    changed_mean[1, :, 8], changed_std[1, :, 8] = 100.0, 5.0  # the padded dimension
    assert snd(changed_mean, changed_std, mask) == expected
    assert snd(mean[[0, 0]], std[[0, 0]], mask) == 0.0  # identical policies: no diversity


# ----- end to end -----
@pytest.mark.parametrize("hypernet,algo", [(family, "mappo") for family in FAMILIES] + [("nops", "happo")])
@pytest.mark.parametrize("task", TASKS)
def test_end_to_end(tmp_path, task, hypernet, algo):
    """Two updates that each move the policy, finite losses, one evaluation at the end, and agents whose
    policies differ (every family tells agents apart here: FuPS by the agent ID), in TensorBoard as printed."""
    code, out, err = run_main(tiny_argv(tmp_path, task=task, hypernet=hypernet, algo=algo))
    assert code == 0, err
    (run,) = os.listdir(tmp_path)
    scalars = scalars_by_step(os.path.join(tmp_path, run))
    assert [step for tag, step in scalars if tag == "losses/approx_kl"] == [32, 64]
    assert all(value > 0 for (tag, _), value in scalars.items() if tag == "losses/approx_kl")
    assert all(math.isfinite(value) for (tag, _), value in scalars.items() if tag.startswith("losses/"))
    assert scalars["eval/episodic_return", 64] == pytest.approx(last_eval(out), abs=5e-4)
    snd = float(out.split("snd=")[-1].split()[0])
    assert 0.0 < snd <= 1.0 and scalars["diversity/snd", 64] == pytest.approx(snd, abs=5e-5)


def test_run_writes_the_metrics_of_the_vmas_scripts(tmp_path):
    code, _, err = run_main(tiny_argv(tmp_path))
    assert code == 0, err
    (run,) = os.listdir(tmp_path)
    tags = {tag for tag, _ in scalars_by_step(os.path.join(tmp_path, run))}
    expected = {"charts/episodic_return", "losses/policy_loss", "losses/value_loss", "losses/entropy",
                "losses/approx_kl", "losses/clipfrac", "grad/actor_var", "grad/actor_norm", "grad/interference",
                "eval/episodic_return", "diversity/snd"}
    assert expected <= tags, expected - tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.path.join(tmp_path, run))
    accumulator.Reload()
    for tag in ("charts/SPS", "perf/rollout_seconds", "perf/update_seconds"):  # per iteration, positive
        values = [e.value for e in accumulator.Scalars(tag)]
        assert len(values) == 2 and all(v > 0 for v in values), tag


# Flags that change the model or the update of tiny_argv's run: each must change its losses.
ABLATIONS = [
    ["--hypernet-hidden-dims", "4"],  # HyperMARL-S (smaller hypernetwork)
    ["--hypernet-embedding", "onehot"],
    ["--hypernet-init", "flax"], ["--hypernet-init", "pytorch"],
    ["--hypernet-input", "agent+obs"],
    ["--critic", "per-agent"], ["--norm-obs", "--no-norm-value", "--no-clip-vloss"],
]
OPTIONS = [
    ["--obs-mode", "local", "--task", "Humanoid-17x1"],
    ["--obs-mode", "local", "--task", "Humanoid-9|8", "--hypernet", "fups"],
    ["--obs-mode", "local", "--task", "Humanoid-9|8", "--algo", "happo", "--hypernet", "nops"],
    ["--obs-mode", "local", "--task", "Ant-4x2", "--agent-obsk", "2", "--hypernet", "linear"],
    ["--num-envs", "2", "--num-steps", "16"],  # worker processes (AsyncVectorEnv)
]


def losses_of(runs_dir):
    (run,) = os.listdir(runs_dir)
    return {key: value for key, value in scalars_by_step(os.path.join(runs_dir, run)).items()
            if key[0].startswith("losses/")}


@pytest.fixture(scope="module")
def base_losses(tmp_path_factory):
    """The losses of tiny_argv's run, which every ablation changes."""
    runs_dir = tmp_path_factory.mktemp("base")
    code, _, err = run_main(tiny_argv(runs_dir))
    assert code == 0, err
    return losses_of(runs_dir)


@pytest.mark.parametrize("extra", ABLATIONS + OPTIONS)
def test_ablations_and_options(tmp_path, extra, base_losses):
    argv = tiny_argv(tmp_path, *extra)
    if "--hypernet-embedding" in extra:  # onehot takes no embedding size
        i = argv.index("--hypernet-embedding-dim")
        del argv[i: i + 2]
    if "fups" in extra or "nops" in extra or "linear" in extra:
        for flag in ("--hypernet-hidden-dims", "--hypernet-embedding-dim"):
            i = argv.index(flag)
            del argv[i: i + 2]
    code, out, err = run_main(argv)
    assert code == 0, err
    assert math.isfinite(last_eval(out))
    if extra in ABLATIONS:  # the runs are deterministic: a flag that never reached the run changes nothing
        assert losses_of(tmp_path) != base_losses


def test_checkpoint_restores_normalisers_and_scores_what_the_run_scored(tmp_path):
    argv = tiny_argv(tmp_path, "--save-model", "--norm-obs", task="Walker2d-2x3", hypernet="mlp")
    code, out, err = run_main(argv)
    assert code == 0, err
    run_eval = last_eval(out)
    path = [ln.split()[1] for ln in out.splitlines() if ln.startswith("checkpoint: ")][0]
    state = torch.load(path, weights_only=True)
    assert state["obs_norm"]["state"]["count"] > 60  # observation statistics are in the checkpoint
    assert state["value_norm"]["debiasing_term"] > 0  # and the value normaliser's
    code, out, err = run_main(eval_args(tmp_path, path))
    assert code == 0, err
    assert float(out.split("eval/episodic_return=")[1].split()[0]) == pytest.approx(run_eval, abs=5e-4)
    # without the saved normaliser statistics the same weights score differently
    args = mj.parse_args(argv, mj.flags_given(argv))
    evaluator = mj.Evaluator(args, torch.device("cpu"))
    probe = evaluator.envs[0]
    actor = mj.GaussianActor(args, probe.n_agents, probe.actor_obs_dim, probe.act_dim, probe.act_mask)
    actor.load_state_dict(state["actor"])
    fresh = mj.ObsNormalizer(probe)
    assert evaluator(actor, fresh)[0] != pytest.approx(run_eval, abs=1e-3)
    evaluator.close()


def test_resume_continues_from_checkpoint(tmp_path):
    argv = tiny_argv(tmp_path, "--save-model", "--total-timesteps", "96", "--save-interval", "32")
    code, out, err = run_main(argv)
    assert code == 0, err
    path = [ln.split()[1] for ln in out.splitlines() if ln.startswith("checkpoint: ")][0]
    state = torch.load(path, weights_only=True)
    assert state["global_step"] == 96 and state["iteration"] == 4
    code, out, err = run_main(tiny_argv(tmp_path, "--total-timesteps", "128", "--resume", path))
    assert code == 0, err
    assert " at step 96" in out and "global_step=128 iteration=4/4" in out, out
    assert "iteration=1/4" not in out and "iteration=3/4" not in out  # only the missing iteration ran
    assert len(os.listdir(tmp_path)) == 1  # in the checkpoint's run folder


@pytest.mark.parametrize("task", ["HalfCheetah-2x3", "Ant-4x2", "Humanoid-9|8"])
def test_sim_state_restores_the_episode_exactly(task):
    """A fresh env given another's sim_state (through a weights_only checkpoint) continues its episode
    and the following ones bit for bit. Ant and Humanoid also need the saved body positions."""
    a, b = (mj.MaMuJoCoEnv(task, "local", max_episode_steps=15) for _ in range(2))
    rng = np.random.default_rng(0)
    a.reset(seed=1)
    b.reset(seed=2)
    for _ in range(7):
        a.step(rng.uniform(a.action_low, a.action_high).astype(np.float32))
    buffer = io.BytesIO()
    torch.save(a.sim_state, buffer)
    buffer.seek(0)
    b.sim_state = torch.load(buffer, weights_only=True)
    for t in range(30):  # crosses the time limit at step 15 and the reset after it
        action = rng.uniform(a.action_low, a.action_high).astype(np.float32)
        out_a, out_b = a.step(action), b.step(action)
        for x, y in zip(out_a[:4], out_b[:4]):
            np.testing.assert_array_equal(x, y)
        if out_a[3]:
            np.testing.assert_array_equal(a.reset()[0], b.reset()[0])
    a.close()
    b.close()


def scalars_by_step(run_dir):
    """{(tag, step): value} over every event file of the run (a resumed run adds one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    timing = ("charts/SPS", "perf/rollout_seconds", "perf/update_seconds")
    return {(tag, e.step): e.value for tag in accumulator.Tags()["scalars"] if tag not in timing
            for e in accumulator.Scalars(tag)}


@pytest.mark.parametrize("envs", [["--num-envs", "1"], ["--num-envs", "2", "--num-steps", "16"]])  # 2: workers
def test_resume_gives_the_same_numbers_as_an_uninterrupted_run(tmp_path, envs):
    """4 updates in one go, and 2 + --resume to 4, both stopped mid-episode (40-step episodes): the
    same weights, normalisers and every logged number (losses, training and evaluation returns)."""
    def argv(name, total, *extra):
        return tiny_argv(tmp_path / name, "--save-model", "--eval-interval", "64", "--exp-name", name,
                         "--total-timesteps", total, *envs, *extra)

    assert run_main(argv("full", 128))[0] == 0
    assert run_main(argv("part", 64))[0] == 0
    (part_dir,) = [tmp_path / "part" / d for d in os.listdir(tmp_path / "part")]
    checkpoint = str(part_dir / "checkpoint.pt")
    # worker processes may change on resume: they change no number
    changes = ["--no-async-envs"] if "2" in envs else []
    code, out, err = run_main(argv("part", 128, "--resume", checkpoint, *changes))
    assert code == 0, err
    (changed,) = [line for line in out.splitlines() if line.startswith("resume: ")]
    assert changed.endswith(("changed: --total-timesteps 64 -> 128", "changed: --async-envs True -> False, "
                             "--total-timesteps 64 -> 128")[bool(changes)]), changed
    (full_dir,) = [tmp_path / "full" / d for d in os.listdir(tmp_path / "full")]
    a = torch.load(full_dir / "checkpoint.pt", weights_only=True)
    b = torch.load(checkpoint, weights_only=True)
    assert a["global_step"] == b["global_step"] == 128
    for part in ("actor", "critics", "value_norm"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert torch.equal(a["obs_norm"]["state"]["mean"], b["obs_norm"]["state"]["mean"])
    assert torch.equal(a["envs"]["obs"], b["envs"]["obs"]) and a["envs"]["sim"] == b["envs"]["sim"]
    full, resumed = scalars_by_step(str(full_dir)), scalars_by_step(str(part_dir))
    assert ("eval/episodic_return", 128) in full  # and training returns of episodes after the resume:
    assert any(tag == "charts/episodic_return" and step > 64 for tag, step in full)
    assert full == resumed


def test_anneal_lr_decays_both_learning_rates_linearly_from_their_own_values(tmp_path):
    """HARL's update_linear_schedule at each rollout: lr0 * (1 - (iteration - 1) / iterations), actor and critic."""
    argv = tiny_argv(tmp_path, "--anneal-lr", "--total-timesteps", "128", "--learning-rate", "0.001",
                     "--critic-learning-rate", "0.002")
    assert run_main(argv)[0] == 0
    tags = scalar_tags(run_dirs(tmp_path)[0])
    assert tags["charts/learning_rate"] == pytest.approx([0.001, 0.00075, 0.0005, 0.00025])
    assert tags["charts/critic_learning_rate"] == pytest.approx([0.002, 0.0015, 0.001, 0.0005])


@pytest.mark.parametrize("flags", [["--task", "Hopper-3x1"], ["--hypernet", "ind"], ["--algo", "ippo"],
                                   ["--obs-mode", "partial"], ["--hypernet-input", "obs"], ["--num-envs", "abc"],
                                   ["--fixed-order", "True"], ["--no-such-flag"]])
def test_values_tyro_refuses_exit_2_naming_the_flag_and_write_nothing(tmp_path, flags):
    """Choices and types are tyro's to check: its own message (and "did you mean"), exit status 2."""
    runs = tmp_path / "runs"
    code, out, err = run_main(["--runs-dir", str(runs)] + flags)
    assert code == 2 and (flags[1] if flags[0] == "--fixed-order" else flags[0]) in err, err
    assert not runs.exists() and "Traceback" not in err


@pytest.mark.parametrize("flags,needle", [
    (["--hypernet", "nops", "--hypernet-hidden-dims", "32"], "--hypernet-hidden-dims:"),
    (["--hypernet", "fups", "--hypernet-init", "flax"], "--hypernet-init:"),
    (["--fixed-order"], "--fixed-order:"),
    (["--hypernet-embedding", "onehot", "--hypernet-embedding-dim", "8"], "--hypernet-embedding-dim: only with --hypernet-embedding learned"),
    (["--agent-obsk", "2"], "--agent-obsk:"),
    (["--num-envs", "0"], "--num-envs:"),
    (["--update-threads", "0"], "--update-threads:"),
    (["--clip-coef", "-0.1"], "--clip-coef:"),
    (["--gamma", "1.5"], "--gamma:"),
    (["--num-minibatches", "7"], "--num-minibatches:"),
    (["--total-timesteps", "10"], "--total-timesteps:"),
    (["--eval-only"], "--eval-only:"),
    (["--eval-only", "--checkpoint", "missing.pt"], "--checkpoint:"),
    (["--resume", "missing.pt"], "--resume:"),
    (["--num-envs", "100000000", "--total-timesteps", str(200 * 10**8)], "--num-envs 100000000, "),  # 8 MiB a worker
    (["--eval-episodes", "100000000"], "--eval-episodes 100000000: the run needs at least "),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, flags, needle):
    runs = tmp_path / "runs"
    code, out, err = run_main(["--runs-dir", str(runs)] + flags)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not runs.exists()


def test_a_run_larger_than_the_machine_is_refused_with_its_estimate_unless_told_to_try(tmp_path, monkeypatch):
    monkeypatch.setattr(mj.extras, "machine_memory", lambda cuda: 2**20)
    code, out, err = run_main(tiny_argv(tmp_path / "runs"))
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "runs").exists()
    assert err.startswith("error: --num-envs 1, --eval-episodes 2: the run needs at least "), err  # environments
    assert run_main(tiny_argv(tmp_path / "runs", "--no-memory-check"))[0] == 0


def test_the_memory_estimate_grows_with_what_the_run_holds():
    base = read_args(mj, tiny_argv("runs"))
    total = sum(mj.memory_needed(base).values())
    for bigger in (dict(num_envs=4), dict(num_steps=64), dict(eval_episodes=8), dict(task="Humanoid-17x1"),
                   dict(actor_hidden_dims=[64, 64]), dict(hypernet_input="agent+obs"), dict(critic="per-agent"),
                   dict(snd_gaussian_samples=16), dict(snd_samples=40), dict(hypernet_embedding_dim=64),
                   dict(hypernet_hidden_dims=[64])):
        assert sum(mj.memory_needed(dataclasses.replace(base, **bigger)).values()) > total, bigger


def test_bad_checkpoint_file_exits_2(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run_main(["--runs-dir", str(tmp_path / "runs"), "--eval-only", "--checkpoint", str(bad)])
    assert code == 2 and err.startswith("error: --checkpoint:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_checkpoint_without_normalisers_is_refused(saved_run, tmp_path):
    _, path = copy_of_saved_run(saved_run, tmp_path, lambda state: state.pop("obs_norm"))
    code, _, err = run_main(eval_args(tmp_path / "runs", path))
    assert code == 2 and f"is not a {mj.CHECKPOINT_FORMAT} checkpoint" in err


def test_checkpoint_of_another_task_is_refused(saved_run):
    code, _, err = run_main(eval_args(saved_run, saved_run / "checkpoint.pt", "--task", "Walker2d-2x3"))  # writes nothing
    assert code == 2 and err.startswith("error: --task: the checkpoint's run has 'HalfCheetah-2x3', not 'Walker2d-2x3'")


def test_script_runs_as_a_subprocess(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mappo_hyper_mamujoco.py")
    result = subprocess.run([sys.executable, script, "--task", "Walker2d-2x3", "--num-envs", "2", "--num-steps", "16",
                             "--total-timesteps", "32", "--eval-episodes", "1", "--max-episode-steps", "20",
                             "--actor-hidden-dims", "8", "--critic-hidden-dims", "8"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr
    assert os.path.isdir(tmp_path / "runs")
    bad = subprocess.run([sys.executable, script, "--num-envs", "0"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == "error: --num-envs: must be positive, got 0\n"


# ----- signals: a terminal's Ctrl-C, `timeout` and Slurm signal every process of the job -----
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mappo_hyper_mamujoco.py")
ASYNC = ["--num-envs", "2", "--num-steps", "16", "--print-interval", "1", "--eval-interval", str(10**9)]


@pytest.fixture
def spawn():
    """spawn(runs_dir, *flags): the script in its own process group, with two environment worker
    processes; a group still running when the test ends (it failed) is killed."""
    processes = []

    def start(runs_dir, *extra):
        argv = [sys.executable, "-u", SCRIPT] + tiny_argv(runs_dir, *ASYNC, *extra)
        processes.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
        return processes[-1]

    yield start
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def read_until(process, prefix, timeout=HANG):
    """stdout up to the first line that starts with prefix (the process group is killed after timeout)."""
    timer = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
    timer.start()
    try:
        for line in process.stdout:
            if line.startswith(prefix):
                return line
    finally:
        timer.cancel()
    raise AssertionError(f"no line starting with {prefix!r}: {process.communicate()[1][-3000:]}")


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads worker processes from /proc")


@needs_proc
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_to_the_process_group_saves_the_final_state_and_resumes_exactly(spawn, tmp_path, signame):
    """The environment workers get the signal too: they must outlive it so that the main process can
    save their simulator states with the rest (the state after the iteration the signal arrived in,
    from which a resumed run continues as if never stopped), then close them and exit 0."""
    sig = getattr(signal, signame)
    process = spawn(tmp_path / "stopped", "--total-timesteps", 32 * 2000)
    run_dir = read_until(process, "run: ").split(maxsplit=1)[1].strip()
    read_until(process, "global_step=")  # training runs
    workers = children(process.pid)
    assert len(workers) == 2
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.pt"))  # no --save-model: no periodic save
    os.killpg(process.pid, sig)
    out, err = process.communicate(timeout=HANG)
    assert process.returncode == 0, err
    assert f"signal {int(sig)}: saving a checkpoint" in out and "Traceback" not in err, err
    (path,) = [ln.split()[1] for ln in out.splitlines() if ln.startswith("checkpoint: ")]
    assert path == os.path.join(run_dir, "checkpoint.pt")
    assert gone(workers)  # closed by the main process
    state = torch.load(path, weights_only=True)
    stopped_at = state["global_step"]
    assert stopped_at >= 32 and stopped_at % 32 == 0 and state["iteration"] == stopped_at // 32 + 1
    assert len(state["envs"]["sim"]) == 2

    # resumed to two more updates: the same numbers as a run that was never stopped
    total = str(stopped_at + 64)
    code, _, err = run_main(tiny_argv(tmp_path / "stopped", *ASYNC, "--save-model", "--total-timesteps", total,
                                      "--resume", path))
    assert code == 0, err
    code, _, err = run_main(tiny_argv(tmp_path / "full", *ASYNC, "--save-model", "--total-timesteps", total))
    assert code == 0, err
    (full_dir,) = [tmp_path / "full" / d for d in os.listdir(tmp_path / "full")]
    a = torch.load(full_dir / "checkpoint.pt", weights_only=True)
    b = torch.load(path, weights_only=True)
    assert a["global_step"] == b["global_step"] == stopped_at + 64
    for part in ("actor", "critics", "value_norm"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert torch.equal(a["obs_norm"]["state"]["mean"], b["obs_norm"]["state"]["mean"])
    assert torch.equal(a["envs"]["obs"], b["envs"]["obs"]) and a["envs"]["sim"] == b["envs"]["sim"]
    assert scalars_by_step(str(full_dir)) == scalars_by_step(run_dir)


@needs_proc
def test_second_ctrl_c_stops_at_once_and_closes_the_workers(spawn, tmp_path):
    """The workers ignore Ctrl-C; the main process does not, the second time. Both Ctrl-Cs must come within
    an iteration (between two, the run saves at once): the workers are stopped (SIGSTOP) after iteration 1,
    so the main process blocks in the next rollout's first step and stays there, however fast the machine."""
    process = spawn(tmp_path, "--total-timesteps", 32 * 2000)
    read_until(process, "global_step=")  # the end of iteration 1
    workers = children(process.pid)
    assert len(workers) == 2
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        wait_until_blocked(process.pid)  # it waits on the workers' answer: mid-rollout
        os.killpg(process.pid, signal.SIGINT)
        read_until(process, "signal 2: saving a checkpoint")
        os.killpg(process.pid, signal.SIGINT)  # mid-iteration: before the save
        assert all(map(alive, workers))  # the Ctrl-Cs left the workers running
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    out, err = process.communicate(timeout=HANG)
    assert process.returncode != 0 and "KeyboardInterrupt" in err
    assert "checkpoint: " not in out
    assert gone(workers)


@needs_proc
def test_workers_of_a_killed_run_exit_quietly(spawn, tmp_path):
    """SIGKILL cannot be caught: the workers see their pipes close and exit, with no traceback each."""
    process = spawn(tmp_path, "--total-timesteps", 32 * 2000)
    read_until(process, "global_step=")
    workers = children(process.pid)
    assert len(workers) == 2
    os.kill(process.pid, signal.SIGKILL)
    _, err = process.communicate(timeout=HANG)  # the workers hold stdout and stderr until they exit
    assert gone(workers)
    assert "Traceback" not in err, err


def test_progress_line_says_totals_and_when_no_episode_ended(tmp_path, monkeypatch):
    """40-step episodes, 32-step iterations, a line every 2: episodes end in iterations 2, 3, 4, 5 and 7.
    Iteration 1 alone had none; the line of iteration 6 reports the episode of iteration 5."""
    ticks = itertools.count()  # a clock that never reaches the once-a-minute line, however loaded the machine
    monkeypatch.setattr(mj.time, "time", lambda: 1_800_000_000.0 + 1e-3 * next(ticks))
    code, out, err = run_main(tiny_argv(tmp_path / "a", "--total-timesteps", 32))
    assert code == 0, err
    (line,) = [ln for ln in out.splitlines() if ln.startswith("global_step=")]
    assert "episodic_return=no_episode_ended " in line and "nan" not in line
    assert "rollout_s_total=" in line and "update_s_total=" in line and " rollout_s=" not in line
    code, out, err = run_main(tiny_argv(tmp_path / "b", "--total-timesteps", 192, "--print-interval", 2))
    assert code == 0, err
    lines = {int(ln.split("iteration=")[1].split("/")[0]): ln for ln in out.splitlines() if ln.startswith("global_step=")}
    assert sorted(lines) == [1, 2, 4, 6]  # and the first iteration's, at once
    (run,) = os.listdir(tmp_path / "b")
    logged = scalars_by_step(str(tmp_path / "b" / run))
    assert ("charts/episodic_return", 192) not in logged  # iteration 6 itself ended no episode
    shown = float(lines[6].split("episodic_return=")[1].split()[0])
    assert shown == pytest.approx(logged[("charts/episodic_return", 160)], abs=1e-3)


# ----- bad input, resume, run folders, progress, help, videos -----
@pytest.mark.parametrize("flags,needle", [
    (["--seed", "-1"], "--seed: must be between 0 and "),
    (["--seed", str(2**32 - 10_001)], "--seed: must be between 0 and 4294957294"),  # eval episode 1 reaches 2**32
    (["--learning-rate", "inf"], "--learning-rate: must be a finite number"),
    (["--max-grad-norm", "inf"], "--max-grad-norm: must be a finite number"),
    (["--ent-coef", "nan"], "--ent-coef: must be a finite number"),
    (["--num-steps", str(2**70)], "--num-steps: must be at most 2**53"),
    (["--exp-name", "../../x"], "--exp-name: must be a plain name"),
    (["--resume", "/"], "--resume: '/' is a folder"),
    (["--eval-only", "--checkpoint", "/"], "--checkpoint: '/' is a folder"),
    (["--checkpoint", "x.pt"], "--checkpoint: only with --eval-only"),
    (["--eval-only", "--checkpoint", "x.pt", "--resume", "x.pt"], "--resume: cannot be combined with --eval-only"),
    (["--no-fixed-order"], "--no-fixed-order: only with --algo happo"),  # named as written
    (["--agent-obsk", "0"], "--agent-obsk: only with --obs-mode local"),
    (["--hypernet-init", "matched", "--hypernet", "linear"], "--hypernet-init: matched is for --hypernet mlp"),
    (["--hypernet-input", "agent+obs", "--hypernet", "fups"], "--hypernet-input: only with --hypernet mlp or linear"),
    (["--algo", "happo", "--hypernet", "mlp"], "--hypernet: --algo happo needs"),
    (["--obs-mode", "local", "--agent-obsk", "1000000000"], "--agent-obsk: must be between 0 and 16"),  # not a hang
    (["--torch-threads", "1099511627776"], "--torch-threads: must be at most 1024"),
    (["--update-threads", "2000"], "--update-threads: must be at most 1024"),
    (["--eval-episodes", "4294967296"], "--eval-episodes: must be between 1 and 4294957295"),  # not --seed's fault
])
def test_bad_input_of_a_run_that_would_start_is_one_line(tmp_path, flags, needle):
    """tiny_argv: a short run if the input were accepted."""
    runs = tmp_path / "runs"
    argv = tiny_argv(runs, *flags, hypernet="fups" if "--hypernet" in flags else "mlp")
    if "--eval-only" in flags:  # the flags of training are refused with it: the folder and the flags under test
        argv = ["--runs-dir", str(runs), *flags]
    elif "--hypernet" in flags:  # the flag under test names the family
        i = argv.index("--hypernet")
        del argv[i: i + 2]
    code, out, err = run_main(argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {needle}"), err
    assert os.listdir(tmp_path) == []


def test_largest_seed_keeps_every_evaluation_seed_below_2_to_the_32():
    assert parsed(mj, seed=2**32 - 10_002, eval_episodes=2).seed == 2**32 - 10_002


@pytest.mark.parametrize("where", ["file", "inside-file", "read-only"])
def test_runs_dir_that_cannot_hold_runs_is_refused_before_anything_is_written(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    runs_dir = {"file": blocker, "inside-file": blocker / "runs", "read-only": "/proc/sys/hypermarl-runs"}[where]
    code, out, err = run_main(tiny_argv(runs_dir))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --runs-dir: "), err
    assert os.listdir(tmp_path) == ["blocker"]


@pytest.mark.parametrize("flag", ["--resume", "--checkpoint"])
def test_empty_checkpoint_file_is_one_line(tmp_path, flag):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    extra = ["--resume", empty] if flag == "--resume" else ["--eval-only", "--checkpoint", empty]
    code, out, err = run_main(tiny_or_eval_args(tmp_path / "runs", *extra) if flag == "--checkpoint"
                              else tiny_argv(tmp_path / "runs", *extra))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {flag}: "), err
    assert not (tmp_path / "runs").exists()


def test_checkpoint_with_code_in_it_is_refused_without_torchs_advice(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"format": mj.CHECKPOINT_FORMAT, "args": argparse_namespace()}, path)
    code, out, err = run_main(eval_args(tmp_path / "runs", path))
    assert code == 2 and err.count("\n") == 1, err
    assert "holds objects other than tensors and plain data: refused" in err and "weights_only" not in err


def argparse_namespace():
    import argparse

    return argparse.Namespace(task="HalfCheetah-2x3")  # not a plain type: weights_only refuses it


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 64-step run with a checkpoint (seed 3, 16-unit networks): its run folder."""
    runs = tmp_path_factory.mktemp("saved")
    code, _, err = run_main(tiny_argv(runs, "--save-model", "--seed", 3))
    assert code == 0, err
    (run,) = os.listdir(runs)
    return runs / run


@pytest.mark.parametrize("extra,flag", [
    (["--learning-rate", "1e-3"], "--learning-rate"), (["--num-envs", "2"], "--num-envs"),
    (["--seed", "4"], "--seed"), (["--hypernet", "fups"], "--hypernet"),
    (["--update-threads", "7"], "--update-threads"),  # threads change the sums of a matrix product
    (["--total-timesteps", "32"], "--total-timesteps: the run already trained 64 steps"),  # less than it did
    (["--total-timesteps", "16"], "--total-timesteps: the run already trained 64 steps"),  # below one batch too
    ([], "--total-timesteps: the run already trained 64 steps"),  # nothing to do is not a silent success
    (["--total-timesteps", "80"], "--total-timesteps: the run already trained 64 steps"),  # not one more iteration
])
def test_resume_refuses_flags_that_would_change_the_run(saved_run, extra, flag):
    before = {name: os.path.getmtime(saved_run / name) for name in os.listdir(saved_run)}
    code, out, err = run_main(["--resume", str(saved_run / "checkpoint.pt"), *extra])
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {flag}"), err
    assert "the checkpoint's run has" in err or "already trained" in err
    assert {name: os.path.getmtime(saved_run / name) for name in os.listdir(saved_run)} == before


def test_resume_takes_the_run_from_the_checkpoint_and_reports_what_changed(saved_run, tmp_path):
    import shutil

    run_dir = tmp_path / saved_run.name
    shutil.copytree(saved_run, run_dir)
    checkpoint = str(run_dir / "checkpoint.pt")
    code, out, err = run_main(["--resume", checkpoint, "--total-timesteps", "96", "--runs-dir", str(tmp_path)])
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("resume: ")]
    assert line == (f"resume: {saved_run.name} at step 64; changed: --runs-dir {saved_run.parent} -> {tmp_path}, "
                    f"--total-timesteps 64 -> 96")
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == 96 and state["args"]["seed"] == 3 and state["args"]["actor_hidden_dims"] == [16, 16]
    assert os.listdir(tmp_path) == [saved_run.name]  # the same run folder continues
    assert ("losses/value_loss", 96) in scalars_by_step(str(run_dir))


def test_eval_only_takes_the_model_flags_from_the_checkpoint(saved_run):
    # trained with 16-unit layers, 40-step episodes and a small hypernetwork: the defaults would not load
    code, out, err = run_main(["--eval-only", "--checkpoint", str(saved_run / "checkpoint.pt"), "--eval-episodes", "2"])
    assert code == 0 and "eval/episodic_return=" in out, err


def test_a_run_folder_that_becomes_unwritable_stops_in_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """The second checkpoint cannot be written (a read-only or full folder; as root, chmod would not stop it)."""
    saved = only_the_first_save_succeeds(monkeypatch)
    code, out, err = run_main(tiny_argv(tmp_path, "--save-model", "--save-interval", 32, "--total-timesteps", 96))
    (run,) = os.listdir(tmp_path)
    checkpoint = str(tmp_path / run / "checkpoint.pt")
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: cannot write "), err
    assert "Permission denied" in err and f"Last good checkpoint: {checkpoint}" in err
    assert saved == [32] and torch.load(checkpoint, weights_only=True)["global_step"] == 32


def test_a_run_prints_nothing_on_stderr(tmp_path):
    """No notice a user cannot act on (Gymnasium-Robotics prints one about its Adroit hands at import)."""
    done = run_python([os.path.join(ROOT, "mappo_hyper_mamujoco.py"), *tiny_argv(tmp_path, "--total-timesteps", 32)])
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_resume_from_another_folder_continues_in_the_checkpoints_run_folder(saved_run, tmp_path, monkeypatch):
    import shutil

    run_dir = tmp_path / "runs" / saved_run.name
    shutil.copytree(saved_run, run_dir)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run_main(["--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", 96])
    assert code == 0, err
    assert os.listdir(tmp_path / "elsewhere") == [] and f"run: {run_dir}" in out
    assert ("losses/value_loss", 96) in scalars_by_step(str(run_dir))


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    clock = itertools.count()
    monkeypatch.setattr(mj.time, "time", lambda: 1_800_000_000 + next(clock) * 1e-5)  # never a new second
    for _ in range(2):
        assert run_main(tiny_argv(tmp_path, "--save-model", "--total-timesteps", 32))[0] == 0
    folders = sorted(os.listdir(tmp_path))
    assert len(folders) == 2 and all((tmp_path / f / "checkpoint.pt").is_file() for f in folders)
    assert folders[0].endswith("__1800000000") and folders[1].endswith("__1800000000_1")


def test_progress_lines_give_the_plan_elapsed_time_and_eta_at_least_every_minute(tmp_path, monkeypatch):
    clock = itertools.count()
    monkeypatch.setattr(mj.time, "time", lambda: 1_800_000_000 + next(clock) * 100.0)  # every call: 100 s later
    code, out, err = run_main(tiny_argv(tmp_path, "--total-timesteps", 96, "--print-interval", 100))
    assert code == 0, err
    assert "plan: 3 iterations of 32 steps (1 envs x 32) up to step 96, evaluating every 100,000" in out
    lines = [line for line in out.splitlines() if line.startswith("global_step=")]
    assert [line.split()[1] for line in lines] == ["iteration=1/3", "iteration=2/3", "iteration=3/3"]
    duration = r"(\d+h\d\dm|\d+m\d\ds|\d+s)"  # 1h02m, 3m05s or 12s
    assert all(re.search(f" elapsed={duration} eta={duration} ", line) for line in lines), lines
    assert " eta=0s " in lines[-1] and " eta=0s " not in lines[0]


def help_text(capsys, argv):
    assert mj.main(argv + ["--help"]) == 0
    return re.sub(r"[│\s]+", " ", capsys.readouterr().out)  # the box's lines wrap "(default: ...)"


def test_help_shows_the_defaults_the_run_would_take(capsys):
    text = help_text(capsys, [])
    assert "actor Adam learning rate (default: 0.0005)" in text and "(default: 0.0375)" in text  # Tables 20, 21
    # only the flags whose default really is None say so: --wandb-entity, --resume, --checkpoint
    assert text.count("(default: None)") == 3, text
    text = help_text(capsys, ["--task", "Walker2d-2x3"])  # Table 19
    assert "actor Adam learning rate (default: 0.001)" in text and "per epoch (actor_num_mini_batch) (default: 2)" in text
    text = help_text(capsys, ["--task", "Ant-4x2", "--algo", "happo"])  # Table 17; HAPPO's only family
    assert "(default: nops)" in text and "(default: 0.1)" in text and "(Table 17: Ant) (default: True)" in text


def video_frames(path):
    import imageio.v2 as imageio

    return [np.asarray(frame) for frame in imageio.get_reader(path)]


def test_capture_video_writes_non_blank_episodes_and_changes_no_number(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MUJOCO_GL", "egl")  # what the script sets, undone after the test
    runs = {}
    for name, extra in (("plain", []), ("video", ["--capture-video"])):
        code, out, err = run_main(tiny_argv(tmp_path / name, "--eval-interval", 32, "--save-model", *extra))
        assert code == 0, err
        (run,) = os.listdir(tmp_path / name)
        runs[name] = str(tmp_path / name / run)
    assert sorted(os.listdir(os.path.join(runs["video"], "videos"))) == ["eval_32.mp4", "eval_64.mp4"]
    frames = video_frames(os.path.join(runs["video"], "videos", "eval_64.mp4"))
    assert len(frames) == 41 and frames[0].shape == (480, 480, 3)  # the reset and 40 steps, at 20 fps
    assert all(f.std() > 3 for f in frames)  # not blank: floor, sky and robot are drawn
    assert (np.abs(frames[0].astype(int) - frames[-1].astype(int)).max(-1) > 30).sum() > 50  # it moved
    accumulator = EventAccumulator(runs["video"], size_guidance={"images": 0})
    accumulator.Reload()
    summaries = accumulator.Images("eval/video")
    assert [s.step for s in summaries] == [32, 64] and summaries[0].encoded_image_string[:3] == b"GIF"
    returns = {name: {k: v for k, v in scalars_by_step(run).items() if k[0] in ("eval/episodic_return", "diversity/snd")}
               for name, run in runs.items()}
    assert len(returns["plain"]) == 4 and returns["plain"] == returns["video"]

    # --eval-only: the video goes to a new folder beside the run; nothing else is written
    code, out, err = run_main(["--eval-only", "--checkpoint", os.path.join(runs["video"], "checkpoint.pt"),
                               "--eval-episodes", "2", "--capture-video", "--runs-dir", str(tmp_path / "video")])
    assert code == 0, err
    (path,) = [line.split()[1] for line in out.splitlines() if line.startswith("video: ")]
    run = os.path.basename(runs["video"])
    assert os.path.basename(os.path.dirname(path)).startswith(f"{run}__eval__") and os.listdir(os.path.dirname(path)) == ["eval.mp4"]
    assert len(video_frames(path)) == 41


@pytest.mark.parametrize("flags,message", [
    ("--num-envs 0", "--num-envs: must be positive, got 0"),
    ("--hypernet-embedding-dim 0", "--hypernet-embedding-dim: must be positive, got 0"),
    ("--learning-rate -1", "--learning-rate: must be positive, got -1.0"),
    ("--hypernet linear --hypernet-init matched", "--hypernet-init: matched is for --hypernet mlp, got --hypernet linear"),
    ("--fixed-order", "--fixed-order: only with --algo happo, got --algo mappo"),
    ("--algo happo --hypernet mlp", "--hypernet: --algo happo needs disjoint per-agent actors (nops), got --hypernet mlp"),
])
def test_a_copy_of_the_script_alone_checks_its_flags(tmp_path, flags, message):
    """Without hypermarl_extras.py (nothing of the repository importable), the script still refuses what would not
    train, with the message it gives beside the helper: one line, exit status 2, nothing written."""
    alone = tmp_path / "alone"
    alone.mkdir()
    code, out, err = run_alone("mappo_hyper_mamujoco", alone, *flags.split())
    assert code == 2 and err == f"error: {message}\n" and not out, err
    assert os.listdir(alone) == ["mappo_hyper_mamujoco.py"]  # no run folder
    assert run_main(["--runs-dir", str(tmp_path / "runs"), *flags.split()]) == (2, "", f"error: {message}\n")
    assert os.listdir(tmp_path) == ["alone"]


def test_a_copy_of_the_script_alone_refuses_a_runs_dir_it_cannot_create(tmp_path):
    """Without the library's check, at the first write: one line, exit status 2, nothing written."""
    (tmp_path / "blocker").write_text("")  # a file where --runs-dir needs a folder
    code, out, err = run_alone("mappo_hyper_mamujoco", tmp_path, "--num-envs", "2", "--runs-dir", "blocker/runs")
    assert code == 2 and not out, err
    assert err == "error: --runs-dir: cannot create a run folder in 'blocker/runs' (Not a directory)\n"
    assert sorted(os.listdir(tmp_path)) == ["blocker", "mappo_hyper_mamujoco.py"]


def test_capture_video_without_a_renderer_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("__EGL_VENDOR_LIBRARY_FILENAMES", "/nonexistent/egl.json")  # no EGL in the probe
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.delenv("DISPLAY", raising=False)
    code, out, err = run_main(tiny_argv(tmp_path / "runs", "--capture-video"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --capture-video: ") and "install" in err, err
    assert not (tmp_path / "runs").exists()


# ===== Damaged checkpoints: one line, exit status 2, nothing written (the environments are made and the =====
# ===== checkpoint restored before the run folder is opened)                                            =====
def copy_of_saved_run(saved_run, tmp_path, change):
    """The saved run's folder copied into tmp_path, its checkpoint changed by change(state): the checkpoint."""
    import shutil

    run_dir = tmp_path / saved_run.name
    shutil.copytree(saved_run, run_dir)
    checkpoint = str(run_dir / "checkpoint.pt")
    state = torch.load(checkpoint, weights_only=True)
    change(state)
    torch.save(state, checkpoint)
    return run_dir, checkpoint


def files_and_times(folder):
    return {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}


DAMAGES = {  # what is changed, what --resume and --eval-only say
    "NaN weight": (lambda s: s["actor"]["log_std"].view(-1).__setitem__(0, float("nan")), "holds NaN or inf (in actor/"),
    "missing key": (lambda s: s["actor"].pop("log_std"), "does not fit this script's model ("),
    "critic of another model": (lambda s: s["critics"].__setitem__("bogus", torch.zeros(1)),
                                "does not fit this script's model ("),
    "impossible saved flag": (lambda s: s["args"].__setitem__("num_steps", 0),
                              "holds an invalid flag: --num-steps: must be positive, got 0"),
    "normaliser of another task": (lambda s: s["obs_norm"]["state"].__setitem__("mean", torch.zeros(3, dtype=torch.float64)),
                                   "does not fit this script's model (obs_norm/state/mean"),
    "environment of another task": (lambda s: s["envs"]["sim"][0].__setitem__("physics", [0.0]),
                                    "does not fit this script's model (envs/sim[0]/physics"),
    "negative variance of the observations": (lambda s: s["obs_norm"]["state"]["var"].view(-1).__setitem__(0, -1.0),
                                              "does not fit this script's model (obs_norm/state: a negative variance"),
    "an episode past its time limit": (lambda s: s["envs"]["sim"][0].__setitem__("elapsed_steps", 5000),
                                       "does not fit this script's model (envs/sim[0]/elapsed_steps: 5000, not a step"),
    "an episode's step count as a float": (lambda s: s["envs"]["sim"][0].__setitem__("elapsed_steps", 3.5),
                                           "does not fit this script's model (envs/sim[0]/elapsed_steps: 3.5,"),
    "value normaliser's weight of 2": (lambda s: s["value_norm"]["debiasing_term"].fill_(2.0),
                                       "does not fit this script's model (value_norm: a debiasing term outside"),
    "critic's Adam at a negative step": (lambda s: s["critic_optimizer"]["state"][0].__setitem__(
        "step", torch.tensor(-1.0)), "does not fit this script's model (optimizer's step holds -1, which Adam cannot"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_is_refused_before_anything_is_written(saved_run, tmp_path, damage):
    change, message = DAMAGES[damage]
    run_dir, checkpoint = copy_of_saved_run(saved_run, tmp_path, change)
    before = files_and_times(run_dir)
    code, out, err = run_main(["--resume", checkpoint, "--total-timesteps", "96"])
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --resume: {checkpoint!r} {message}"), err
    assert files_and_times(run_dir) == before and os.listdir(tmp_path) == [saved_run.name]  # no log, no folder
    if damage in ("impossible saved flag", "environment of another task", "an episode past its time limit",
                  "an episode's step count as a float"):  # not what --eval-only reads
        return
    code, out, err = run_main(["--eval-only", "--checkpoint", checkpoint, "--runs-dir", str(tmp_path / "eval")])
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --checkpoint: {checkpoint!r} {message}"), err
    assert os.listdir(tmp_path) == [saved_run.name]


@pytest.mark.parametrize("flags", [["--save-model"], ["--print-interval", "3"], ["--track"], ["--num-envs", "2"],
                                   ["--critic-learning-rate", "1e-3"], ["--no-async-envs"], ["--update-threads", "1"]])
def test_eval_only_refuses_the_flags_of_training(saved_run, tmp_path, flags):
    argv = ["--eval-only", "--checkpoint", str(saved_run / "checkpoint.pt"), "--runs-dir", str(tmp_path), *flags]
    code, out, err = run_main(argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {flags[0]}: only for training"), err
    assert os.listdir(tmp_path) == []


def test_runs_dir_the_kernel_refuses_is_one_line(tmp_path):
    code, out, err = run_main(tiny_argv("/proc/hypermarl-runs"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --runs-dir: ") and "'/proc'" in err, err
