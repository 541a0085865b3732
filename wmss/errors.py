"""The exceptions library code raises for problems a user can fix, and the exit codes the CLI maps them to.

Library code never raises SystemExit: a stage may run inside a Ray Tune trial or a user's own script,
where exiting the process is wrong. `wmss.cli` turns these into one line on stderr and an exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a stage ran and failed (training diverged, a worker died past max_failures, ...)
EXIT_USAGE = 2  # bad flags, config, input files: nothing ran (argparse uses 2 for bad flags too)
EXIT_INTERRUPTED = 130  # Ctrl-C


class WmssError(Exception):
    """Base of every error the user can act on; the message is one or more complete lines."""

    exit_code = EXIT_FAILED


class ConfigError(WmssError):
    """A config (file, `--set` or flags) that cannot be used; names the file, the key, the value and what is
    allowed."""

    exit_code = EXIT_USAGE


class InputError(WmssError):
    """An input (data file, model folder, active set) that cannot be used; names the file, record and
    field."""

    exit_code = EXIT_USAGE


class NonFiniteError(WmssError):
    """A stage met a NaN or an infinity (a training loss or gradient norm, an entropy score); names the
    stage, where (step or sample) and the value. Nothing built on it is sealed."""
