"""REINFORCE in the Specialisation and Synchronisation games (section 3, appendix B, Tables 2, 6, 8).

n agents each pick one of n foods once per trial, with no observation. Specialisation pays agent i 1 / k_i,
k_i the agents on its food; Synchronisation pays everyone 1 if all chose one food, else 1/n. Every agent
learns from the team payoff (their mean: a common-payoff game, as Table 1 is), normalised over each batch
(the evidence for these readings: benchmark/results/matrix_games.md). Read top to bottom:
    Args               Table 8's values; [linear] and [mlp] mark the flags of one family
    Hypernetworks      Eq. (5) LinearHypernet, Eq. (6) MLPHypernet, their init (section 4.3)
    Policies           nops, fups-noid (Table 2's FuPS), fups (FuPS+ID), linear, mlp; S seeds as one vmapped batch
    The training loop  train(): sample a batch of trials, pay it, REINFORCE, log, evaluate
    The update         REINFORCE, each agent's gradient apart
    Evaluation         argmax (Table 2), sampled (Table 6), SND (Eq. 9), gradient interference
    The games          the payoffs, and sampling with one torch.Generator per seed
    Appendix           main, run folders, check_args (a table of rule and message)
Quick start:  python reinforce_matrix_games.py --game specialisation --n-agents 8 --hypernet mlp
              python benchmark/matrix_games.py   # Tables 2, 6 and 8, the paper's values beside ours
"""

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.func import functional_call, stack_module_state, vmap

try:  # --save-model, run folders that never collide, --runs-dir and --track checked: a library, optional
    import hypermarl_extras as extras
except ImportError:
    extras = None

# ===== Args: Table 8's values =====
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # first seed; --num-seeds S trains seeds seed .. seed+S-1 (evaluation draws use seed + 10000)
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    track: bool = False  # if toggled, track the run with Weights and Biases (pip install wandb)
    wandb_project_name: str = "hypermarl"  # the wandb's project name
    wandb_entity: Optional[str] = None  # the entity (team) of wandb's project
    runs_dir: str = "runs"  # folder for TensorBoard logs (runs_dir/run_name, one run per seed)
    save_model: bool = False  # save each seed's final parameters to run_name/model.pt (needs hypermarl_extras.py)
    num_threads: int = 1  # torch CPU threads (the networks are tiny: one thread is fastest)
    memory_check: bool = True  # refuse a run whose memory (a lower bound) exceeds the machine's; --no-...: try anyway

    game: Literal["specialisation", "synchronisation"] = "specialisation"  # 1/k_i to agent i | 1 if all agree, else 1/n
    n_agents: int = 2  # number of agents and of foods (actions); at least 2
    hypernet: Literal["nops", "fups", "fups-noid", "linear", "mlp"] = "nops"  # fups: FuPS+ID, fups-noid: Table 2's FuPS
    hidden_size: int = 4  # hidden units of each agent's network; fups, fups-noid: hidden_size * n_agents (Table 8)
    hyper_linear_shared_bias: bool = True  # [linear] Eq. (5)'s shared bias b (without it: NoPS, initialised as in 4.3)
    hypernet_embedding_dim: int = 4  # [mlp] size of the learned, orthogonally initialised agent embedding
    hypernet_hidden_dims: list[int] = field(default_factory=lambda: [8])  # [mlp] hidden layers of the hypernetwork

    num_trials: int = 10_000  # training trials (every agent picks a food in each); updates = num_trials // batch_size
    batch_size: int = 10  # trials per SGD update
    learning_rate: float = 0.01  # SGD learning rate
    reward: Literal["team", "individual"] = "team"  # team: the mean payoff over agents | individual: the agent's own
    returns: Literal["normalize", "baseline", "raw"] = "normalize"  # per batch: mean 0, std 1 | minus the mean | raw
    num_seeds: int = 1  # seeds trained together as one batch (benchmark/matrix_games.py: the sweep of Tables 2 and 6)
    eval_trials: int = 1_000  # trials of the sampled-action evaluation (the argmax one is a single joint action)
    eval_interval: int = 100  # training trials between evaluations: the first update at or past each multiple
    log_interval: int = 10  # updates between TensorBoard points of the training metrics

