"""The README and docs/*.md as a newcomer uses them: every shell and Python block runs, every link resolves.

A ```bash / ```sh / ```shell block runs with bash, a ```python block in this process; other blocks (text,
jsonl, output) are not run. The blocks of one page run in order in one temporary working directory, so a
block may use the files an earlier one wrote; the repository's `run.py`, `tune.py`, `conf/`, `models/` and
`bench/` are linked into it (the commands are written to run from the repository root) and the venv's
`python` is first on `PATH`. Whatever the blocks write stays in the temporary directory.

A block that cannot run here is marked on the line before it, with a reason from `REASONS`:

    <!-- doc-test: parse download -->   each command is checked without running it
    <!-- doc-test: skip cluster -->     not run at all (a command `parse` cannot check)

`parse` checks `python run.py ...` / `python tune.py ...` / a Hydra module's overrides by composing and
typing them as the job does (each value of a `-m` sweep), `python -m MODULE ...` by the module's own
argparse parser (the module stops right after parsing), and `make TARGET` by `make -n`.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from bench.report import update
from pipelines.config import CONF_DIR, register, to_job_config, to_tune_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

# Why a block is not run here: the only reasons a marker may give.
REASONS = {
    "gpu": "needs a CUDA GPU",
    "download": "needs a checkpoint or data set that is not in the repository (e.g. Video-LLaVA-7B)",
    "cluster": "needs a Ray cluster of several machines",
    "service": "needs an outside service: an LLM judge endpoint, object storage, credentials",
    "slow": "runs longer than this test's budget: a benchmark, a whole held-out set, the test suite",
}
MODES = ("parse", "skip")
RUN_LANGS = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python"}
# What the blocks reach in the repository by a relative path, as from its root.
LINKED = ("run.py", "tune.py", "conf", "models", "bench")
# The Hydra entry points by script, and how each types its composed config.
TYPED = {"config": to_job_config, "tune": to_tune_config}

FENCE = re.compile(r"^```\s*(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*doc-test:(.*?)-->\s*$")


class DocError(Exception):
    """A page's block or marker is wrong; the message starts with `PAGE:LINE`."""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mode: str  # "run", "parse" or "skip"
    reason: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page}:{self.line}"


def doc_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page with the marker before each; a malformed marker, one with an
    unknown mode or reason, or one not followed by a block that would run is a `DocError`."""
    lines = page.read_text().split("\n")
    blocks, marker, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        found = MARKER.match(line)
        if found:
            words = found.group(1).split()
            if len(words) != 2 or words[0] not in MODES or words[1] not in REASONS:
                raise DocError(f"{page.name}:{i + 1}: marker {line.strip()!r} must be "
                               f"'<!-- doc-test: MODE REASON -->', MODE one of {', '.join(MODES)}, "
                               f"REASON one of {', '.join(REASONS)}")
            marker = (i + 1, words[0], words[1])
        fence = FENCE.match(line)
        if fence:
            start, lang = i + 1, fence.group(1).lower()
            i += 1
            while i < len(lines) and lines[i].rstrip() != "```":
                i += 1
            if i == len(lines):
                raise DocError(f"{page.name}:{start}: the block opened here is never closed")
            mode, reason = ("run", None) if marker is None else marker[1:]
            if marker is not None and RUN_LANGS.get(lang) is None:
                raise DocError(f"{page.name}:{marker[0]}: a marker before a ```{lang} block, "
                               f"which never runs")
            blocks.append(Block(page, start, lang, "\n".join(lines[start:i]) + "\n", mode, reason))
            marker = None
        elif marker is not None and not found and line.strip():
            raise DocError(f"{page.name}:{marker[0]}: the marker is not right before a block")
        i += 1
    return blocks


def commands(code: str) -> list[list[str]]:
    """A shell block's commands as argument lists: continuation lines joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [words for line in joined.split("\n") if (words := shlex.split(line, comments=True))]


class _Parsed(Exception):
    """Raised by the patched `parse_args`: the arguments parsed, and the module stops there."""


