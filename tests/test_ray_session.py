"""Ray for a job beside other Rays: the embedded Ray is always the job's own, and a cluster that cannot be
joined fails in seconds with one line saying what to check."""

from __future__ import annotations

import os
import socket
import time

import pytest

from pipelines.config import compose_job
from pipelines.job import WORKER_NICENESS, ray_session


def job_with(*overrides: str):
    return compose_job("data.manifest=m.jsonl", "output.path=o.jsonl", *overrides)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free again once closed: nothing listens there


def test_the_embedded_ray_ignores_a_dead_clusters_address_and_runs_its_workers_unniced(monkeypatch):
    # what a killed cluster leaves behind (RAY_ADDRESS here; its address file works the same way)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    monkeypatch.delenv(WORKER_NICENESS)  # set by conftest for the Rays tests start themselves
    import ray

    with ray_session(job_with("ray.num_cpus=1")):
        assert ray.cluster_resources()["CPU"] == 1.0
        niceness = ray.remote(num_cpus=1)(lambda: os.nice(0))  # by value: workers cannot import tests/
        assert ray.get(niceness.remote()) == 0  # Ray's default would give 15
    assert not ray.is_initialized()


def test_no_head_at_the_address_is_one_line_in_seconds():
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(ConnectionError) as refused:
        with ray_session(job_with("ray=cluster", f"ray.address=127.0.0.1:{port}")):
            pass
    assert time.monotonic() - start < 60  # Ray's own retries take minutes; a busy machine imports Ray slowly
    message = str(refused.value)
    assert message.startswith(f"ray.address=127.0.0.1:{port}: no Ray head answers at ")
    assert message.endswith(f"check the address and that the head is running: ray status --address "
                            f"127.0.0.1:{port})")
    assert "\n" not in message


def test_a_refused_token_says_which_settings_to_check(monkeypatch):
    import ray
    from ray._private.services import resolve_ip_for_localhost

    def refuse(**kwargs):  # what ray.init raises once the head has answered InvalidAuthToken 20 times
        try:
            raise RuntimeError("Failed to connect to GCS. ... Unauthenticated: RPC error: InvalidAuthToken")
        except RuntimeError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1") from cause

    monkeypatch.setattr(ray, "init", refuse)
    with socket.socket() as head:  # something answers at the address: the TCP probe passes
        head.bind((resolve_ip_for_localhost("127.0.0.1"), 0))  # where Ray itself would connect
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        refused = (rf"^ray.address={address}: the cluster at .* refused this job's token \(check "
                   r"RAY_AUTH_MODE, and that RAY_AUTH_TOKEN, or the file RAY_AUTH_TOKEN_PATH names, holds "
                   r"the head's token\)$")
        with pytest.raises(ConnectionError, match=refused):
            with ray_session(job_with("ray=cluster", f"ray.address={address}")):
                pass