# ===== Hypernetworks (Eq. 5, Eq. 6, section 4.3): ippo_hyper_vmas.py's, without observations =====
def layer_shapes(sizes: list[int]) -> list[tuple[int, int]]:
    return list(zip(sizes[:-1], sizes[1:]))

def num_target_params(sizes: list[int]) -> int:
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in layer_shapes(sizes))

def target_init_vector(sizes: list[int], gains: list[float]) -> torch.Tensor:
    """The target MLP's flat parameters as PPO initialises them (section 4.3): orthogonal, zero biases."""
    chunks = []
    for (fan_in, fan_out), gain in zip(layer_shapes(sizes), gains):
        weight = torch.empty(fan_out, fan_in)
        nn.init.orthogonal_(weight, gain)
        chunks += [weight.T.flatten(), torch.zeros(fan_out)]
    return torch.cat(chunks)

def unflatten_params(theta: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(..., m) flat parameters -> [(W (..., fan_in, fan_out), b (..., 1, fan_out)) per layer].
    One split, not a slice per tensor: a slice's backward writes a zero tensor of all m parameters."""
    shapes = layer_shapes(sizes)
    chunks = theta.split([n for fan_in, fan_out in shapes for n in (fan_in * fan_out, fan_out)], dim=-1)
    return [(chunks[2 * k].unflatten(-1, shape), chunks[2 * k + 1].unsqueeze(-2)) for k, shape in enumerate(shapes)]

def batched_mlp(x: torch.Tensor, params, activation) -> torch.Tensor:
    """All agents' networks, a batched matmul per layer: x (n_agents, batch, fan_in), W (n_agents, fan_in, fan_out)."""
    for k, (weight, bias) in enumerate(params):
        x = torch.baddbmm(bias, x, weight)
        if k < len(params) - 1:
            x = activation(x)
    return x

class LinearHypernet(nn.Module):
    """Eq. (5): theta_i = 1_i W + b. Row i of W is agent i's flattened network; b is shared (without it: NoPS)."""

    def __init__(self, n_agents, sizes, gains, shared_bias=True):
        super().__init__()
        self.sizes = list(sizes)
        self.head = nn.Linear(n_agents, num_target_params(sizes), bias=shared_bias)
        self.register_buffer("ids", torch.eye(n_agents))
        with torch.no_grad():  # section 4.3: every agent starts with its own orthogonal network
            for i in range(n_agents):
                self.head.weight[:, i] = target_init_vector(sizes, gains)
            if shared_bias:
                self.head.bias.zero_()

    def forward(self):
        return unflatten_params(self.head(self.ids), self.sizes)  # theta (n_agents, m) as [(W, b) per layer]

class MLPHypernet(nn.Module):
    """Eq. (6): theta_i = f(g(e_i)), an MLP g (ReLU) on the agent embedding e_i (orthogonal, gain sqrt(2)), then
    a linear head f, one (g, f) per generated tensor (the authors' code). Init "scaled" (section 4.3): g as Flax's
    default, column j of a weight head a flattened orthogonal matrix with the target layer's gain, zero bias heads.
    Hidden layers [8]: 330/428/624 parameters at n = 2/4/8."""

    def __init__(self, n_agents, sizes, gains, embedding_dim, hidden_dims):
        super().__init__()
        self.shapes = layer_shapes(sizes)
        self.embedding = nn.Parameter(nn.init.orthogonal_(torch.empty(n_agents, embedding_dim), np.sqrt(2)))
        widths = [embedding_dim, *hidden_dims]  # g's layers, a ReLU after each
        self.trunks, self.heads = nn.ModuleList(), nn.ModuleList()  # W_1, b_1, W_2, b_2, ...
        for size in (n for fan_in, fan_out in self.shapes for n in (fan_in * fan_out, fan_out)):
            self.trunks.append(nn.Sequential(*(m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU()))))
            self.heads.append(nn.Linear(widths[-1], size))
        with torch.no_grad():
            for layer in (m for trunk in self.trunks for m in trunk if isinstance(m, nn.Linear)):
                std = layer.in_features ** -0.5 / 0.8796256610342398  # Flax's lecun_normal: truncated at 2 std
                nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
                layer.bias.zero_()
            for k, ((fan_in, fan_out), gain) in enumerate(zip(self.shapes, gains)):
                weight_head, bias_head = self.heads[2 * k], self.heads[2 * k + 1]
                for j in range(widths[-1]):
                    weight_head.weight[:, j] = target_init_vector([fan_in, fan_out], [gain])[: fan_in * fan_out]
                for tensor in (weight_head.bias, bias_head.weight, bias_head.bias):
                    tensor.zero_()

    def forward(self):
        theta = [head(trunk(self.embedding)) for trunk, head in zip(self.trunks, self.heads)]
        return [(theta[2 * k].unflatten(-1, shape), theta[2 * k + 1].unsqueeze(-2)) for k, shape in enumerate(self.shapes)]

