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


def causes(err: BaseException):
    """`err` and every exception behind it, each once: its cause and context chain, and what a Ray Train
    worker group reports (WorkerGroupError.worker_failures, each wrapping the worker's own exception)."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__, getattr(e, "_base_exc", None),  # Ray's UserExceptionWithTraceback
                  *getattr(e, "worker_failures", {}).values()]


def no_space_left(err: BaseException) -> OSError | None:
    """The "No space left on device" OSError behind `err` (see `causes`), or None."""
    import errno

    return next((e for e in causes(err) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
