"""Every config default is defined once, in the dataclasses (`pipelines.config.JobConfig`, `TuneJobConfig` and
the stage configs they hold): the YAML files of conf/ pick the groups, set what a group option changes and
bind the values known per job, and never repeat a default (two homes drift apart)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipelines.config import (
    JobConfig,
    OutputConfig,
    TuneConfig,
    TuneJobConfig,
    compose_job,
    compose_tune,
)
from pipelines.datasets import DataConfig

CONF = Path(__file__).resolve().parent.parent / "conf"


def leaves(node: object, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of every field of a dataclass instance (or key of a dict), nested ones included."""
    if is_dataclass(node):
        children = {f.name: getattr(node, f.name) for f in fields(node)}
    elif isinstance(node, dict):
        children = node
    else:
        return {prefix: node}
    return {key: value for name, child in children.items()
            for key, value in leaves(child, f"{prefix}.{name}" if prefix else name).items()}


def differences(composed: object, python: object) -> dict[str, tuple[object, object]]:
    """{key: (composed value, Python default)} for each field where the two differ."""
    mine, theirs = leaves(composed), leaves(python)
    return {key: (mine.get(key), theirs.get(key)) for key in mine.keys() | theirs.keys()
            if mine.get(key) != theirs.get(key)}


def test_the_composed_default_job_is_the_python_default():
    composed = compose_job("data.manifest=m.jsonl", "output.path=o.jsonl")
    python = JobConfig(data=DataConfig(manifest="m.jsonl"), output=OutputConfig(path="o.jsonl"))
    assert len(leaves(python)) > 80  # every field of every section is walked
    assert differences(composed, python) == {}


def test_the_composed_default_tuning_is_the_python_default():
    composed = compose_tune("data.manifest=m.jsonl", "tune.out=tuned")
    python = TuneJobConfig(data=DataConfig(manifest="m.jsonl"), tune=TuneConfig(out="tuned"))
    assert differences(composed, python) == {}


def yaml_values(path: Path) -> dict[str, object]:
    """The values a conf/ file sets, by their dotted key in the job (a group option's under its group,
    unless the file is `# @package _global_`); its defaults list and Hydra's own settings left out."""
    text = path.read_text()
    document = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    document = {k: v for k, v in document.items() if k not in ("defaults", "hydra")}
    group = path.parent.name if path.parent != CONF and "# @package _global_" not in text else ""
    return leaves(document, group)


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_no_conf_file_repeats_a_python_default(path):
    defaults = leaves(TuneJobConfig() if path.name == "tune.yaml" else JobConfig())
    values = yaml_values(path)
    assert set(values) <= set(defaults), f"keys not in the schema: {set(values) - set(defaults)}"
    assert {key: value for key, value in values.items() if defaults[key] == value} == {}

