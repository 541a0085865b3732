"""`wmss study`: the WMSS run over several seeds in one run directory, summarised with confidence intervals.

The config's own seed is the run `wmss run` does, with the same stage names, so a study can extend a
finished run directory. Each further seed s runs every stage that depends on the run's `seed` (Phase 1's
data order, the CEDA draw, Phase 3, the baselines and their noise, their evaluations) as
`seed<s>.<stage>`; the stages that do not (the demo's data and base model, the base model's evaluation) run
once for all seeds. Everything lives in one manifest and under one MLflow parent run, so a study resumes
like `wmss run`. The statistics are wmss.study's.
"""

from __future__ import annotations

import json
import os
import time

from wmss.config import WMSSConfig
from wmss.errors import ConfigError
from wmss.io import atomic_path
from wmss.workflow import open_workflow, run_location
from workflows.wmss_pipeline import add_run_arguments, metric_table, run_stages

METRICS = ("accuracy", "nll")


def study_seeds(cfg: WMSSConfig, n: int) -> list[int]:
    """The study's seeds: the config's `seed` and the n - 1 after it (ConfigError when the config has no
    `sft` baseline to compare with)."""
    if n < 1:
        raise ConfigError(f"--seeds: need at least 1 seed, got {n}")
    if "sft" not in cfg.baselines.methods:
        raise ConfigError(f"baselines.methods: {cfg.baselines.methods} lacks sft, the method a study compares "
                          "every other one with (paired per seed); add it")
    return [cfg.seed + i for i in range(n)]


def run_study(cfg: WMSSConfig, run_dir: str | os.PathLike, seeds: list[int]) -> dict:
    """Run (or resume) the workflow for each of `seeds` in `run_dir`; write study.json, study.md and
    study.png there and to the MLflow parent run; return the summary (wmss.study.summarize_study)."""
    from wmss.study import format_study, study_figure, summarize_study
    from wmss.tracking import format_results

    wf = open_workflow(cfg, run_dir)
    try:
        per_seed = {}
        for seed in seeds:
            prefix = "" if seed == cfg.seed else f"seed{seed}."
            per_seed[seed] = run_stages(cfg.model_copy(update={"seed": seed}), wf, prefix=prefix)
            table = format_results(metric_table(per_seed[seed]), metric_table(per_seed[seed], "nll"))
            print(f"[wmss] seed {seed}:\n{table}", flush=True)
        summary = summarize_study(per_seed, reference="sft", metrics=METRICS)
        wf.write_text("study.json", json.dumps(summary, indent=2) + "\n")
        wf.write_text("study.md", format_study(summary))
        figure = study_figure(summary)
        with atomic_path(wf.run_dir / "study.png") as tmp:
            figure.savefig(tmp, format="png")
        wf.store.push("study.png")
        for name in ("study.json", "study.md"):
            wf.tracker.log_artifact(wf.run_dir / name)
        wf.tracker.log_figure(figure, "study")
    except BaseException:
        wf.tracker.finish("FAILED")
        raise
    wf.tracker.finish()
    return summary


def add_study_arguments(parser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--seeds", type=int, required=True, metavar="N",
                        help="how many seeds: the config's `seed` and the N - 1 after it")


def run_study_cli(args) -> int:
    """`wmss study`: validate the config (and its predicted GPU memory), run or resume every seed, print the
    summary table."""
    from wmss.capacity import check_fits
    from wmss.config import load_config

    cfg = load_config(args.config, args.overrides)
    seeds = study_seeds(cfg, args.seeds)
    if not args.force:
        check_fits(cfg)
    target = run_location(cfg, args.run_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    from wmss.study import format_study

    summary = run_study(cfg, target, seeds)
    print(f"\n[wmss] study over seeds {seeds} — run dir {target}, {time.time() - start:.0f} s\n")
    print(format_study(summary))
    return 0
