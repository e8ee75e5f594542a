"""What the entry points (`run.py`, `tune.py`, `python -m synthqa.demo`) share: a user's mistake ends the
run with one clear message and a non-zero exit status, not a traceback (`HYDRA_FULL_ERROR=1` shows it);
a sweep that would mix its jobs' rows in one file does not start.

Exit status (`python run.py ...`):

- 0: done.
- 1: the job ran, but more than `max_error_fraction` of the output's rows are errors, or all of them (every
  row is still written).
- 2: nothing ran: a config mistake (an unknown key or group option, a wrong type, an override that does not
  parse, a `+key` the schema lacks: `check_command_line`, before Hydra starts, every value of a `-m` sweep
  included), a value out of range, the manifest, the model, the output (or another job holds it), Ray, or
  the judge; one message.
- 3: the job ran and wrote its rows, summary and timeline, but its scoring failed: `python -m pipelines.score
  OUTPUT` resumes it.
- 130: interrupted (Ctrl-C): the rows so far are saved and a rerun resumes (`stop_on_interrupt`).
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipelines.config import CONF_DIR, ConfigError, register, unknown_keys
from pipelines.files import InUseError
from pipelines.job import JobInterrupted
from pipelines.judge import JudgeError
from pipelines.manifest import ManifestError
from pipelines.sink import OutputError
from stages.model import ModelLoadError

EXIT_FAILED = 1  # the job ran, and failed: too many error rows (max_error_fraction), or all of them
EXIT_SETUP = 2  # nothing ran: the config, the data, the model, the output (or another job holds it), Ray, or
#                the judge (probed before any work: its URL, key or model)
EXIT_SCORING = 3  # every row, the summary and the timeline are written, but the scoring failed (e.g. the
#                  judge went down midway): `python -m pipelines.score OUTPUT` resumes it
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it): the rows so far are saved
SETUP_ERRORS = (ConfigError, ManifestError, ModelLoadError, OutputError, InUseError, JudgeError,
                ConnectionError)


@contextmanager
def plain_errors() -> Iterator[None]:
    """Turn a setup error into `error: <message>` on stderr and exit status EXIT_SETUP."""
    try:
        yield
    except SETUP_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        sys.exit(EXIT_SETUP)


def exit_if_failed(summary: dict) -> None:
    """Exit with EXIT_FAILED, naming the reason, when the job's summary says it failed, else with
    EXIT_SCORING when its scoring failed, printing the command that resumes the scoring (both are printed
    when both happened: the job's failure decides the status)."""
    if summary.get("scoring_failed"):
        print(f"scoring failed: {summary['scoring_failed']}\nresume the scoring with: "
              f"{summary['rescore']}", file=sys.stderr)  # fmt: skip
    if summary.get("failed"):
        print(f"job failed: {summary['failed']}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    if summary.get("scoring_failed"):
        sys.exit(EXIT_SCORING)


def files_written(summary: dict) -> str:
    """The line under the summary table naming the files the job keeps beside its output: the rows, the
    summary, the scores, the timeline, the errors' tracebacks (those that exist)."""
    output = Path(summary["output"])
    names = [summary["output"], summary.get("summary"), (summary.get("scores") or {}).get("path"),
             *summary.get("timeline_plots", []), output.with_name(output.stem + ".errors.log")]
    kept = [Path(name).name for name in names if name is not None and Path(name).exists()]
    return f"{'files':>13}  in {output.parent}/: {', '.join(kept)}"


class RefuseSharedOutput(Callback):
    """A `-m` sweep whose jobs would all write one explicit `output.path` is refused before its first job
    (registered in conf/config.yaml): each job must get its own file (the default: its Hydra folder)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        swept = {o.key_or_group for o in overrides if o.is_sweep_override()}
        path = OmegaConf.to_container(config.output, resolve=False)["path"]
        if swept and "hydra:" not in str(path) and "output.path" not in swept:
            print(f"error: this sweep runs one job per value of {', '.join(sorted(swept))}, and every job "
                  f"would write output.path={path}: the second would refuse (or, with overwrite, erase) the "
                  "first one's rows. Leave output.path out (each job writes into its own folder) or put an "
                  "interpolation in it, e.g. output.path='out/${hydra:job.num}.jsonl'", file=sys.stderr)
            sys.exit(EXIT_SETUP)


def check_command_line(config_name: str, schema: type, argv: list[str]) -> None:
    """Compose the config the command line asks for, as Hydra will, before Hydra runs anything: a config
    mistake exits with EXIT_SETUP and one line naming it (`config_mistake`), where Hydra itself prints
    several lines and exits with 1, the status of a job whose rows failed. Each value of a `-m` sweep is
    composed once (the others at their first value), so a typo in the last one stops the sweep before its
    first job. `+key=value` overrides that the schema (a dataclass) lacks are refused too (`unknown_keys`).
    Left to Hydra: help, another config folder (`-cp`, `-cd`), `glob()` sweeps; `HYDRA_FULL_ERROR=1`
    raises the error as it is."""
    from hydra._internal.utils import get_args_parser  # Hydra's own command-line parser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.config_path or args.config_dir or args.info:
        return
    try:
        for overrides in override_sets(args.overrides, args.multirun):
            register()
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
                cfg = compose(args.config_name or config_name, overrides=overrides)
            problems = unknown_keys(OmegaConf.to_container(cfg, resolve=False), schema)
            if problems:
                key = problems[0].partition(":")[0]
                added = next((line for line in args.overrides
                              if line.lstrip("+").startswith((f"{key}.", f"{key}="))), key)
                raise ConfigError(f"{added}: {problems[0].partition(': ')[2]}")
    except (HydraException, OmegaConfBaseException, ConfigError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {config_mistake(err, args.overrides)}", file=sys.stderr)
        sys.exit(EXIT_SETUP)


def override_sets(overrides: list[str], multirun: bool) -> Iterator[list[str]]:
    """The override lists to compose: the command line's own; with `-m`, one job's per sweep value (the
    other sweeps at their first value; `glob()` sweeps left out). An override that does not parse raises
    OverrideParseException naming it."""
    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed.append(parser.parse_override(line))
        except HydraException as err:
            raise OverrideParseException(line, f"{line}: {str(err).splitlines()[0]} (the override grammar: "
                                         "https://hydra.cc/docs/advanced/override_grammar/basic)") from None
    if not multirun:
        yield list(overrides)
        return
    values: list[list[str]] = []
    for override in parsed:
        if not override.is_sweep_override():
            values.append([override.input_line])
            continue
        try:
            values.append([f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()])
        except HydraException:  # glob(): its options are known to Hydra's sweeper only
            values.append([])
    first = [options[0] for options in values if options]
    yield first
    for i, options in enumerate(values):
        for option in options[1:]:
            yield [option if j == i else others[0] for j, others in enumerate(values) if others]


def config_mistake(err: Exception, overrides: list[str]) -> str:
    """One line naming a config mistake and the override that made it (Hydra's message is several lines
    about its internals): an unknown key or group option with the nearest known one, a wrong type."""
    cause = err.__cause__
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        near = difflib.get_close_matches(name, err.options, n=1)
        return (f"{_override_of(group, overrides) or err.missing_cfg_file}: {group} has no option {name!r}"
                f"{f' (did you mean {group}={near[0]}?)' if near else ''}; the options: "
                f"{', '.join(err.options)}")
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        override = _override_of(key, overrides) or key
        if isinstance(cause, ConfigKeyError | AttributeError) and cause.object_type is not None:
            section = key.rpartition(".")[0]
            problems = unknown_keys({cause.key: None}, cause.object_type, f"{section}." if section else "")
            return f"{override}: {problems[0].partition(': ')[2]}"
        return f"{override}: {str(cause).splitlines()[0]}"
    lines = str(err).splitlines()
    ways = [line for line in lines[1:] if line[:1].isdigit()]  # e.g. an ambiguous value's numbered ways out
    return f"{lines[0]}: {'; '.join(ways)}" if ways else lines[0]


def _override_of(key: str, overrides: list[str]) -> str | None:
    """The command line's override of `key` (with any `+`, `++` or `~` before it), if there is one."""
    return next((line for line in overrides if line.lstrip("+~").partition("=")[0] == key), None)


@contextmanager
def stop_on_interrupt(cfg: DictConfig) -> Iterator[None]:
    """Ctrl-C stops the job cleanly: its stages stop, the output is finished (a Parquet output written
    from its journal) and unlocked, Ray shut down, then one line says how many rows are saved and how to
    resume, and the process exits with EXIT_INTERRUPTED, without a traceback. A second Ctrl-C while it
    stops exits at once (EXIT_INTERRUPTED; the rows written are kept, the OS drops the lock)."""

    def force(signum: int, frame: object) -> None:
        os.write(2, b"\ninterrupted again: exiting now\n")
        os._exit(EXIT_INTERRUPTED)

    def first(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, force)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    except JobInterrupted as stop:
        print(f"\ninterrupted: {stop.rows} rows saved in {stop.path}; {resume_hint(cfg, stop.path)}",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        print("\ninterrupted before the job opened its output: nothing written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, previous)


def resume_hint(cfg: DictConfig, path: Path) -> str:
    """How to resume: the same command when it names its output, else the same command with the
    output's path added (the default output is in the run's own Hydra folder, by default new each run)."""
    if "hydra:runtime.output_dir" in str(OmegaConf.to_container(cfg.output, resolve=False)["path"]):
        return f"rerun the same command with output.path={path} to resume"
    return "rerun the same command to resume"
