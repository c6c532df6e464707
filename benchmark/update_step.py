"""Where a gradient step's time goes: FuPS against the MLP hypernetwork on Navigation (8 agents).

The paper's Navigation settings give 2,000-sample minibatches per agent and 256-256 actor and
critic networks. The MLP hypernetwork generates both from 64 hidden units, so its two heads hold
4.6M parameters each. This script times, on random data of those shapes (in-process, 2 threads):

- a whole PPO gradient step (`ppo_update` over 30 minibatches, one epoch, divided by 30; it
  includes the interference metric, computed once per update);
- generating every agent's weights, forward and backward (`Agent.generate`);
- the fused Adam step over all parameters;
- the per-tensor gradient norms (metrics and clip).

    python benchmark/update_step.py            # about 2 minutes on 2 cores

Writes benchmark/results/update_step.md (and prints it).
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ippo_hyper_vmas as script  # noqa: E402
from sps import OneLineParser, at_least  # noqa: E402  (benchmark/ is on sys.path when run as a script)

N_AGENTS, OBS_DIM, ACT_DIM, BATCH = 8, 20, 2, 60_000  # Navigation, 8 agents: 600 envs x 100 steps


def build(family):
    torch.manual_seed(0)
    args = script.resolve_args(script.parse_args(
        ["--scenario", "navigation", "--n-agents", str(N_AGENTS), "--hypernet", family, "--update-epochs", "1"]))
    agent = script.Agent(args, OBS_DIM, ACT_DIM, False, OBS_DIM)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    return args, agent, optimizer


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def generate_forward_backward(agent):
    actor, critic = agent.generate()
    sum(w.sum() + b.sum() for w, b in actor + critic).backward()


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmark", "results", "update_step.md"))
    opts = parser.parse_args()
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(1)
    batch = {key: torch.randn(N_AGENTS, BATCH, *shape, generator=generator)
             for key, shape in (("obs", (OBS_DIM,)), ("actions", (ACT_DIM,)), ("logprobs", ()),
                                ("advantages", ()), ("returns", ()), ("values", ()))}
    setups = {family: build(family) for family in ("fups", "mlp")}
    steps = {family: [] for family in setups}
    for _ in range(opts.repeats):  # interleaved, so that machine noise spreads evenly
        for family, (args, agent, optimizer) in setups.items():
            start = time.perf_counter()
            script.ppo_update(agent, optimizer, batch, args, BATCH)
            steps[family].append(1000 * (time.perf_counter() - start) / args.num_minibatches)
    lines = ["# One gradient step, Navigation with 8 agents (paper minibatch and networks)", "",
             f"Command: `{' '.join(['python', 'benchmark/update_step.py'] + sys.argv[1:])}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, 2 threads, CPU; random data; medians over {opts.repeats} repeats", "",
             "| family | parameters | gradient step ms | generate fwd + bwd ms | fused Adam ms | gradient norms ms |",
             "|---|---|---|---|---|---|"]
    for family, (args, agent, optimizer) in setups.items():
        generate = median_ms(lambda: (optimizer.zero_grad(), generate_forward_backward(agent)), 20)
        adam = median_ms(optimizer.step, 20)
        norms = median_ms(lambda: [torch.linalg.vector_norm(p.grad) for p in agent.parameters() if p.grad is not None], 20)
        count = sum(p.numel() for p in agent.parameters())
        lines.append(f"| {family} | {count:,} | {statistics.median(steps[family]):.1f} | {generate:.1f} | "
                     f"{adam:.1f} | {norms:.1f} |")
    ratio = statistics.median(steps["fups"]) / statistics.median(steps["mlp"])
    lines += ["", f"Gradient steps per second, mlp / fups: {ratio:.2f}", ""]
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