# ===== Policies: every agent's logits (n_agents, n_foods), from the input 1 or its one-hot ID =====
class Policy(nn.Module):
    """nops, linear, mlp: every agent's own 1 -> hidden -> n network, stacked (n_agents, fan_in, fan_out): NoPS's
    with PyTorch's default init, or generated by a hypernetwork (gains sqrt(2), 0.01: section 4.3). fups-noid, fups:
    one network of hidden * n units on the input 1 or the one-hot ID (Table 8: 34/100/328, 42/148/552 at n=2/4/8)."""

    def __init__(self, hypernet: str, n_agents: int, args: Args):
        super().__init__()
        sizes, gains, self.n_agents = [1, args.hidden_size, n_agents], [math.sqrt(2), 0.01], n_agents
        self.weight_net = self.net = None
        if hypernet == "linear":
            self.weight_net = LinearHypernet(n_agents, sizes, gains, args.hyper_linear_shared_bias)
        elif hypernet == "mlp":
            self.weight_net = MLPHypernet(n_agents, sizes, gains, args.hypernet_embedding_dim, args.hypernet_hidden_dims)
        elif hypernet == "nops":
            nets = [[nn.Linear(i, o) for i, o in layer_shapes(sizes)] for _ in range(n_agents)]
            self.weights = nn.ParameterList(torch.stack([net[k].weight.detach().T for net in nets]) for k in range(2))
            self.biases = nn.ParameterList(torch.stack([net[k].bias.detach()[None] for net in nets]) for k in range(2))
        else:  # fups, fups-noid: one network for all
            width, inputs = args.hidden_size * n_agents, n_agents if hypernet == "fups" else 1
            self.net = nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, n_agents))
        obs = {"fups": torch.eye(n_agents), "fups-noid": torch.ones(1, 1)}.get(hypernet, torch.ones(n_agents, 1, 1))
        self.register_buffer("obs", obs)

    def forward(self):
        if self.net is not None:  # shared: one row of logits for all (fups-noid) or one per ID (fups)
            return self.net(self.obs).expand(self.n_agents, -1)
        params = list(zip(self.weights, self.biases)) if self.weight_net is None else self.weight_net()
        return batched_mlp(self.obs, params, torch.relu).squeeze(1)

def count_params(hypernet: str, n_agents: int, args: Args) -> int:
    return sum(p.numel() for p in Policy(hypernet, n_agents, args).parameters())

class Population:
    """S seeds of one family, stacked: every parameter has a leading seed dimension, and one vmapped
    functional_call runs every seed's policy. Seed s is initialised after torch.manual_seed(s)."""

    def __init__(self, hypernet: str, n_agents: int, seeds: list[int], args: Args):
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(Policy(hypernet, n_agents, args))
        self.base = models[0]
        self.params, self.buffers = stack_module_state(models)
        self._forward = vmap(lambda p, b: functional_call(self.base, (p, b), ()))

    def logits(self) -> torch.Tensor:
        return self._forward(self.params, self.buffers)  # (S, n_agents, n_foods)

