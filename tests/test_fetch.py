"""Checksum verification and the download path of ``carefl data fetch``.

Only the network is replaced: ``fetch`` takes the URL opener as an argument, and the fake opener
serves the real bytes of the UCI files read from $CAREFL_DATA (default /work/shared/data).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from tests import helpers

from deploy.datasets import fetch
from client.ingest import heart_disease
from client.errors import DataFormatError, SiteError


@pytest.fixture(scope="module")
def real_bytes(data_dir) -> dict[str, bytes]:
    """URL → the real file's bytes, as the UCI server would serve them."""
    return {
        f"{heart_disease.SOURCE_URL}processed.{c}.data": heart_disease.centre_file(data_dir, c).read_bytes()
        for c in heart_disease.CENTRES
    }


class FakeOpener:
    """Stands in for ``urllib.request.urlopen``: serves bytes per URL and records the calls."""

    def __init__(self, served: dict[str, bytes]) -> None:
        self.served = served
        self.calls: list[tuple[str, float]] = []

    def __call__(self, url: str, timeout: float):
        self.calls.append((url, timeout))
        return io.BytesIO(self.served[url])  # a context manager with .read()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part")) if folder.is_dir() else []


@pytest.mark.parametrize("centre", heart_disease.CENTRES)
def test_verify_passes_on_real_files(data_dir, centre):
    path = heart_disease.centre_file(data_dir, centre)
    fetch.verify(path, heart_disease.MD5[centre])
    assert fetch.md5_of(path) == hashlib.md5(path.read_bytes()).hexdigest()


def test_verify_rejects_a_changed_file(data_dir, tmp_path):
    copy = tmp_path / "processed.cleveland.data"
    copy.write_bytes(heart_disease.centre_file(data_dir, "cleveland").read_bytes().replace(b"63.0", b"64.0", 1))
    with pytest.raises(DataFormatError, match="checksum mismatch") as info:
        fetch.verify(copy, heart_disease.MD5["cleveland"])
    assert str(copy) in str(info.value)


def test_heart_disease_files_cover_every_centre():
    files = fetch.heart_disease_files()
    assert {f.relpath for f in files} == {f"uci_heart_disease/processed.{c}.data" for c in heart_disease.CENTRES}
    assert all(f.url.startswith(heart_disease.SOURCE_URL) for f in files)
    assert {f.md5 for f in files} == set(heart_disease.MD5.values())


def test_fetch_writes_verified_files(real_bytes, tmp_path):
    opener = FakeOpener(real_bytes)
    written = fetch.fetch("heart-disease", tmp_path, opener=opener, timeout=5)
    assert len(written) == len(heart_disease.CENTRES)
    for centre in heart_disease.CENTRES:
        target = heart_disease.centre_file(tmp_path, centre)
        assert target in written
        assert fetch.md5_of(target) == heart_disease.MD5[centre]
    assert sorted(url for url, _ in opener.calls) == sorted(real_bytes)
    assert all(timeout == 5 for _, timeout in opener.calls)
    assert _leftovers(tmp_path / heart_disease.FOLDER) == []
    # the fetched files load as the real data set
    assert len(heart_disease.load_centre(heart_disease.centre_file(tmp_path, "cleveland")).y_train) == 199


def test_fetch_keeps_verified_files_without_downloading(real_bytes, tmp_path):
    fetch.fetch("heart-disease", tmp_path, opener=FakeOpener(real_bytes))
    again = FakeOpener(real_bytes)
    written = fetch.fetch("heart-disease", tmp_path, opener=again)
    assert again.calls == []
    assert len(written) == len(heart_disease.CENTRES)


def test_fetch_corrupted_download_leaves_nothing(real_bytes, tmp_path):
    corrupted = {url: data[:-20] + b"9" * 20 for url, data in real_bytes.items()}
    with pytest.raises(DataFormatError, match="checksum mismatch"):
        fetch.fetch("heart-disease", tmp_path, opener=FakeOpener(corrupted))
    folder = tmp_path / heart_disease.FOLDER
    for centre in heart_disease.CENTRES:
        assert not heart_disease.centre_file(tmp_path, centre).exists()
    assert _leftovers(folder) == []
    assert list(folder.iterdir()) == []


def test_fetch_replaces_a_corrupt_existing_file(real_bytes, tmp_path):
    target = heart_disease.centre_file(tmp_path, "va")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"1,2,3\n")
    fetch.fetch("heart-disease", tmp_path, opener=FakeOpener(real_bytes))
    assert fetch.md5_of(target) == heart_disease.MD5["va"]


def test_fetch_network_failure_names_the_url(tmp_path):
    asked = []

    def offline(url, timeout):
        asked.append(url)
        raise OSError("Network is unreachable")

    with pytest.raises(SiteError) as info:
        fetch.fetch("heart-disease", tmp_path, opener=offline)
    message = str(info.value)
    assert len(asked) == 1 and asked[0].startswith(heart_disease.SOURCE_URL)
    assert asked[0] in message
    assert "Network is unreachable" in message
    folder = tmp_path / heart_disease.FOLDER
    assert _leftovers(folder) == []
    assert not any(p.is_file() for p in folder.iterdir())


def test_fetch_unknown_dataset(tmp_path):
    with pytest.raises(SiteError, match="unknown data set 'mnist'; available: heart-disease"):
        fetch.fetch("mnist", tmp_path, opener=FakeOpener({}))


def test_hippocampus_archive_is_unpacked_into_the_layout_the_product_reads(tmp_path):
    """The network is the only thing replaced: a local archive of two real cases stands in for MSD's."""
    import tarfile

    from deploy.datasets.fetch import fetch_hippocampus
    from deploy.datasets import hippocampus

    cases = helpers.hippocampus_cases()[:2]
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w") as tar:
        for case in cases:
            tar.add(case.image, f"Task04_Hippocampus/imagesTr/{case.image.name}")
            tar.add(case.label, f"Task04_Hippocampus/labelsTr/{case.label.name}")
            tar.add(case.image, f"Task04_Hippocampus/imagesTr/._{case.image.name}")  # macOS litter in MSD tars
    seen = {}

    def local_download(url, filepath, output_dir, hash_val, hash_type):
        seen.update(url=url, hash_val=hash_val, hash_type=hash_type)
        with tarfile.open(archive) as tar:
            tar.extractall(output_dir, filter="data")

    data = tmp_path / "data"
    data.mkdir()
    images = fetch_hippocampus(data, download_and_extract=local_download)
    assert [p.name for p in images] == [c.image.name for c in cases]
    assert seen == {"url": hippocampus.SOURCE_URL, "hash_val": hippocampus.SOURCE_MD5, "hash_type": "md5"}
    assert [c.case_id for c in hippocampus.cases(data)] == [c.case_id for c in cases]
    assert not [p for p in data.iterdir() if p.name.startswith(".hippocampus-")]  # no half-written leftovers

    def broken_download(url, filepath, output_dir, hash_val, hash_type):
        raise RuntimeError("md5 check failed")

    with pytest.raises(SiteError, match="could not fetch"):
        fetch_hippocampus(tmp_path / "other", download_and_extract=broken_download)
    assert not (tmp_path / "other" / hippocampus.FOLDER).exists()
