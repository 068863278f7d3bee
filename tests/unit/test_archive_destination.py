"""
``check_archive_destination``: where images will go is checked before anything is generated. A
scheme with no filesystem installed and a local folder that cannot be made fail at once, naming
the destination and the fix; a folder that can be made is made, and the probe leaves nothing.
"""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from imagecb_provider.batch import archive
from imagecb_provider.batch.archive import check_archive_destination
from imagecb_provider.exceptions import ImageCbArchiveUnavailable, ImageCbConfigurationError


def test_a_folder_that_can_be_made_is_made_and_left_empty(tmp_path):
    day = tmp_path / "archive" / "2026-03-01"
    path = check_archive_destination(str(day))
    assert path.protocol == "file"
    assert day.is_dir()
    assert list(day.iterdir()) == []  # the probe file is gone


def test_a_folder_under_a_file_cannot_be_made(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ImageCbConfigurationError) as caught:
        check_archive_destination(f"{blocker}/day")
    assert isinstance(caught.value, AirflowFailException)
    message = str(caught.value)
    assert message.startswith(f"The archive destination {blocker}/day cannot be created or written")
    assert "NotADirectoryError" in message
    assert "archive_root" in message


def test_a_scheme_without_a_filesystem_names_what_to_install():
    with pytest.raises(ImageCbConfigurationError) as caught:
        check_archive_destination("nosuchfs://bucket/images")
    assert "The archive destination nosuchfs://bucket/images cannot be used" in str(caught.value)
    assert "no filesystem for nosuchfs:// is installed" in str(caught.value)


def test_s3_without_the_amazon_provider_names_it(monkeypatch):
    def without_s3fs(url, conn_id=None):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(archive, "storage_path", without_s3fs)
    with pytest.raises(ImageCbConfigurationError) as caught:
        check_archive_destination("s3://images/batch")
    message = str(caught.value)
    assert "s3://images/batch" in message
    assert "Install apache-airflow-providers-amazon[s3fs] on every worker" in message
    assert "Install s3fs to access S3" in message


def test_an_object_store_that_refuses_the_probe_is_retryable(monkeypatch):
    class RefusingPath:
        protocol = "s3"
        fs = object()

        def __truediv__(self, name):
            return self

        def mkdir(self, **kwargs):  # pragma: no cover - must not be called for a bucket
            raise AssertionError("mkdir in an object store may create a bucket")

        def write_bytes(self, body):
            raise RuntimeError("Unable to locate credentials")

    monkeypatch.setattr(archive, "storage_path", lambda url, conn_id=None: RefusingPath())
    with pytest.raises(ImageCbArchiveUnavailable) as caught:
        check_archive_destination("s3://images/batch")
    assert not isinstance(caught.value, AirflowFailException)
    assert "s3://images/batch could not be written (RuntimeError: Unable to locate credentials)" in str(
        caught.value
    )