# ===== The training loop =====
def train(game: str, hypernet: str, n_agents: int, seeds: list[int], args: Args, writers=(), pop=None,
          progress: bool = False) -> dict:
    """REINFORCE for every seed at once: per-seed final metrics, learning curves and the trained population.
    pop: a Population to train (default: a new one). progress: a line once a minute (time, estimate)."""
    pop = Population(hypernet, n_agents, seeds, args) if pop is None else pop
    params, num_updates = list(pop.params.values()), args.num_trials // args.batch_size
    optimizer = torch.optim.SGD(params, lr=args.learning_rate)
    # one per seed, a stream of its own: torch.manual_seed(seed) drew its initial weights (SeedSequence: apart)
    generators = [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1, np.uint64)[0]))
                  for seed in seeds]
    history, evals = [], [(0, evaluate(pop, game, seeds, args.eval_trials, writers, 0))]
    start = printed_at = time.time()
    for update in range(1, num_updates + 1):
        # ALGO LOGIC: every agent of every seed plays batch_size trials
        logits = pop.logits()  # (S, n, A)
        with torch.no_grad():
            actions = sample_actions(torch.softmax(logits, -1), args.batch_size, generators)  # (S, B, n)
            rewards = payoff(game, actions, n_agents)
            if args.reward == "team":  # every agent learns from the team's payoff (Table 1: both players get the same)
                rewards = rewards.mean(-1, keepdim=True).expand_as(rewards)

        # REINFORCE: each agent's gradient apart (for the interference); their sum is the update's
        per_agent_loss = reinforce_loss(logits, actions, rewards, args.returns)  # (S, n)
        agent_grads = per_agent_gradients(per_agent_loss, params)  # (n, S, P)
        grad = agent_grads.sum(0)  # (S, P): d(sum_i loss_i)/d(params) per seed
        for param, g in zip(params, grad.split([p[0].numel() for p in params], -1)):  # (S, P) back to each tensor
            param.grad = g.reshape(param.shape).clone()
        optimizer.step()

        # metrics: gradient variance across all policy parameters (section 5.2), interference, TensorBoard
        with torch.no_grad():
            history.append(dict(reward=rewards.mean((1, 2)), loss=per_agent_loss.sum(-1), grad_var=grad.var(-1),
                                grad_norm=grad.norm(dim=-1), interference=interference_per_seed(agent_grads)))
        trials, stats = update * args.batch_size, history[-1]
        if update % args.log_interval == 0 or update == num_updates:
            log(writers, trials, {"charts/episodic_return": stats["reward"], "losses/policy_loss": stats["loss"],
                                  "grad/actor_var": stats["grad_var"], "grad/actor_norm": stats["grad_norm"],
                                  "grad/interference": stats["interference"],
                                  "charts/SPS": int(trials * n_agents / max(time.time() - start, 1e-9))})
        if trials // args.eval_interval > (trials - args.batch_size) // args.eval_interval or update == num_updates:
            evals.append((trials, evaluate(pop, game, seeds, args.eval_trials, writers, trials)))  # the last: final
        if progress and update < num_updates and time.time() - printed_at >= 60:  # short runs print no progress
            elapsed = (printed_at := time.time()) - start
            print(f"trials={trials}/{num_updates * args.batch_size} train_reward={stats['reward'].mean().item():.4f} "
                  f"elapsed={duration(elapsed)} eta={duration(elapsed / update * (num_updates - update))}", flush=True)
    over = {key: torch.stack([h[key] for h in history]) for key in ("reward", "grad_var", "interference")}  # (U, S)
    curve = {key: torch.stack([ev[key] for _, ev in evals], 1).tolist() for key in ("argmax", "sampled", "snd")}
    return dict(**{key: evals[-1][1][key].tolist() for key in curve}, grad_var=over["grad_var"].mean(0).tolist(),
                interference=over["interference"].mean(0).tolist(),  # both averaged over training (section 5.2)
                train_reward_last100=over["reward"][-100:].mean(0).tolist(),
                curve=dict(trials=[t for t, _ in evals], **curve), population=pop)  # learning curves, (S, evals)

# ===== The update: REINFORCE =====
def reinforce_loss(logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, mode: str) -> torch.Tensor:
    """REINFORCE (Williams, 1992), one step: every agent's loss (S, n) = -sum over the batch of R_i log pi_i(a_i),
    R_i its reward (raw), minus the batch mean (baseline) or scaled to mean 0, std 1 (normalize). rewards (S, B, n)."""
    # log pi_i(a_i), (S, n, B). Not Categorical.log_prob: its normalisation differs from log_softmax in the
    # last float bit, which moves committed Table 6 cells in the 4th decimal (linear, Specialisation, n = 8)
    logp = torch.log_softmax(logits, -1).gather(-1, actions.transpose(1, 2))
    returns = rewards.transpose(1, 2)
    if mode in ("baseline", "normalize"):
        returns = returns - returns.mean(-1, keepdim=True)
    if mode == "normalize":
        std = returns.std(-1, keepdim=True, correction=min(1, returns.shape[-1] - 1))
        returns = returns / (std + np.finfo(np.float32).eps)
    return -(returns * logp).sum(-1)

