"""What torch.distributions would cost the VMAS scripts: their written-out sampling and log-density
(`sample_action`, `log_prob_entropy`) against Categorical / Normal objects doing the same work.

One training iteration of ippo_hyper_vmas.py at the paper's settings (the rollout on VMAS, GAE and
the PPO update, nothing else), in one process on one thread, alternating the two versions round by
round so that the machine's load falls on both alike; medians over the rounds.

    python benchmark/distributions_cost.py                        # Dispersion, MLP hypernetwork (about 1 minute)
    python benchmark/distributions_cost.py --scenario navigation  # Gaussian actions (a tenth of Table 12's batch)

Prints one line per part: written out, torch.distributions, and the difference.
"""

import argparse
import os
import statistics
import sys
import time

import torch
from torch.distributions import Categorical, Normal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import ippo_hyper_vmas as script  # noqa: E402
from sps import OneLineParser, script_args  # noqa: E402

WRITTEN_OUT = (script.sample_action, script.log_prob_entropy)


def library_sample(dist, discrete):
    return (Categorical(logits=dist, validate_args=False) if discrete else Normal(*dist, validate_args=False)).sample()


def library_log_prob_entropy(dist, action, discrete):
    if discrete:
        d = Categorical(logits=dist, validate_args=False)
        return d.log_prob(action), d.entropy()
    d = Normal(*dist, validate_args=False)
    return d.log_prob(action).sum(-1), d.entropy().sum(-1)


def use(version):
    script.sample_action, script.log_prob_entropy = (
        WRITTEN_OUT if version == "written out" else (library_sample, library_log_prob_entropy))


def iteration(args, agent, optimizer, envs, next_obs):
    """(rollout seconds, update seconds, the next observation): main()'s loop body without logging."""
    n, T, E = args.n_agents, args.num_steps, args.num_envs
    storage = {key: [] for key in ("obs", "actions", "logprobs", "values", "rewards", "terminated", "truncated", "final")}
    start = time.perf_counter()
    with torch.no_grad():
        weights = agent.generate(next_obs)
        for _ in range(T):
            if agent.per_sample:  # w/o GD: the weights depend on the observation
                weights = agent.generate(next_obs)
            action, logprob, _, value = agent.get_action_and_value(next_obs, weights)
            storage["obs"].append(next_obs)
            next_obs, reward, terminated, truncated, final = envs.step(agent.env_action(action))
            for key, item in zip(("actions", "logprobs", "values", "rewards", "terminated", "truncated", "final"),
                                 (action, logprob, value, reward, terminated[None], truncated[None], final)):
                storage[key].append(item.float() if key in ("terminated", "truncated") else item)
        s = {key: torch.stack(items) for key, items in storage.items()}
        dones = torch.maximum(s["terminated"], s["truncated"])
        next_values = torch.cat([s["values"][1:], agent.get_value(next_obs, agent.generate(next_obs)).unsqueeze(0)])
        next_values = torch.where(dones.bool(), script.bootstrap_values(agent, s["final"], s["truncated"]), next_values)
        advantages, returns = script.compute_gae(s["rewards"], s["values"], next_values, s["terminated"], dones,
                                                 args.gamma, args.gae_lambda)
    rollout_end = time.perf_counter()

    def agent_major(x):  # (T, n, E, ...) -> (n, T * E, ...)
        return x.transpose(0, 1).reshape((n, T * E) + x.shape[3:])

    batch = dict(obs=agent_major(s["obs"]), actions=agent_major(s["actions"]), logprobs=agent_major(s["logprobs"]),
                 advantages=agent_major(advantages), returns=agent_major(returns), values=agent_major(s["values"]))
    script.ppo_update(agent, optimizer, batch, args)
    return rollout_end - start, time.perf_counter() - rollout_end, next_obs


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("dispersion", "navigation"), default="dispersion")
    parser.add_argument("--hypernet", choices=("mlp", "linear", "fups", "nops"), default="mlp")
    parser.add_argument("--rounds", type=int, default=16, help="iterations timed per version (default: 16)")
    opts = parser.parse_args(argv)
    if opts.rounds < 1:
        parser.error(f"--rounds: must be at least 1, got {opts.rounds}")
    torch.set_num_threads(1)
    argv = ["--scenario", opts.scenario, "--hypernet", opts.hypernet]
    if opts.scenario == "navigation":  # Table 12's 600 envs x 100 steps and 45 x 30 minibatches take minutes per round
        argv += ["--num-envs", "60", "--update-epochs", "4", "--num-minibatches", "3"]
    args = script_args(script, argv)
    runs = {}
    for version in ("written out", "torch.distributions"):
        torch.manual_seed(0)
        envs = script.VmasEnv(args, args.num_envs, args.seed, torch.device("cpu"))
        agent = script.Agent(args, envs.obs_dim, envs.act_dim, envs.discrete)
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
        runs[version] = dict(args=args, agent=agent, optimizer=optimizer, envs=envs, obs=envs.reset(), rollout=[], update=[])
    for round_ in range(opts.rounds + 1):  # round 0 warms up and is not counted
        for version in (("written out", "torch.distributions") if round_ % 2 else ("torch.distributions", "written out")):
            use(version)
            run = runs[version]
            rollout, update, run["obs"] = iteration(run["args"], run["agent"], run["optimizer"], run["envs"], run["obs"])
            if round_:
                run["rollout"].append(rollout)
                run["update"].append(update)
    use("written out")
    print(f"{opts.scenario}, --hypernet {opts.hypernet}, {args.num_envs} envs x {args.num_steps} steps, "
          f"{args.update_epochs} x {args.num_minibatches} minibatches, 1 thread, medians of {opts.rounds} rounds (ms):")
    for part in ("rollout", "update", "iteration"):
        ms = {}
        for version, run in runs.items():
            values = run[part] if part != "iteration" else [a + b for a, b in zip(run["rollout"], run["update"])]
            ms[version] = statistics.median(values) * 1000
        print(f"  {part:9s}  written out {ms['written out']:8.1f}   torch.distributions {ms['torch.distributions']:8.1f}"
              f"   {ms['torch.distributions'] / ms['written out'] - 1:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
