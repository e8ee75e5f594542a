"""What the entry points (`run.py`, `tune.py`, `python -m synthqa.demo`) share: a user's mistake ends the
run with one clear message and a non-zero exit status, not a traceback (`HYDRA_FULL_ERROR=1` shows it);
a sweep that would mix its jobs' rows in one file does not start."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipelines.config import ConfigError
from pipelines.files import InUseError
from pipelines.judge import JudgeError
from pipelines.manifest import ManifestError
from pipelines.sink import OutputError
from stages.model import ModelLoadError

EXIT_FAILED = 1  # the job ran, and failed: too many error rows (max_error_fraction), or all of them
EXIT_SETUP = 2  # nothing ran: the config, the data, the model, the output (or another job holds it), Ray, or
#                the judge (probed before any work: its URL, key or model)
EXIT_SCORING = 3  # every row, the summary and the timeline are written, but the scoring failed (e.g. the
#                  judge went down midway): `python -m pipelines.score OUTPUT` resumes it
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