def per_agent_gradients(per_agent_loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """d(loss_i)/d(all parameters) for every agent i and seed, (S, n) -> (n, S, P): one batched backward pass."""
    S, n = per_agent_loss.shape
    grads = torch.autograd.grad(per_agent_loss, params, grad_outputs=torch.eye(n).unsqueeze(1).expand(n, S, n),
                                is_grads_batched=True, allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(n, S, -1) for g in grads], -1)

# ===== Evaluation: Tables 2 and 6, SND (Eq. 9), gradient interference =====
def evaluate(pop: Population, game: str, seeds: list[int], eval_trials: int, writers=(), step: int = 0) -> dict:
    """Mean-over-agents reward with argmax actions (Table 2: every trial is the same) and over eval_trials
    sampled trials (Table 6; common random numbers, seed + 10000 at every evaluation); SND, Eq. (9)
    without observations: the agents' mean pairwise Jensen-Shannon distance. Logged at `step`."""
    with torch.no_grad():
        probs = torch.softmax(pop.logits(), -1)  # (S, n, A)
    n, generators = probs.shape[1], [torch.Generator().manual_seed(seed + 10_000) for seed in seeds]
    i, j = torch.triu_indices(n, n, offset=1)  # every pair of agents
    ev = dict(argmax=payoff(game, probs.argmax(-1), n).mean(-1),
              sampled=payoff(game, sample_actions(probs, eval_trials, generators), n).mean((1, 2)),
              snd=js_distance_categorical(probs[:, i], probs[:, j]).mean(-1))
    log(writers, step, {"eval/episodic_return": ev["argmax"], "eval/episodic_return_sampled": ev["sampled"],
                        "diversity/snd": ev["snd"]})
    return ev

def js_distance_categorical(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance in base 2 (in [0, 1]) between categorical distributions (..., k)."""
    p, q = p.double(), q.double()  # float32 keeps few digits of near-equal policies' distance: they moved run to run
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log2(a) - torch.log2(b.clamp_min(1e-30))), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(0.0, 1.0).sqrt()

def interference_per_seed(agent_grads: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the agents' gradients (n, S, P) -> (S,): 0 for disjoint
    parameters (NoPS), > 0 when updates agree, < 0 when they conflict. A zero gradient counts as 0."""
    n = agent_grads.shape[0]
    unit = F.normalize(agent_grads, dim=-1).transpose(0, 1)  # (S, n, P)
    cosine = unit @ unit.transpose(1, 2)
    return (cosine.sum((1, 2)) - cosine.diagonal(dim1=1, dim2=2).sum(-1)) / (n * (n - 1))

def log(writers, step: int, scalars: dict) -> None:
    """A TensorBoard point per seed: scalars maps a tag to per-seed values (S,), or to one number for all."""
    for s, writer in enumerate(writers):
        for tag, value in scalars.items():
            writer.add_scalar(tag, value if isinstance(value, (int, float)) else float(value[s]), step)

# ===== The games: n players, n foods, one step =====
def payoff(game: str, actions: torch.Tensor, n_agents: int) -> torch.Tensor:
    """Every agent's reward for joint actions (..., n_agents) of foods in [0, n_agents)."""
    counts = F.one_hot(actions, n_agents).sum(-2)  # (..., n_foods)
    k = counts.gather(-1, actions).float()  # (..., n_agents): agents on each agent's food
    if game == "specialisation":
        return 1.0 / k
    all_match = (k == n_agents).all(-1, keepdim=True)
    return torch.where(all_match, torch.ones_like(k), torch.full_like(k, 1.0 / n_agents))

def sample_actions(probs: torch.Tensor, num: int, generators: list) -> torch.Tensor:
    """probs (S, n_agents, A) -> actions (S, num, n_agents) by inverse CDF, with each seed's own torch.Generator."""
    u = torch.stack([torch.rand(probs.shape[1], num, generator=g) for g in generators])  # (S, n, num)
    actions = torch.searchsorted(probs.cumsum(-1).contiguous(), u).clamp_(max=probs.shape[-1] - 1)  # first CDF >= u
    return actions.transpose(1, 2)

# ===== Appendix: the command line, run folders, check_args =====
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(token) for token in argv]
    args = tyro.cli(Args, args=argv)  # a bad choice or type: tyro's own message, exit 2
    try:  # ranges and combinations (check_args): one line, exit 2, nothing written
        check_args(args, flags_given(argv))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Seeding: each seed seeds its own model (Population) and draws (train, evaluate), so nothing else is seeded
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.num_threads)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    try:  # the kernel may refuse what access() allows (/proc, to root): one line, nothing written
        writers = make_writers(args, args.game, args.n_agents, args.hypernet, seeds)
    except OSError as error:
        print(f"error: --runs-dir: cannot create a run folder in {args.runs_dir!r} ({error.strerror})", file=sys.stderr)
        return 2
    print("config: " + " ".join(f"{key}={value}" for key, value in vars(args).items()))
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=f"matrix__{args.exp_name}__{args.seed}__{int(time.time())}", save_code=True)
    print(f"parameters: {args.hypernet} {count_params(args.hypernet, args.n_agents, args)}")

    start = time.time()
    try:
        result = train(args.game, args.hypernet, args.n_agents, seeds, args, writers, progress=True)
        log(writers, args.num_trials, {"eval/final_grad_var_mean": result["grad_var"],
                                       "eval/final_interference_mean": result["interference"]})
    finally:
        for writer in writers:
            writer.close()
    for s, seed in enumerate(seeds):
        print(f"seed={seed} eval/episodic_return={result['argmax'][s]:.4f} "
              f"eval/episodic_return_sampled={result['sampled'][s]:.4f} grad/actor_var={result['grad_var'][s]:.3e} "
              f"grad/interference={result['interference'][s]:.4f} diversity/snd={result['snd'][s]:.4f}")
    if not np.isfinite(result["grad_var"]).all():  # a seed diverged: its model is not worth saving
        print("error: the loss became NaN/inf; use a smaller --learning-rate", file=sys.stderr)
        return 1
    if args.save_model:  # every seed's parameters, to its run folder (hypermarl_extras.py)
        extras.save_matrix_models(args, seeds, [writer.log_dir for writer in writers], result["population"])
    print(f"{args.game} n={args.n_agents} {args.hypernet}: argmax {np.mean(result['argmax']):.4f} ± "
          f"{np.std(result['argmax']):.4f}, sampled {np.mean(result['sampled']):.4f} ± {np.std(result['sampled']):.4f}"
          f" ({duration(time.time() - start)}, runs in {args.runs_dir})")
    return 0

