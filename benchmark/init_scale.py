"""Initialisation scaling (section 4.3): the scale of every generated layer against the target's.

Section 4.3's target is the network PPO would initialise: orthogonal weights with gain sqrt(2) in
the hidden layers, 0.01 in the actor's output layer, 1.0 in the critic's, zero biases. Its scale
per layer is the RMS singular value, the gain. For every generated layer of actor and critic, per
agent, this script measures the same quantity, ||W_i||_F / sqrt(min(fan_in, fan_out)), and
divides it by the gain (1.00 = the target's scale), for:

- both VMAS scripts (IPPO; MAPPO, whose critic sees the global state) and both scenarios, with
  the architectures the scripts resolve (their Args and Navigation presets; --n-agents agents);
- both embeddings (learned, onehot);
- the four --hypernet-init values: scaled (the authors' scheme, default), matched (ours),
  flax (the w/o RF ablation: the authors' code without the scaling), pytorch (PyTorch's init).

Each cell is the mean [min, max] over agents and --seeds initialisations (seeds 0, 1, ...).

    python benchmark/init_scale.py            # about 2 minutes on 2 cores

Writes init_scale.md (and prints it) to a new folder runs/init_scale_<time>, or to the file --out names.
"""

import argparse
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ippo_hyper_vmas  # noqa: E402
import mappo_hyper_vmas  # noqa: E402
from sps import OneLineParser, at_least, output_file, write_report, script_args  # noqa: E402  (benchmark/ is on sys.path when run as a script)

SCRIPTS = {"IPPO": ippo_hyper_vmas, "MAPPO": mappo_hyper_vmas}
INITS = ("scaled", "matched", "flax", "pytorch")
EMBEDDINGS = ("learned", "onehot")


def layer_ratios(script, scenario, embedding, init, n_agents, seeds):
    """{(network, layer): (shape, gain, tensor of ratios over seeds x agents)} and the resolved args."""
    args = script_args(script, ["--scenario", scenario, "--n-agents", str(n_agents), "--hypernet", "mlp",
                                "--hypernet-embedding", embedding, "--hypernet-init", init])
    env = script.VmasEnv(args, 1, 0, torch.device("cpu"))
    ratios = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        agent = script.Agent(args, env.obs_dim, env.act_dim, env.discrete)
        with torch.no_grad():
            for network, module in (("actor", agent.actor), ("critic", agent.critic)):
                sizes = module.shapes  # an MLPHypernet
                gains = [math.sqrt(2)] * (len(sizes) - 1) + [0.01 if network == "actor" else 1.0]
                for k, ((weight, bias), shape, gain) in enumerate(zip(module(), sizes, gains)):
                    ratio = weight.flatten(1).norm(dim=1) / (gain * math.sqrt(min(shape)))
                    entry = ratios.setdefault((network, k + 1), (shape, gain, []))
                    entry[2].append(ratio)
    return {key: (shape, gain, torch.cat(values)) for key, (shape, gain, values) in ratios.items()}, args


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=at_least(1), default=10)
    parser.add_argument("--n-agents", type=at_least(2), default=4)
    parser.add_argument("--out", default=None, help="the Markdown file to write (default: init_scale.md in a new folder runs/init_scale_<time>)")
    opts = parser.parse_args()
    try:  # the scripts' own checks (a memory too small for so many agents), before the output folder is made
        for script in (ippo_hyper_vmas, mappo_hyper_vmas):
            script_args(script, ["--n-agents", str(opts.n_agents), "--hypernet", "mlp"])
    except ValueError as error:  # it names --n-agents
        parser.error(str(error))
    opts.out = output_file(parser, opts.out, "init_scale", "init_scale.md")
    torch.set_num_threads(1)

    lines = ["# Scale of the generated layers at initialisation (section 4.3)", "",
             "`python benchmark/init_scale.py"
             + (f" --n-agents {opts.n_agents}" if opts.n_agents != 4 else "")
             + (f" --seeds {opts.seeds}" if opts.seeds != 10 else "") + "`", "",
             f"{opts.n_agents} agents. Per generated layer and agent: ||W_i||_F / sqrt(min(fan_in, fan_out)) / gain,"
             " where the target (PPO's orthogonal init) has exactly 1.00. Mean [min, max] over the agents"
             f" and {opts.seeds} initialisations. `scaled`: the authors' scheme (the default); `matched`:"
             " ours; `flax`: w/o RF, Flax's default heads (the authors' code without the scaling); `pytorch`:"
             " PyTorch's init.", ""]
    worst = {(init, embedding): 0.0 for init in INITS for embedding in EMBEDDINGS}
    for name, script in SCRIPTS.items():
        for scenario in ("dispersion", "navigation"):
            results = {(init, embedding): layer_ratios(script, scenario, embedding, init, opts.n_agents, opts.seeds)
                       for init in INITS for embedding in EMBEDDINGS}
            args = results["scaled", "learned"][1]
            lines += [f"## {name}, {scenario}: actor {args.actor_hidden_dims}, critic {args.critic_hidden_dims}, "
                      f"{args.activation}; hypernetwork hidden {args.hypernet_hidden_dims}, "
                      f"embedding {args.hypernet_embedding_dim}", "",
                      "| layer | fan_in x fan_out | gain | " + " | ".join(f"{i}, {e}" for i in INITS for e in EMBEDDINGS) + " |",
                      "|---|---|---|" + "---|" * (len(INITS) * len(EMBEDDINGS))]
            for key, (shape, gain, _) in results["scaled", "learned"][0].items():
                cells = []
                for init in INITS:
                    for embedding in EMBEDDINGS:
                        r = results[init, embedding][0][key][2]
                        worst[init, embedding] = max(worst[init, embedding], float((r - 1).abs().max()))
                        cells.append(f"{r.mean():.2f} [{r.min():.2f}, {r.max():.2f}]")
                lines.append(f"| {key[0]} {key[1]} | {shape[0]} x {shape[1]} | {gain:.3g} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Largest miss over every layer, agent and initialisation above", "",
              "| --hypernet-init | " + " | ".join(EMBEDDINGS) + " |", "|---|" + "---|" * len(EMBEDDINGS)]
    for init in INITS:
        lines.append(f"| {init} | " + " | ".join(f"{100 * worst[init, e]:.0f}%" for e in EMBEDDINGS) + " |")
    text = "\n".join(lines) + "\n"
    write_report(opts.out, text)
    print(text)


if __name__ == "__main__":
    main()
