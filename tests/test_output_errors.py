"""The errno that tensorstore and safetensors put only in their messages (issue 29.4): both
libraries fail for real (a write under a file: ENOTDIR), and `outputs.os_error` must find the
errno and the path. If an upgrade changes the text, these fail loudly. Also: the umask is
read without changing it, and each format's class is chosen once from the path."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import safetensors.numpy
import tensorstore as ts

from cde_jax import outputs
from cde_jax.corpus import sinks


def test_tensorstore_errno_is_read_from_its_message(tmp_path):
    (tmp_path / "file").write_text("x")
    kv = ts.KvStore.open({"driver": "file", "path": str(tmp_path / "file" / "z") + "/"}).result()
    with pytest.raises(ValueError) as caught:
        kv.write(b"k", b"v").result()
    found = outputs.os_error(caught.value)
    assert found is not None and found.errno == errno.ENOTDIR, str(caught.value)


def test_safetensors_errno_and_path_are_read_from_its_message(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(safetensors.SafetensorError) as caught:
        safetensors.numpy.save_file({"a": np.zeros(2)}, str(tmp_path / "file" / "w.safetensors"))
    found = outputs.os_error(caught.value)
    assert found is not None and found.errno == errno.ENOTDIR, str(caught.value)
    assert found.filename.startswith(str(tmp_path / "file")), str(caught.value)


def test_a_message_of_another_type_is_not_read():
    assert outputs.os_error(RuntimeError("[os_error_code='28']")) is None
    assert outputs.os_error(ValueError("no errno here")) is None


def test_umask_is_read_without_being_changed():
    before = os.umask(0o027)
    try:
        outputs._umask.cache_clear()
        assert outputs._umask() == 0o027
        assert os.umask(0o027) == 0o027  # still the process's own
    finally:
        os.umask(before)
        outputs._umask.cache_clear()


@pytest.mark.parametrize(("path", "kind"), [("a.zarr", sinks.ZarrSink), ("a.npy", sinks.NpySink),
                                            ("a.parquet", sinks.ParquetSink),
                                            ("gs://b/a.zarr/", sinks.ZarrSink)])
def test_each_format_is_one_class(path, kind):
    assert sinks.sink_type(path) is kind
    assert sinks.output_format(path) == kind.suffix


@pytest.mark.parametrize("path", ["gs://bucket/a.npy", "s3://bucket/a.parquet"])
def test_a_remote_npy_or_parquet_is_refused_naming_what_may_be_remote(path):
    with pytest.raises(sinks.OutputError, match=r"only \.zarr outputs may be in a bucket"):
        sinks.sink_type(path)
