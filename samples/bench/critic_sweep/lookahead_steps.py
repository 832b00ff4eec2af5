"""Held-out EV of the look-ahead reward with m = 1, 2, 4 Euler steps (docs/algorithms.md, "The critic"):

    python samples/bench/critic_sweep/lookahead_steps.py samples/configs/frontier_jpeg.yaml 6

Base-model rollouts of 6 iterations (384 images); a, b of V = a z_k + b fitted on the first half, EV on the second.
"""
import torch, sys
from flowalign.config import ACFlowConfig
from flowalign.trainer import ACFlowTrainer
from flowalign import objectives as O
from flowalign import seeding
cfg = ACFlowConfig.from_yaml(sys.argv[1], {"output_dir": "/tmp/evp", "eval_prompts": 0, "progress": False})
tr = ACFlowTrainer(cfg)
M = [1, 2, 4]
R, F, G = [], {m: [] for m in M}, []
K = tr.sde_steps
for it in range(int(sys.argv[2])):
    prompts = [p for p in tr.iteration_prompts(it) for _ in range(cfg.images_per_prompt)]
    roll = tr.rollout(prompts, seeding.generator(99, it, 1), "sde")
    r = tr.score(tr.decode(roll.latents), prompts)
    neg = tr.encode([""] * len(prompts))
    for m in M:
        cols = []
        for k in range(K):
            s = float(roll.sigmas[k]); x = roll.trajectory[:, k]
            grid = torch.linspace(s, 0, m + 1)
            v = roll.velocities[:, k]
            for j in range(m):
                if j > 0:
                    with torch.no_grad():
                        v = tr.cfg_velocity(tr.unwrapped, x, torch.full((x.shape[0],), float(grid[j])), roll.embeds, roll.pooled, *neg)
                x = x + (grid[j + 1] - grid[j]) * v
            cols.append(tr.score(tr.decode(x), prompts))
        F[m].append(torch.stack(cols, 1))
    G.append(torch.arange(cfg.prompts_per_iteration).repeat_interleave(cfg.images_per_prompt) + 100 * it); R.append(r)
r, g = torch.cat(R), torch.cat(G)
t = O.shape_rewards(r, g, clip=3.0)
half = r.shape[0] // 2
def ev_fit(x, y):
    X = torch.stack([x, torch.ones_like(x)], 1)
    sol = torch.linalg.lstsq(X[:half], y[:half, None]).solution
    pred = (X @ sol).squeeze(1)
    return round(float(O.explained_variance(pred[half:], y[half:])), 3)
for m in M:
    la = torch.cat(F[m])
    print(f"m={m}", [ev_fit(O.shape_rewards(la[:, k], g, clip=3.0), t) for k in range(K)])