def check_parses(words: list[str]) -> None:
    """Check one command without running it (see the module doc); raises `DocError` when it would not
    get past its arguments."""
    command = " ".join(words)
    if words[:1] == ["make"] and len(words) >= 2:
        result = subprocess.run(["make", "-n", "-C", str(ROOT), *words[1:]], capture_output=True, text=True)
        if result.returncode:
            raise DocError(f"{command}: {result.stderr.strip()}")
        return
    if words[:1] != ["python"] or len(words) < 2:
        raise DocError(f"{command}: parse checks `python SCRIPT ...`, `python -m MODULE ...` and `make "
                       f"TARGET`: mark the block `skip`")
    if words[1] == "-m":
        if len(words) < 3 or find_spec(words[2]) is None:
            raise DocError(f"{command}: no module {words[2] if len(words) > 2 else ''!r}")
        module, args = words[2], words[3:]
        source = Path(find_spec(module).origin).read_text()
    else:
        script = ROOT / words[1]
        if not script.is_file():
            raise DocError(f"{command}: no script {words[1]} in the repository")
        module, args, source = None, words[2:], script.read_text()
    hydra_config = re.search(r"@hydra\.main\([^)]*config_name=\"(\w+)\"", source)
    if hydra_config:
        check_overrides(hydra_config.group(1), args, command)
    elif module is not None and "ArgumentParser" in source:
        check_argparse(module, args, command)
    else:
        raise DocError(f"{command}: neither a Hydra entry point nor an argparse module: "
                       f"mark the block `skip`")


def check_overrides(config_name: str, args: list[str], command: str) -> None:
    """Compose and type the config with these overrides, once per value of each `-m` sweep."""
    args = [arg for arg in args if arg not in ("-m", "--multirun")]
    if any(arg.startswith("-") for arg in args):
        raise DocError(f"{command}: parse checks overrides only, not Hydra's flags")
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors, reported with the command
        raise DocError(f"{command}: {err}") from None
    # each override's forms: one, or one per value of a sweep (`key=a,b` -> `key=a`, `key=b`)
    choices = [[f"{o.input_line.split('=', 1)[0]}={value}" for value in o.sweep_string_iterator()]
               if o.is_sweep_override() else [o.input_line] for o in parsed]
    # every value of every sweep at least once, the other sweeps at their first value
    runs = {tuple(forms[0] for forms in choices)}
    for index, forms in enumerate(choices):
        for form in forms:
            runs.add(tuple(form if i == index else other[0] for i, other in enumerate(choices)))
    register()
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg  # a job's Hydra config is global: left as it was for the other tests
    for overrides in sorted(runs):
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
                cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
                cfg.hydra.runtime.output_dir = "outputs/doc-test"  # what Hydra sets when a job starts
                hydra_config.set_config(cfg)
                with open_dict(cfg):
                    del cfg["hydra"]
                TYPED[config_name](cfg)
        except Exception as err:  # noqa: BLE001 - whatever the job would refuse, reported with the command
            raise DocError(f"{command}: {' '.join(overrides)}: {type(err).__name__}: {err}") from None
        finally:
            hydra_config.cfg = previous


def check_argparse(module: str, args: list[str], command: str) -> None:
    """Run the module as `python -m` would, with `ArgumentParser.parse_args` patched to stop the module
    right after its arguments parsed."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        original(self, *a, **k)
        raise _Parsed

    argv = sys.argv
    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [module, *args]
    try:
        with warnings.catch_warnings():  # runpy warns when the module was imported before
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Parsed:
        return
    except SystemExit as err:
        raise DocError(f"{command}: its arguments are refused (exit status {err.code})") from None
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = argv
    raise DocError(f"{command}: the module ran without parsing arguments")


def run_block(block: Block, workdir: Path) -> None:
    """Run one block in `workdir`; raises `DocError` naming the block when it fails."""
    if block.mode == "parse":
        for words in commands(block.code):
            try:
                check_parses(words)
            except DocError as err:
                raise DocError(f"{block.where}: {err}") from None
        return
    if RUN_LANGS[block.lang] == "python":
        os.chdir(workdir)
        try:
            exec(compile(block.code, block.where, "exec"), {"__name__": "__main__"})
        except Exception as err:  # noqa: BLE001 - any failure of the block, named by its place
            raise DocError(f"{block.where}: the python block raised {type(err).__name__}: {err}") from err
        finally:
            os.chdir(ROOT)
        return
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode:
        tail = (result.stdout + result.stderr)[-3000:]
        raise DocError(f"{block.where}: the block exited with status {result.returncode}:\n{block.code}\n"
                       f"--- its output's end ---\n{tail}")


def working_dir(tmp_path: Path) -> Path:
    """An empty folder in which the repository's paths that the blocks use resolve as from its root."""
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_block_runs_or_parses(page, tmp_path):
    workdir = working_dir(tmp_path)
    for block in doc_blocks(page):
        if block.mode == "skip" or block.lang not in RUN_LANGS:
            continue
        run_block(block, workdir)


