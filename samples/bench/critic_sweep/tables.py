"""The critic sweep's EV and stability tables (ev_and_stability.md) from the runs' metrics.csv:

    python samples/bench/critic_sweep/tables.py [SWEEP_DIR] > samples/bench/critic_sweep/ev_and_stability.md
"""
import csv, json, math, glob, os, statistics as st
import sys
root = sys.argv[1] if len(sys.argv) > 1 else "samples/bench/critic_sweep"
def mse(xs):
    xs = [x for x in xs if x == x]
    m = sum(xs) / len(xs); se = (st.stdev(xs) / math.sqrt(len(xs))) if len(xs) > 1 else float('nan')
    return m, se
out = {}
for task in ("jpeg", "credit"):
    print(f"\n## {task}: held-out critic EV per window step k (mean over iterations 3-39, then mean +- SE over seeds)")
    print("| arm | kl_coef | k=0 | k=1 | k=2 | k=3 |")
    print("|---|---|---|---|---|---|")
    for arm in ("acflow_latent", "acflow_lookahead"):
        for kl in ("0.15", "0.5"):
            per_k = {k: [] for k in range(4)}
            for run in sorted(glob.glob(f"{root}/{task}/{arm}-kl{kl}-seed*/result.json")):
                rows = list(csv.DictReader(open(os.path.join(os.path.dirname(run), "metrics.csv"))))
                rows = [r for r in rows if int(float(r["iteration"])) >= 3]
                for k in range(4):
                    per_k[k].append(sum(float(r[f"critic_ev_k{k}"]) for r in rows) / len(rows))
            cells = [mse(per_k[k]) for k in range(4)]
            out[(task, arm, kl)] = cells
            print(f"| {arm} | {kl} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells) + " |")
    print(f"\n## {task}: stability (training-batch reward: largest fall from its running max, mean over seeds; worst seed) and final held-out gains")
    print("| arm | kl_coef | largest fall (mean, worst) | seeds |")
    print("|---|---|---|---|")
    for arm in ("grpo", "acflow_v0", "acflow_latent", "acflow_lookahead"):
        for kl in ("0.15", "0.5"):
            falls = []
            for run in sorted(glob.glob(f"{root}/{task}/{arm}-kl{kl}-seed*/result.json")):
                rows = list(csv.DictReader(open(os.path.join(os.path.dirname(run), "metrics.csv"))))
                r = [float(x["reward_mean"]) for x in rows]
                best, fall = -1e9, 0.0
                for v in r:
                    best = max(best, v); fall = max(fall, best - v)
                falls.append(fall)
            print(f"| {arm} | {kl} | {sum(falls)/len(falls):.3f}, {max(falls):.3f} | {len(falls)} |")
