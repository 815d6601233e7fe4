"""Stage `download`: fetch the CIFAR-10 archive, verify its MD5, extract it safely.

`data.url` may be an http(s):// URL, a file:// URL or a local path. Nothing is
left behind on failure: the archive is fetched and extracted in a temporary
folder next to the output, which replaces the output only when complete.
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.files import file_md5
from cifar_rounds.core.inputs import folder
from cifar_rounds.core.params import load_params
from cifar_rounds.data.cifar import BATCHES_DIR


def local_path(url: str) -> Path | None:
    """The file a file:// URL or a plain path names; None for a remote URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path, or a Windows drive letter
        return Path(url).expanduser()
    return None


def fetch(url: str, workdir: Path) -> Path:
    """The archive as a local file: the given one, or a download into workdir."""
    path = local_path(url)
    if path is not None:
        if path.is_dir():
            raise StageError(f"data.url: {path} is a folder; expected the CIFAR-10 archive (.tar.gz)")
        if not path.is_file():
            raise StageError(f"data.url: no such file {path}")
        return path
    # imported here: torchvision takes seconds to import, and a local archive does not need it
    from torchvision.datasets.utils import download_url

    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "archive.tar.gz"
    try:
        download_url(url, str(workdir), name)
    except (urllib.error.URLError, OSError) as error:
        raise StageError(
            f"data.url: cannot download {url} ({getattr(error, 'reason', error)}); to use a local copy, "
            "set data.url in params.yaml to its path (e.g. /data/cifar-10-python.tar.gz) and rerun "
            "scripts/pipeline.sh; to try the pipeline without the data set, run scripts/offline.sh"
        ) from None
    return workdir / name


def verify_md5(path: Path, expected: str) -> None:
    actual = file_md5(path)
    if actual != expected:
        raise StageError(f"data.md5: {path.name} has MD5 {actual}, expected {expected} (truncated or wrong file?)")


def check_member(member: tarfile.TarInfo) -> None:
    """Only plain files and folders that stay inside the target may be extracted."""
    parts = PurePosixPath(member.name).parts
    if member.name.startswith("/") or ".." in parts:
        raise StageError(f"archive member {member.name!r} escapes the target folder; refusing it")
    if not (member.isfile() or member.isdir()):
        raise StageError(f"archive member {member.name!r} is a link or device; refusing it")
    if parts[0] != BATCHES_DIR:
        raise StageError(f"archive member {member.name!r} is outside {BATCHES_DIR}/; not a CIFAR-10 archive")


def extract(archive: Path, target: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                check_member(member)
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise StageError(f"{archive.name}: cannot extract ({error})") from None


def download(url: str, md5: str, out_dir: Path) -> None:
    """Populate out_dir/cifar-10-batches-py atomically."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        archive = fetch(url, Path(tmp))
        verify_md5(archive, md5)
        staged = Path(tmp) / "extracted"
        extract(archive, staged)
        if not (staged / BATCHES_DIR).is_dir():
            raise StageError(f"{archive.name}: no {BATCHES_DIR}/ folder inside; not a CIFAR-10 archive")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to hold cifar-10-batches-py/")
    args = parser.parse_args()
    folder(args.out, "the folder to hold cifar-10-batches-py/")
    params = load_params()
    download(params.data.url, params.data.md5, args.out)
    print(f"download: {params.data.url} verified and extracted into {args.out}")


if __name__ == "__main__":
    run_stage(main)
