"""Local copies of directories in a bucket (a converted model, a BEIR dataset): what reads a
whole directory at once gets it from a cache that is fetched again only when an object in
the bucket changed, and is never seen half-written."""

from __future__ import annotations

import json
from pathlib import Path

from . import outputs, storage
from .resources import cache_dir

STAMP = ".cde-jax-bucket-versions.json"  # in a local copy: the versions it was made from


def local_copy(url: str) -> Path:
    """A local copy of the directory at `url` (a converted model), in the bucket cache
    ($CDE_JAX_BUCKET_CACHE, else ~/.cache/cde-jax/buckets), fetched again only when an
    object's version changed; written to a temp dir and renamed, so a copy is whole."""
    scheme, bucket, key = storage.split(url)
    fs = storage.filesystem(url)
    try:
        found = fs.find(url, detail=True)
    except (PermissionError, OSError) as e:
        raise storage.StorageError(f"{url}: {storage.cause(e)}") from None
    if not found:
        raise FileNotFoundError(f"{url}: no such directory")
    versions = {name: str(i.get("generation") or i.get("ETag") or i.get("etag") or i["size"])
                for name, i in sorted(found.items())}
    stamp = json.dumps(versions, sort_keys=True)
    local = cache_dir("buckets", "CDE_JAX_BUCKET_CACHE") / scheme / bucket / key.strip("/")
    if (local / STAMP).is_file() and (local / STAMP).read_text() == stamp:
        return local
    with outputs.atomic_dir(local, overwrite=True) as tmp:
        prefix = f"{bucket}/{key.strip('/')}/"
        for name in versions:
            target = tmp / name.removeprefix(prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(target))
        (tmp / STAMP).write_text(stamp)
    return local
