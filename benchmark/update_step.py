"""Where a gradient step's time goes: FuPS against the MLP hypernetwork on Navigation (8 agents).

The paper's Navigation settings give 2,000-sample minibatches per agent and 256-256 actor and
critic networks. The MLP hypernetwork generates both from 64 hidden units, so the heads of each
hold 4.6M parameters. This script times, on random data of those shapes (in-process, 2 threads):

- a whole PPO gradient step (`ppo_update` over 30 minibatches, one epoch, divided by 30; it
  includes the interference metric, computed once per update);
- generating every agent's weights, forward and backward (`Agent.generate`);
- the fused Adam step over all parameters;
- the per-tensor gradient norms (metrics and clip).

The last three are the work the MLP hypernetwork adds to a FuPS step and cannot skip. Their extra
cost over FuPS predicts the step ratio, mlp / fups = fups step / (fups step + that extra), if the rest
of the two steps cost the same (it does not quite: the measured ratio may differ by a few percent).
The prediction is given twice:

- from the isolated timings above (warm caches, so the extra at its lowest);
- from the same operations inside the real step (torch.profiler's self time of the matmuls
  `mm`/`addmm`, `_fused_adam_`, `linalg_vector_norm` and `cat`, which FuPS barely uses), where
  the 9.3M parameters, their gradients and Adam's state (150 MB) no longer sit in the cache.

The third row is HyperMARL-S (section 6: hypernetwork hidden layer 32 instead of 64), for comparison.

    python benchmark/update_step.py            # about 3 minutes on 2 cores

Writes update_step.md (and prints it) to a new folder runs/update_step_<time>, or to the file --out names.
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
from sps import OneLineParser, at_least, output_file, script_args, write_report  # noqa: E402  (benchmark/ is on sys.path when run as a script)

N_AGENTS, OBS_DIM, ACT_DIM, BATCH = 8, 20, 2, 60_000  # Navigation, 8 agents: 600 envs x 100 steps


FAMILIES = {"fups": ["--hypernet", "fups"], "mlp": ["--hypernet", "mlp"],
            "mlp, hidden 32 (HyperMARL-S)": ["--hypernet", "mlp", "--hypernet-hidden-dims", "32"]}


def build(family_argv):
    torch.manual_seed(0)
    args = script_args(script, ["--scenario", "navigation", "--n-agents", str(N_AGENTS), "--update-epochs", "1"]
                       + family_argv)
    agent = script.Agent(args, OBS_DIM, ACT_DIM, False)
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


HYPERNET_OPS = ("aten::mm", "aten::addmm", "aten::_fused_adam_", "aten::linalg_vector_norm", "aten::cat")


def in_step_ms(args, agent, optimizer, batch):
    """Self time per gradient step of HYPERNET_OPS inside one real ppo_update."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        script.ppo_update(agent, optimizer, batch, args)
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in HYPERNET_OPS)
    return total_us / 1000 / args.num_minibatches


def generate_forward_backward(agent):
    actor, critic = agent.generate(None)  # the observations matter to the w/o GD ablation only
    sum(w.sum() + b.sum() for w, b in actor + critic).backward()


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--out", default=None, help="the Markdown file to write (default: update_step.md in a new folder runs/update_step_<time>)")
    opts = parser.parse_args()
    opts.out = output_file(parser, opts.out, "update_step", "update_step.md")
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(1)
    batch = {key: torch.randn(N_AGENTS, BATCH, *shape, generator=generator)
             for key, shape in (("obs", (OBS_DIM,)), ("actions", (ACT_DIM,)), ("logprobs", ()),
                                ("advantages", ()), ("returns", ()), ("values", ()))}
    setups = {family: build(argv) for family, argv in FAMILIES.items()}
    steps = {family: [] for family in setups}
    for _ in range(opts.repeats):  # interleaved, so that machine noise spreads evenly
        for family, (args, agent, optimizer) in setups.items():
            start = time.perf_counter()
            script.ppo_update(agent, optimizer, batch, args)
            steps[family].append(1000 * (time.perf_counter() - start) / args.num_minibatches)
    lines = ["# One gradient step, Navigation with 8 agents (paper minibatch and networks)", "",
             f"Command: `{' '.join(['python', 'benchmark/update_step.py'] + sys.argv[1:])}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, 2 threads, CPU; random data; medians over {opts.repeats} repeats", "",
             "| family | parameters | gradient step ms | generate fwd + bwd ms | fused Adam ms | gradient norms ms "
             "| the same ops, in the step ms |",
             "|---|---|---|---|---|---|---|"]
    parts, in_step = {}, {}
    for family, (args, agent, optimizer) in setups.items():
        generate = median_ms(lambda: (optimizer.zero_grad(), generate_forward_backward(agent)), 20)
        adam = median_ms(optimizer.step, 20)
        norms = median_ms(lambda: [torch.linalg.vector_norm(p.grad) for p in agent.parameters() if p.grad is not None], 20)
        parts[family] = generate + adam + norms
        in_step[family] = statistics.median(in_step_ms(args, agent, optimizer, batch) for _ in range(3))
        count = sum(p.numel() for p in agent.parameters())
        lines.append(f"| {family} | {count:,} | {statistics.median(steps[family]):.1f} | {generate:.1f} | "
                     f"{adam:.1f} | {norms:.1f} | {in_step[family]:.1f} |")
    fups = statistics.median(steps["fups"])
    lines += ["", "| family | gradient steps per second / fups | predicted by the isolated timings "
              "| predicted by the same ops in the step |", "|---|---|---|---|"]
    for family in list(setups)[1:]:
        isolated = fups / (fups + parts[family] - parts["fups"])
        real = fups / (fups + in_step[family] - in_step["fups"])
        lines.append(f"| {family} | {fups / statistics.median(steps[family]):.2f} | {isolated:.2f} | {real:.2f} |")
    lines.append("")
    write_report(opts.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
