"""Videos (and manifests) by URL: `s3://`, `gs://` (or `gcs://`), `https://`, `http://` and `file://`.

A URL video is read where it lies, with ranged reads, never downloaded whole by the default decoder:
`RemoteFile` is a seekable read-only file object over one object (`av.open` takes it), fetching the byte
ranges FFmpeg asks for. A read after a seek fetches `block_size` bytes; each read that carries on where
the last fetch ended doubles the next fetch, up to `max_block`, so a header costs a small request and a
GOP decoded from its keyframe a few growing ones. The last few fetched ranges are kept (LRU), so the
back-and-forth of a demuxer (the mp4 index at the end, then the data) is not fetched twice. decord reads
only local files (its file-object input reads the whole object into memory), so `decode.backend=decord`
downloads a URL video to a temporary file first (`download`), deleted when the read ends.

The stores are fsspec's: s3fs (S3 and S3-compatible stores), gcsfs and its HTTP filesystem. Credentials
come from each store's standard chain, on every node that reads: for S3 `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`), `AWS_PROFILE`, `~/.aws/credentials` or an instance role;
an S3-compatible store's endpoint from `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`, or `endpoint_url`
in `~/.aws/config`), which botocore reads itself; for GCS `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's
application-default login or the metadata server. `file://` URLs are plain local paths (`local_path`).

Every request (the size of the object, each range) is tried up to `tries` times, waiting `backoff`,
then twice as long, between tries; a request that waits longer than `timeout` seconds for the server
(to connect, or between two reads of its reply) fails that try, and so does a reply cut short (a
connection dropped mid-read). Errors name the URL: "no such object", "access denied (check
credentials: ...)", "timed out after N tries", "failed after N tries (the last error)"; a missing object
or a denied request is not retried.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
URL_SCHEMES = ("s3", "gs", "gcs", "http", "https", "file")
_CACHED_RANGES = 4  # fetched ranges kept per open object (at most 4 x max_block bytes)

_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials; AWS_ENDPOINT_URL for "
          "an S3-compatible store",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`",
    "http": "the server refused the request; a signed URL may have expired",
}


class RemoteError(OSError):
    """A URL could not be read; the message is '<url>: <cause>'."""

    def __init__(self, url: str, cause: str):
        super().__init__(f"{url}: {cause}")
        self.url, self.cause = url, cause


@dataclass
class RemoteConfig:
    """How URL videos are read (`decode.remote`): transfer settings, they never change the frames."""

    tries: int = 4  # attempts per request (the size, each byte range) before the video is an error row
    timeout: float = 30.0  # seconds a request may wait for the server: to connect, or between two reads
    backoff: float = 0.5  # seconds before the second try, doubling for each later one
    block_size: int = 256 * 1024  # bytes fetched by a read after a seek ...
    max_block: int = 8 * 1024 * 1024  # ... doubling while the reads go on sequentially, up to this

    def problems(self) -> list[str]:
        found = []
        if self.tries < 1:
            found.append(f"tries={self.tries} must be >= 1")
        if not self.timeout > 0:
            found.append(f"timeout={self.timeout} must be > 0 seconds")
        if self.backoff < 0:
            found.append(f"backoff={self.backoff} must be >= 0 seconds")
        if self.block_size < 1 or self.max_block < self.block_size:
            found.append(f"needs 1 <= block_size <= max_block (got {self.block_size}, {self.max_block})")
        return found


def scheme(path: str | os.PathLike) -> str | None:
    """The URL scheme of `path` in lower case (`s3`, `https`, ...), None for a plain path."""
    match = _SCHEME.match(os.fspath(path))
    return match.group(1).lower() if match else None


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL this module reads (`file://` included); any other scheme is an error."""
    found = scheme(path)
    if found is not None and found not in URL_SCHEMES:
        raise ValueError(f"{os.fspath(path)}: unsupported URL scheme {found!r} (supported: "
                         f"{', '.join(s + '://' for s in URL_SCHEMES)})")
    return found is not None


