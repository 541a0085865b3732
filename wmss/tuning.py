"""What `wmss tune` searches and how it judges trials, apart from driving them (the driver is
workflows/tune.py): the search space over lam, alpha and gamma with beta = 1 - alpha - gamma on the simplex
(optionally the CEDA formula, dedup and the JTWS learning rate), a trial's parameters applied to the config,
how many trials fit the cluster at once, the metric plot, and where a tune's files go in its run directory.
"""

from __future__ import annotations

from wmss.config import TrainingConfig, TuneConfig, WMSSConfig

TUNE_DIR = "tune"  # the Tuner's experiment folder inside the run directory
TRIALS_DIR = "trials"  # each trial's active set and model, by trial id
BEST_CONFIG = "best-config.yaml"


def search_space(tune_cfg: TuneConfig) -> dict:
    """The Tune search space: uniform lam, alpha and gamma over their ranges, and — when switched on — the
    CEDA formula, dedup, and a log-uniform JTWS learning rate."""
    from ray import tune

    space = {name: tune.uniform(*getattr(tune_cfg, name)) for name in ("lam", "alpha", "gamma")}
    if tune_cfg.search_formula:
        space["formula"] = tune.choice(["code", "paper-v2"])
    if tune_cfg.search_dedup:
        space["dedup"] = tune.choice([True, False])
    if tune_cfg.search_lr:
        space["lr"] = tune.loguniform(*tune_cfg.lr)
    return space


def apply_params(cfg: WMSSConfig, params: dict) -> WMSSConfig:
    """`cfg` with a trial's parameters in place: jtws.lam, ceda.alpha/gamma and beta = 1 - alpha - gamma,
    and ceda.formula, ceda.dedup, jtws.training.lr when they were searched."""
    raw = cfg.model_dump(mode="json")
    raw["jtws"]["lam"] = params["lam"]
    raw["ceda"].update(alpha=params["alpha"], gamma=params["gamma"],
                       beta=max(0.0, 1.0 - params["alpha"] - params["gamma"]))  # max: float rounding only
    for key in ("formula", "dedup"):
        if key in params:
            raw["ceda"][key] = params[key]
    if "lr" in params:
        raw["jtws"]["training"]["lr"] = params["lr"]
    return WMSSConfig.model_validate(raw)


def trial_concurrency(tune_cfg: TuneConfig, training: TrainingConfig, cluster: dict) -> int:
    """How many trials run at once: `tune.max_concurrent_trials` when set, else as many JTWS worker groups
    (workers x CPUs/GPUs per worker) as the cluster's resources hold, at least one."""
    if tune_cfg.max_concurrent_trials:
        return tune_cfg.max_concurrent_trials
    fits = [cluster.get("CPU", 0) // (training.workers * training.cpus_per_worker)]
    if training.gpus_per_worker > 0:
        fits.append(cluster.get("GPU", 0) // (training.workers * training.gpus_per_worker))
    return max(1, int(min(fits)))


def metric_plot(rows: list[dict], metric: str):
    """`metric` against lam, alpha and gamma, one panel each, one point per trial (a matplotlib Figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    for ax, name in zip(fig.subplots(1, 3), ("lam", "alpha", "gamma")):
        ax.scatter([r[name] for r in rows], [r[metric] for r in rows])
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per trial")
    fig.tight_layout()
    return fig