def test_every_page_has_known_markers_only():
    marked = [block for page in PAGES for block in doc_blocks(page) if block.mode != "run"]
    assert marked, "no marked block: the markers are not being read"
    assert {block.reason for block in marked} <= set(REASONS)


def test_markers_need_a_known_mode_and_reason_right_before_a_block(tmp_path):
    page = tmp_path / "page.md"
    for marker, error in [("<!-- doc-test: skip lazy -->", "REASON one of"),
                          ("<!-- doc-test: skip -->", "REASON one of"),
                          ("<!-- doc-test: maybe gpu -->", "MODE one of")]:
        page.write_text(f"text\n\n{marker}\n```bash\necho hi\n```\n")
        with pytest.raises(DocError, match=rf"page.md:3: marker .* {error}"):
            doc_blocks(page)
    page.write_text("<!-- doc-test: skip gpu -->\n\nsome text\n```bash\necho hi\n```\n")
    with pytest.raises(DocError, match="page.md:1: the marker is not right before a block"):
        doc_blocks(page)
    page.write_text("<!-- doc-test: skip gpu -->\n```text\nout\n```\n")
    with pytest.raises(DocError, match="page.md:1: a marker before a ```text block"):
        doc_blocks(page)


def test_a_failing_block_names_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```bash\ntrue\n```\n\n```bash\necho to-stderr >&2\nexit 3\n```\n")
    first, second = doc_blocks(page)
    run_block(first, tmp_path)
    with pytest.raises(DocError, match=r"page.md:7: the block exited with status 3:(.|\n)*to-stderr"):
        run_block(second, tmp_path)


@pytest.mark.parametrize("command, error", [
    ("python run.py data.manifest=q.jsonl compression.dominat=30", "compression.dominat"),
    ("python run.py data.manifest=q.jsonl compression=visionzip_temporl", "visionzip_temporl"),
    ("python run.py data.manifest=q.jsonl decode.num_frames=eight", "eight"),
    ("python run.py -m data.manifest=q.jsonl compression=none,visionzip_x", "visionzip_x"),
    ("python run.py data.manifest=q.jsonl compression.dominant=-3", "dominant"),
    ("python tune.py data.manifest=t.jsonl tune.steps=0", "tune.steps"),
    ("python -m pipelines.score out.jsonl --metrik exact", "refused"),
    ("python -m pipelines.no_such_module", "no module"),
    ("python -m bench.report --check extra", "refused"),
    ("make no-such-target", "no-such-target"),
    ("ray start --head", "mark the block `skip`"),
])
def test_parse_refuses_what_would_not_run(command, error):
    with pytest.raises(DocError, match=re.escape(error)):
        check_parses(shlex.split(command))


def test_parse_accepts_each_value_of_a_sweep_and_hydra_modules():
    check_parses(shlex.split("python run.py -m data.manifest=q.jsonl compression=none,visionzip "
                             "compression.dominant=14,30 hydra.sweep.dir=sweep/"))
    check_parses(shlex.split("python -m synthqa.demo +experiment=demo"))
    check_parses(shlex.split("python -m pipelines.score out.jsonl --metric exact"))


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links in code are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces as dashes,
    repeats numbered)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_generated_tables_match_their_results():
    assert update(PAGES, write=False) == []


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_pages_are_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [page.name for page in PAGES[1:] if f"(docs/{page.name})" not in readme] == []
