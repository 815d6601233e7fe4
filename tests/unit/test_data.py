import functools
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cifar_rounds.core.errors import StageError
from cifar_rounds.data.cifar import BATCHES_DIR, TEST_FILE, TRAIN_FILES, read_batches, read_label_names, read_pickle
from cifar_rounds.data.dataset import Split
from cifar_rounds.stages.download import download
from cifar_rounds.stages.split import make_split, stratified_val_indices


def test_archive_has_the_exact_cifar_python_format(archive, tmp_path):
    path, md5 = archive
    download(str(path), md5, tmp_path / "raw")
    root = tmp_path / "raw" / BATCHES_DIR
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted([*TRAIN_FILES, TEST_FILE, "batches.meta"])
    batch = read_pickle(root / "data_batch_1")
    assert batch["data"].dtype == np.uint8 and batch["data"].shape[1] == 3072
    assert isinstance(batch["labels"], list)
    assert read_label_names(root)[0] == "airplane"
    images, labels = read_batches(root, TRAIN_FILES)
    assert images.shape == (1500, 3, 32, 32) and set(labels) == set(range(10))


def test_download_from_file_url_and_http(archive, tmp_path):
    path, md5 = archive
    download(path.as_uri(), md5, tmp_path / "a")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        download(f"http://127.0.0.1:{server.server_port}/{path.name}", md5, tmp_path / "b")
    finally:
        server.shutdown()
    a, b = (read_pickle(tmp_path / d / BATCHES_DIR / TEST_FILE)["data"] for d in "ab")
    assert np.array_equal(a, b)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_wrong_checksum_leaves_no_partial_file_and_keeps_the_old_output(archive, tmp_path):
    path, md5 = archive
    out = tmp_path / "raw"
    download(str(path), md5, out)
    before = (out / BATCHES_DIR / TEST_FILE).read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(StageError, match="data.md5"):
        download(str(truncated), md5, out)
    assert (out / BATCHES_DIR / TEST_FILE).read_bytes() == before
    assert _leftovers(tmp_path) == ["raw", "truncated.tar.gz"]


def test_unreachable_url_explains_how_to_use_a_local_copy(tmp_path):
    with pytest.raises(StageError) as error:
        download("http://127.0.0.1:9/cifar-10-python.tar.gz", "0" * 32, tmp_path / "raw")
    assert "data.url" in str(error.value) and "local" in str(error.value)
    assert _leftovers(tmp_path) == []


def _tar_with(member: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,kind",
    [
        ("../evil.txt", tarfile.REGTYPE),
        ("/tmp/evil.txt", tarfile.REGTYPE),
        (f"{BATCHES_DIR}/link", tarfile.SYMTYPE),
        (f"{BATCHES_DIR}/../../evil", tarfile.REGTYPE),
    ],
)
def test_members_escaping_the_target_are_refused(tmp_path, name, kind):
    import hashlib

    member = tarfile.TarInfo(name)
    member.type = kind
    member.size = 1 if kind == tarfile.REGTYPE else 0
    member.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(_tar_with(member))
    with pytest.raises(StageError, match="refusing"):
        download(str(evil), hashlib.md5(evil.read_bytes()).hexdigest(), tmp_path / "raw")
    assert not (tmp_path / "raw").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_split_is_stratified_deterministic_and_disjoint(archive, tmp_path):
    path, md5 = archive
    download(str(path), md5, tmp_path / "raw")
    root = tmp_path / "raw" / BATCHES_DIR
    a, b = make_split(root, 300, seed=3), make_split(root, 300, seed=3)
    assert np.array_equal(a.val_images, b.val_images) and np.array_equal(a.train_labels, b.train_labels)
    assert not np.array_equal(a.val_images, make_split(root, 300, seed=4).val_images)  # the seed matters
    assert len(a.val_labels) == 300 and len(a.train_labels) == 1200 and len(a.test_labels) == 400
    # stratified: each class's share of the validation set equals its share of the training set
    _, labels = read_batches(root, TRAIN_FILES)
    expected = np.bincount(labels, minlength=10) * 300 / len(labels)
    assert np.all(np.abs(np.bincount(a.val_labels, minlength=10) - expected) < 1)
    # disjoint, and together the whole training set
    rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}  # noqa: E731
    assert not rows(a.val_images) & rows(a.train_images)
    assert len(rows(a.val_images) | rows(a.train_images)) == len(rows(read_batches(root, TRAIN_FILES)[0]))


def test_split_file_round_trips_uncompressed(tmp_path):
    rng = np.random.default_rng(0)
    big = Split(
        *(
            rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8) if i % 2 == 0 else rng.integers(0, 10, n)
            for i, n in enumerate([4500, 4500, 500, 500, 1000, 1000])
        ),
        label_names=list("abcdefghij"),
    )
    big.save(tmp_path / "split.npz")
    # stored, not deflated: loading is a copy of the bytes, never a decompression
    with zipfile.ZipFile(tmp_path / "split.npz") as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    loaded = Split.load(tmp_path / "split.npz")
    assert np.array_equal(loaded.test_images, big.test_images) and loaded.label_names == big.label_names


@pytest.mark.parametrize(
    "content", [b"", b"PK\x03\x04 truncated", b"not a zip at all"], ids=["empty", "truncated", "garbage"]
)
def test_a_corrupt_split_file_is_one_line_naming_it(tmp_path, content):
    (tmp_path / "split.npz").write_bytes(content)
    with pytest.raises(StageError, match=r"split.npz: not a readable split .*rerun the split stage") as error:
        Split.load(tmp_path / "split.npz")
    assert "\n" not in str(error.value)


def test_val_size_not_smaller_than_training_set_is_refused():
    labels = np.arange(100) % 10
    with pytest.raises(StageError, match="data.val_size"):
        stratified_val_indices(labels, 100, 0)
    assert len(stratified_val_indices(labels, 37, 0)) == 37
