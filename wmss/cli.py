"""The `wmss` command. Each subcommand lives beside the code it drives: the module listed in
COMMANDS exposes a function that adds the subcommand's flags and one that runs it (returning an exit
code); a module is imported only when its subcommand is used, so `wmss --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from wmss.errors import EXIT_INTERRUPTED, EXIT_USAGE, WmssError, causes, no_space_left

# subcommand -> (module, add-arguments function, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "run": ("workflows.wmss_pipeline", "add_run_arguments", "run_cli",
            "run (or resume) the whole WMSS workflow; with no config, the offline demo"),
    "config": ("wmss.config", "add_config_arguments", "run_config_cli",
               "print the resolved config (show) or the shipped configs (list)"),
    "plan": ("wmss.capacity", "add_plan_arguments", "run_plan",
             "predicted peak GPU memory, tokens per step and wall time of every stage, before a run"),
    "tiny-model": ("wmss.models", "add_tiny_model_arguments", "run_tiny_model",
                   "write a tiny offline Qwen3-architecture model + tokenizer"),
    "sft": ("wmss.training", "add_sft_arguments", "run_sft",
            "supervised fine-tuning on Ray Train + DeepSpeed (Phase 1, and the SFT/NEFTune/UNDIAL baselines)"),
    "jtws": ("wmss.training", "add_jtws_arguments", "run_jtws",
             "joint training of weak and strong on mixed logits (Phase 3); keeps the strong model"),
    "score": ("wmss.scoring", "add_score_arguments", "run_score",
              "entropy of every sample under the weak and strong models, on Ray Data (Phase 2a)"),
    "select": ("wmss.selection", "add_select_arguments", "run_select",
               "draw the CEDA active set from the entropy scores (Phase 2b)"),
    "eval": ("wmss.evaluation.cli", "add_eval_arguments", "run_eval",
             "evaluate a model on math/code benchmarks (paper protocol), on Ray Data with vLLM or HF"),
    "submit": ("wmss.submit", "add_submit_arguments", "run_submit",
               "run the workflow as a Ray job on a cluster (same arguments as `wmss run`)"),
    "jobs": ("wmss.submit", "add_jobs_arguments", "run_jobs",
             "status, logs or stop of a submitted run"),
    "stage": ("wmss.workflow", "add_stage_arguments", "run_stage_cli",
              "reset a stage and everything downstream of it in a run directory, so the next run re-runs them"),
    "tune": ("workflows.tune", "add_tune_arguments", "run_tune_cli",
             "Ray Tune over lam/alpha/gamma (score once, tune many); writes best-config.yaml"),
    "study": ("workflows.study", "add_study_arguments", "run_study_cli",
              "the workflow over N seeds: every method's mean with its 95 percent interval, and paired differences vs SFT"),
    "compare": ("wmss.compare", "add_compare_arguments", "run_compare",
                "workflow runs side by side from MLflow: methods x benchmarks with deltas vs SFT, the compare view"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The `wmss` parser; only the subcommand named in `argv` gets its flags (its module is imported)."""
    parser = argparse.ArgumentParser(prog="wmss")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add_fn, _run_fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv[:1] == [name]:
            getattr(importlib.import_module(module), add_fn)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; return its exit code. Plain `wmss` prints the usage and returns 2 (as git does).
    A WmssError becomes `wmss COMMAND: message` on stderr and its exit code (wmss.errors), also when it lies
    behind the error that ended the command, and so does a full disk (naming the path); bad flags exit 2
    through argparse's SystemExit; Ctrl-C returns 130."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:  # plain `wmss`: the usage, as git and docker print it
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    module, _add_fn, run_fn, _help = COMMANDS[args.command]
    logging.raiseExceptions = False  # a log file that cannot be written (a full disk) prints no traceback per record
    try:
        return int(getattr(importlib.import_module(module), run_fn)(args) or 0)
    except Exception as err:
        # the user's problem may hide behind an error met while cleaning up after it (a tracking database on the
        # same full disk): the WmssError in the chain is what to say
        user = next((e for e in causes(err) if isinstance(e, WmssError)), None)
        full = no_space_left(err) if user is None else None
        if full is not None:
            user = WmssError(f"no space left on the device of {full.filename or 'the run directory'}; free space "
                             "there, then rerun: finished stages are kept")
        if user is None:
            raise
        print("\n".join(f"wmss {args.command}: {line}" for line in str(user).splitlines() or [""]),
              file=sys.stderr)
        return user.exit_code
    except KeyboardInterrupt:
        print(f"wmss {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
