"""A URL whose server takes the connection and never answers: a job that reaches a video there waits in
its read, so a test can stop the job at a known point (every row before that video written, none after),
whatever the machine's load, instead of racing the job's progress."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


class HeldUrl:
    """Listens on 127.0.0.1; `wait_for_reader` returns once a reader has connected. Closed, the URL
    refuses connections: a resumed job's read fails at once (an error row with `decode.remote.tries=1`)."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self._readers: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/held.mp4"

    def wait_for_reader(self, alive: Callable[[], bool], guard_s: float = 600) -> None:
        """Block until a reader connects; `alive()` false (the job ended) or the hang guard fails."""
        self._listener.settimeout(0.1)
        deadline = time.monotonic() + guard_s
        while True:
            assert alive(), "the job ended before it reached the held video"
            assert time.monotonic() < deadline, f"no reader after {guard_s} s"
            try:
                self._readers.append(self._listener.accept()[0])
                return
            except TimeoutError:
                continue

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._listener.close()

    def __enter__(self) -> HeldUrl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