def make_writers(args: Args, game: str, n_agents: int, hypernet: str, seeds: list[int]):
    """A TensorBoard run per seed: runs_dir/matrix_<game>_n<n>__<exp_name>__<hypernet>__<seed>__<time>."""
    from torch.utils.tensorboard import SummaryWriter
    writers, config = [], "".join(f"|{key}|{value}|\n" for key, value in vars(args).items())
    for seed in seeds:  # a copy alone: a plain folder (the seed is in its name)
        prefix = f"matrix_{game}_n{n_agents}__{args.exp_name}__{hypernet}__{seed}"
        run_name = extras.new_run_folder(args.runs_dir, prefix) if extras else f"{prefix}__{int(time.time())}"
        writers.append(SummaryWriter(os.path.join(args.runs_dir, run_name)))
        writers[-1].add_text("hyperparameters", f"|param|value|\n|-|-|\n{config}|game|{game}|\n|hypernet|{hypernet}|\n"
                                                f"|n_agents|{n_agents}|\n|run_seed|{seed}|")
    return writers

def check_args(args: Args, given: set[str], hypernets: Optional[list[str]] = None) -> None:
    """ValueError("--flag: why") for the table's first broken rule; given: the flags named; hypernets: the sweep's."""
    trained = f"--hypernet {args.hypernet}" if hypernets is None else f"--hypernets {' '.join(hypernets)}"
    family_of = {"hyper_linear_shared_bias": "linear", "hypernet_embedding_dim": "mlp", "hypernet_hidden_dims": "mlp"}
    max_seed = 2**32 - 1 - 10_000  # NumPy takes seeds below 2**32; the evaluation draws with seed + 10000
    need, have = memory_needed(args), (extras.machine_memory(False) if extras else None) or math.inf
    rules = [  # (flag, broken, why), in order: the first broken one is the error
        *((name, family not in (hypernets or [args.hypernet]), f"only with --hypernet {family}, got {trained}")
          for name, family in family_of.items() if name in given),  # the flags marked [family] in --help
        ("n_agents", args.n_agents < 2, f"must be at least 2, got {args.n_agents}"),
        *((name, not math.isfinite(value), f"must be a finite number, got {value!r}")  # inf, nan pass every >
          for name, value in vars(args).items() if isinstance(value, float)),
        ("seed", not 0 <= args.seed <= max_seed, f"must be between 0 and {max_seed}, got {args.seed!r}"),
        ("runs_dir", not args.runs_dir, "must name a folder, got ''"),  # a copy alone would write into the current one
        ("runs_dir", args.runs_dir.encode(errors="replace").decode() != args.runs_dir, "must be UTF-8 text (TensorBoard's)"),
        ("exp_name", not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{,127}", args.exp_name), "must be a plain name (letters, "
         f"digits, '.', '_', '-'; at most 128), got {args.exp_name[:128]!r} ({len(args.exp_name)} characters)"),
        *((name, not getattr(args, name) > 0, f"must be positive, got {getattr(args, name)!r}") for name in (
            "num_trials", "batch_size", "learning_rate", "num_seeds", "eval_trials", "eval_interval", "log_interval",
            "hidden_size", "hypernet_embedding_dim", "num_threads")),
        ("num_threads", args.num_threads > 1024, f"must be at most 1024, got {args.num_threads}"),
        ("hypernet_hidden_dims", not args.hypernet_hidden_dims or min(args.hypernet_hidden_dims) <= 0,
         f"must be one or more positive sizes, got {args.hypernet_hidden_dims!r}"),
        ("num_seeds", args.seed + args.num_seeds - 1 > max_seed,
         f"the last seed, {args.seed} + {args.num_seeds} - 1, must be at most {max_seed}, got {args.num_seeds!r}"),
        ("num_trials", args.num_trials < args.batch_size,
         f"must be at least --batch-size = {args.batch_size}, got {args.num_trials!r}"),
        ("track", args.track and not importlib.util.find_spec("wandb"), "wandb is not installed (pip install wandb)"),
        ("save_model", args.save_model and not extras, "needs hypermarl_extras.py beside this script"),
        ("n_agents", args.memory_check and need > have, f"{args.n_agents} agents x {args.num_seeds} seeds need at least "
         f"{need / 2**30:,.1f} GiB, more than this machine's {have / 2**30:,.1f} GiB; use fewer, or --no-memory-check"),
    ]
    for name, broken, why in rules:
        if broken:  # a boolean given False is named as written, --no-x
            raise ValueError(f"{'--no-' if getattr(args, name) is False else '--'}{name.replace('_', '-')}: {why}")
    if extras:  # --runs-dir a folder it may write in, wandb installed for --track (a copy alone: at the first write)
        extras.check_output(args)

def memory_needed(args: Args) -> int:
    """A lower bound of the bytes a run holds at its peak, the largest of: every agent's gradient of every seed's
    parameters (twice: the interference normalises a copy), an evaluation's one-hot counts (int64), SND's pairs."""
    n, S, h, e, hyper = args.n_agents, args.num_seeds, args.hidden_size, args.hypernet_embedding_dim, args.hypernet
    m = num_target_params([1, h, n])  # one agent's network
    trunks = n * e + 4 * num_target_params([e, *args.hypernet_hidden_dims])  # [mlp] one per W_1, b_1, W_2, b_2
    params = {"nops": n * m, "linear": (n + 1) * m, "mlp": ((args.hypernet_hidden_dims or [0])[-1] + 1) * m + trunks,
              "fups-noid": num_target_params([1, h * n, n]), "fups": num_target_params([n, h * n, n])}[hyper]
    return S * max(8 * n * params + 8 * args.batch_size * n * n, 8 * args.eval_trials * n * n, 6 * n * n * (n - 1))

def flags_given(argv: list[str]) -> set[str]:
    """The Args fields named on the command line (--x, --x=v, --no-x)."""
    names = {f.name for f in dataclasses.fields(Args)}
    tokens = [token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")]
    return {name[3:] if name not in names and name.startswith("no_") else name for name in tokens} & names

def duration(seconds: float) -> str:  # 1h02m, 3m05s or 12s
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

if __name__ == "__main__":
    sys.exit(main())
