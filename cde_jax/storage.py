"""Paths that may be bucket URLs (`gs://`, `s3://`): the one place that knows.

Files go through fsspec (gcsfs, s3fs: the `cloud` extra), `.zarr` outputs through
tensorstore's `gcs` / `s3` kvstores. Endpoints and credentials come the standard way, read by
each library itself, and this module maps the standard variables to what each needs:

- gs://: Google application-default credentials (`GOOGLE_APPLICATION_CREDENTIALS`, the
  metadata server of a TPU VM). `STORAGE_EMULATOR_HOST` (an emulator, anonymous) is passed
  to tensorstore as `TENSORSTORE_GCS_HTTP_URL`; gcsfs reads it itself.
- s3://: the AWS chain (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, `~/.aws`, instance
  roles); `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` and `AWS_REGION` /
  `AWS_DEFAULT_REGION` (botocore reads them; tensorstore's s3 spec gets them as `endpoint`
  and `aws_region`).

Transient errors (429, 503) are retried by each library with exponential backoff and a
bounded number of tries (`retries`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading

from .validation import UserError

SCHEMES = ("gs", "s3")
EXTRA = "pip install 'cde-jax[cloud]'"
RETRIES_ENV = "CDE_JAX_STORAGE_RETRIES"
DEFAULT_RETRIES = 6  # tries of one request on 429 / 5xx, exponential backoff from 1 s


def retries() -> int:
    """$CDE_JAX_STORAGE_RETRIES, else DEFAULT_RETRIES: a request is given up after about
    2 ** retries seconds of waits."""
    return int(os.environ.get(RETRIES_ENV) or DEFAULT_RETRIES)
_URL = re.compile(r"^(gs|s3)://([^/]+)/?(.*)$")
_LOCK = threading.Lock()


class StorageError(UserError):
    """A bucket that cannot be used: missing, refused credentials, unreachable."""


def is_url(path) -> bool:
    return _URL.match(str(path)) is not None


def refuse(command: str, **paths) -> None:
    """One line for a flag of `command` that names a URL where it cannot take one yet."""
    for flag, path in paths.items():
        if path is not None and is_url(path):
            raise UserError(f"{path}: `cde-jax {command} --{flag.replace('_', '-')}` takes a "
                            "local path (gs:// and s3:// go to embed and dataset-embeddings "
                            "inputs and outputs, eval, --model and --dataset-embeddings)")


def split(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, key) of a gs:// or s3:// URL."""
    found = _URL.match(str(url))
    if found is None:
        raise UserError(f"{url}: not a gs:// or s3:// URL")
    return found[1], found[2], found[3]


@functools.cache
def _filesystem(scheme: str):
    with _LOCK:
        try:
            if scheme == "gs":
                if os.environ.get("STORAGE_EMULATOR_HOST"):
                    # gcsfs would ask the emulator, by gRPC, for the bucket's layout.
                    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
                import gcsfs

                # gcsfs logs a traceback when it gives up (absl's root handler would print
                # it); the error it raises says it all, in the command's one line.
                logging.getLogger("gcsfs").propagate = False
                logging.getLogger("gcsfs").addHandler(logging.NullHandler())
                token = "anon" if os.environ.get("STORAGE_EMULATOR_HOST") else None
                return gcsfs.GCSFileSystem(token=token, retries=retries())
            import s3fs

            return s3fs.S3FileSystem(config_kwargs={"retries": {"max_attempts": retries(),
                                                                "mode": "standard"}})
        except ImportError:
            raise UserError(f"{scheme}:// paths need the cloud extra: {EXTRA}") from None


def filesystem(url: str):
    """The fsspec file system of `url`'s scheme (one per process)."""
    return _filesystem(split(url)[0])


def open_file(path, mode: str = "rb"):
    """A file object on a local path or a URL."""
    if is_url(path):
        return filesystem(str(path)).open(str(path), mode)
    return open(path, mode)


def info(url: str) -> dict:
    """The object's size and version ("size", "version": its generation or ETag); a missing
    object is FileNotFoundError, a refused or unreachable bucket a `StorageError`."""
    try:
        found = filesystem(url).info(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file") from None
    except (PermissionError, OSError) as e:
        raise StorageError(f"{url}: {cause(e)}") from None
    version = found.get("generation") or found.get("ETag") or found.get("etag") or ""
    return {"size": int(found.get("size") or 0), "type": found.get("type"),
            "version": str(version)}


def check_bucket(url: str) -> None:
    """One line naming the URL and the cause when its bucket is missing or refuses these
    credentials: before any work."""
    _, bucket, _ = split(url)
    fs = filesystem(url)
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise StorageError(f"{url}: bucket {bucket!r} does not exist") from None
    except (PermissionError, OSError) as e:
        raise StorageError(f"{url}: {cause(e)}") from None


# tensorstore raises ValueError for any failed status and says which only in the message
# ("UNAVAILABLE: ..."): the statuses of a store that went away or kept refusing.
_STORE_FAILED = re.compile(r"^(UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|RESOURCE_EXHAUSTED|"
                           r"UNKNOWN|PERMISSION_DENIED|UNAUTHENTICATED):")


def store_failure(error: BaseException) -> str | None:
    """What went wrong, in one line, when `error` (or its cause) is a bucket that failed
    (unreachable, refusing, retries spent): fsspec's OSError or tensorstore's ValueError."""
    while error is not None:
        if isinstance(error, OSError) or (isinstance(error, ValueError)
                                          and _STORE_FAILED.match(str(error))):
            return cause(error)
        error = error.__cause__ or error.__context__
    return None


def cause(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, PermissionError):
        return f"access refused ({text}; check the credentials)"
    return text


def create(url: str, data: bytes) -> bool:
    """Writes a new object only if none is there (GCS ifGenerationMatch=0, S3
    If-None-Match: *); False if one is."""
    try:
        filesystem(url).pipe_file(url, data, mode="create")
    except FileExistsError:
        return False
    return True


def read(url: str) -> bytes | None:
    try:
        return filesystem(url).cat_file(url)
    except FileNotFoundError:
        return None


def exists(url: str) -> bool:
    return filesystem(url).exists(url)


def write(url: str, data: bytes) -> None:
    filesystem(url).pipe_file(url, data)


def delete(url: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        filesystem(url).rm_file(url)


def kvstore_spec(path: str) -> dict:
    """A tensorstore kvstore spec for a local directory ("file") or a gs:// / s3:// prefix,
    with the endpoint the environment names and bounded retries."""
    if not is_url(path):
        return {"driver": "file", "path": os.path.abspath(path) + "/"}
    scheme, bucket, key = split(path)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    policy = {"max_retries": retries(), "initial_delay": "1s", "max_delay": "32s"}
    if scheme == "gs":
        if emulator := os.environ.get("STORAGE_EMULATOR_HOST"):
            # Read once, at tensorstore's first gs:// request.
            os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", _http(emulator))
        return {"driver": "gcs", "bucket": bucket, "path": prefix,
                "context": {"gcs_request_retries": policy}}
    spec = {"driver": "s3", "bucket": bucket, "path": prefix,
            "context": {"s3_request_retries": policy}}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        spec["endpoint"] = endpoint
    if region:
        spec["aws_region"] = region
    return spec


def _http(host: str) -> str:
    return host if "://" in host else f"http://{host}"