def is_remote(path: str | os.PathLike) -> bool:
    """A URL read over the network (not `file://`)."""
    return is_url(path) and scheme(path) != "file"


def local_path(path: str) -> str:
    """A `file://` URL as the local path it names; anything else unchanged."""
    if scheme(path) != "file":
        return path
    parts = urlsplit(path)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{path}: a file:// URL names this machine's files (file:///abs/path), not host "
                         f"{parts.netloc!r}")
    return unquote(parts.path)


def join(root: str, relative: str) -> str:
    """`relative` (a manifest's relative video path) under `root`, a folder or a URL."""
    if is_remote(root):
        return root.rstrip("/") + "/" + relative.lstrip("/")
    return os.path.join(local_path(root), relative)


def parent(url: str) -> str:
    """The 'folder' of a URL (everything before its last `/`): a URL manifest's default video root."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=posixpath.dirname(parts.path), query="", fragment=""))


# ---------------------------------------------------------------- filesystems and requests

_filesystems: dict[tuple, object] = {}
_filesystems_lock = threading.Lock()


def _filesystem(url: str, timeout: float):
    """This process's fsspec filesystem for the URL's store, with our timeout and without the store's own
    retries (ours count the tries). Built once per (store, timeout)."""
    kind = {"gs": "gcs"}.get(scheme(url), scheme(url))
    key = (kind, timeout, os.getpid())
    with _filesystems_lock:
        if key not in _filesystems:
            _filesystems[key] = _new_filesystem(kind, timeout)
        return _filesystems[key]


def _new_filesystem(kind: str, timeout: float):
    if kind == "s3":
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
            "connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}})
        fs.retries = 1  # s3fs's own retry loop, on top of botocore's
        return fs
    if kind == "gcs":
        import gcsfs

        return gcsfs.GCSFileSystem(skip_instance_cache=True, requests_timeout=timeout)
    import aiohttp
    from fsspec.implementations.http import HTTPFileSystem

    return HTTPFileSystem(skip_instance_cache=True, client_kwargs={
        "timeout": aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)})


def _status(error: BaseException) -> int | None:
    """The HTTP status of a failed request (aiohttp's `status`, botocore's response metadata)."""
    status = getattr(error, "status", None) or getattr(error, "code", None)
    if isinstance(status, int):
        return status
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _unwrapped(error: BaseException) -> BaseException:
    """The real failure: fsspec's HTTP filesystem reports any failure to stat a URL (a 403, a timeout, a
    refused connection) as a FileNotFoundError raised from it."""
    while isinstance(error, FileNotFoundError) and error.__cause__ is not None:
        error = error.__cause__
    return error


def _final(url: str, error: BaseException) -> RemoteError | None:
    """The error to report at once for a failure no retry can fix (missing object, refused request),
    None for one worth retrying."""
    status = _status(error)
    if isinstance(error, FileNotFoundError) or status == 404:
        return RemoteError(url, "no such object")
    denied = (isinstance(error, PermissionError) or status in (401, 403)
              or str(error).startswith("Forbidden") or type(error).__name__ == "NoCredentialsError")
    if denied:
        store = {"https": "http", "gcs": "gs"}.get(scheme(url), scheme(url))
        return RemoteError(url, f"access denied (check credentials: {_CREDENTIALS[store]})")
    if isinstance(error, IsADirectoryError):
        return RemoteError(url, "is a folder, not a video file")
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return RemoteError(url, f"the server refused the request (HTTP {status}: {error})")
    return None


def _is_timeout(error: BaseException) -> bool:
    return isinstance(error, TimeoutError) or "Timeout" in type(error).__name__


def retrying(url: str, config: RemoteConfig, request):
    """`request()`, tried up to `config.tries` times (module doc); RemoteError when it cannot succeed."""
    last: BaseException | None = None
    for attempt in range(config.tries):
        if attempt:
            time.sleep(config.backoff * 2 ** (attempt - 1))
        try:
            return request()
        except RemoteError:
            raise
        except Exception as error:  # noqa: BLE001 - classified: final errors at once, the rest retried
            last = _unwrapped(error)
            final = _final(url, last)
            if final is not None:
                raise final from None
    if _is_timeout(last):
        raise RemoteError(url, f"timed out after {config.tries} tries") from None
    raise RemoteError(url, f"failed after {config.tries} tries ({type(last).__name__}: {last})") from None


class _ShortRead(ConnectionError):
    """A reply with fewer bytes than the range asked (a connection dropped mid-read): retried."""


# ---------------------------------------------------------------- the file object


class RemoteFile(io.RawIOBase):
    """One object by URL as a seekable read-only file (module doc). `requests` and `bytes_fetched` count
    the ranges fetched. A fetch that fails raises RemoteError inside FFmpeg's read: PyAV keeps it and
    raises it from the call that read (its error check raises a kept exception first, whatever FFmpeg
    returned). FFmpeg may read on before returning, so later reads return end of file (raising again
    would only make PyAV print each later failure as dropped); the error stays in `failure`."""

    def __init__(self, url: str, config: RemoteConfig | None = None):
        super().__init__()
        self.url, self.name = url, url
        self.config = config or RemoteConfig()
        self._fs = _filesystem(url, self.config.timeout)
        self.size: int = retrying(url, self.config, self._stat)
        self.failure: RemoteError | None = None
        self.requests = self.bytes_fetched = 0
        self._pos = 0
        self._ranges: OrderedDict[int, bytes] = OrderedDict()  # start -> bytes, least recently used first
        self._next_length = self.config.block_size
        self._fetched_until = -1  # end of the last fetch: a read there carries on sequentially

    def _stat(self) -> int:
        info = self._fs.info(self.url)
        if info.get("type") == "directory":
            raise IsADirectoryError(self.url)
        if info.get("size") is None:
            raise RemoteError(self.url, "the server does not give the object's size (Content-Length); "
                                        "ranged reads need it")
        return int(info["size"])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.url}: seek to {base + offset}, before the start")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        if self.failure is not None or self._pos >= self.size:
            return 0
        start, data = self._range_at(self._pos)
        offset = self._pos - start
        count = min(len(buffer), len(data) - offset)
        buffer[:count] = data[offset : offset + count]
        self._pos += count
        return count

    def _range_at(self, position: int) -> tuple[int, bytes]:
        for start, data in self._ranges.items():
            if start <= position < start + len(data):
                self._ranges.move_to_end(start)
                return start, data
        if position == self._fetched_until:
            self._next_length = min(2 * self._next_length, self.config.max_block)
        else:
            self._next_length = self.config.block_size
        end = min(position + self._next_length, self.size)
        try:
            data = retrying(self.url, self.config, lambda: self._fetch(position, end))
        except RemoteError as error:
            self.failure = error
            raise
        self._fetched_until = end
        self._ranges[position] = data
        while len(self._ranges) > _CACHED_RANGES:
            self._ranges.popitem(last=False)
        return position, data

    def _fetch(self, start: int, end: int) -> bytes:
        self.requests += 1
        data = self._fs.cat_file(self.url, start=start, end=end)
        self.bytes_fetched += len(data)
        if len(data) > end - start:
            raise RemoteError(self.url, f"the server ignores Range requests (asked {end - start} bytes, got "
                                        f"{len(data)}): ranged reads need a server that honours them")
        if len(data) < end - start:
            raise _ShortRead(f"the reply ended after {len(data)} of {end - start} bytes")
        return data


def download(url: str, config: RemoteConfig | None = None, suffix: str = "") -> str:
    """Copy the object to a new temporary file (the caller deletes it); returns its path."""
    source = RemoteFile(url, config)
    handle, path = tempfile.mkstemp(prefix="vzpipe-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            while chunk := source.read(source.config.max_block):
                out.write(chunk)
    except BaseException:
        os.unlink(path)
        raise
    return path


def read_bytes(url: str, config: RemoteConfig | None = None) -> bytes:
    """The whole object (a manifest: small)."""
    if scheme(url) == "file":
        with open(local_path(url), "rb") as file:
            return file.read()
    return RemoteFile(url, config).readall()
