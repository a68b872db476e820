"""Scratch: TPE search-space designs vs greedy on the measured-cost objective (one shared score cache)."""
import json, sys, time, torch, optuna
from hydra import compose, initialize_config_dir
from specsweep import CONF_DIR
from specsweep.tools import layer_search
from specsweep.drafters.layer_skip import kept_layers
torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides=["experiment=layer_skip_search"])
cal = layer_search.load_calibration(cfg, cfg.search)
sc, costs = cal.scorer, cal.costs
L = sc.num_layers
cache = {}
def objective(skipped):
    if not skipped or len(skipped) == L: return None
    kept = tuple(kept_layers(L, None, skipped))
    if kept not in cache:
        with torch.inference_mode(): cache[kept] = sc.agreement(list(kept))
    return costs.estimate(cache[kept], len(kept), 8)["predicted_speedup"]
out = {"costs": costs.describe()}
if "greedy" in sys.argv:
    with torch.inference_mode():
        traj = layer_search.greedy_search(sc, costs, 12, 8, 16)
    out["greedy"] = [(r["skipped"], r["agreement"], r["predicted_speedup"], r["evaluations"]) for r in traj]
    print("greedy", [(len(r[0]), round(r[2], 4), r[3]) for r in out["greedy"]], flush=True)
def run(design, seed, trials):
    kw = dict(seed=seed, multivariate=design.get("mv", True), n_startup_trials=design.get("startup", 10))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(**kw))
    seen, best, hist = set(), 0.0, []
    for t in range(trials):
        trial = study.ask()
        if design["space"] == "bool":
            skipped = [l for l in range(L) if trial.suggest_categorical(f"l{l:02d}", [False, True])]
        else:
            skipped = [l for l in range(L) if trial.suggest_float(f"l{l:02d}", 0, 1) < design["prior"]]
        v = objective(skipped)
        study.tell(trial, 0.0 if v is None else v)
        if v is not None:
            seen.add(tuple(skipped))
            if v > best: best = v; hist.append((len(seen), t, round(v, 4), skipped))
    return hist
designs = {"bool-mv": {"space": "bool"}, "bool-ind": {"space": "bool", "mv": False},
           "float-p0.2-mv": {"space": "float", "prior": 0.2}, "float-p0.1-mv": {"space": "float", "prior": 0.1},
           "float-p0.2-ind": {"space": "float", "prior": 0.2, "mv": False}}
for name in [a for a in sys.argv[1:] if a in designs]:
    for seed in (0, 1):
        t = time.time()
        h = run(designs[name], seed, 200)
        out[f"{name}-s{seed}"] = h
        print(name, seed, f"{time.time()-t:.0f}s", [(e, tr, v, len(s)) for e, tr, v, s in h][-6:], flush=True)
json.dump(out, open(f"/tmp/bo/out-{'-'.join(sys.argv[1:])}.json", "w"), indent=1)
