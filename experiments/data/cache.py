"""Download MovieLens-100K into the cache, verified by checksum, with tqdm progress.

Two sources are tried in order:

1. The GroupLens archive ``https://files.grouplens.org/datasets/movielens/ml-100k.zip``.
   It is verified by its MD5 ``0e33842e24a9c977be4e0107933c0723`` (the value
   published by several independent dataset tools); its SHA-256 could not be
   computed here because the GroupLens server was unreachable from the
   development machine, so ``GROUPLENS_ZIP_SHA256`` is None and only checked
   when set.  ``u.data``, ``u.item``, ``u.user`` (and the README) are extracted
   to ``<cache>/ml-100k/``.
2. Where only the Python package index is reachable: ``pip download --no-deps
   recbole==1.2.1`` (the wheel is downloaded, never installed), verified by its
   SHA-256, then RecBole's bundled ``recbole/dataset_example/ml-100k/ml-100k.*``
   atomic files are read out of the wheel with ``zipfile`` and each verified by
   its own SHA-256.

Downloads hold a lock on ``<cache>/ml-100k.lock`` (``download_lock``), and the files are
extracted into a staging folder that is renamed to ``<cache>/ml-100k`` when complete, so two
runs never write the same files and no run ever reads half a data set. Every download says
where it fetches from and where it writes (on stderr, always) and shows a tqdm bar (when
``progress``).  When both sources fail (offline),
``MovieLensDownloadError``, a ``DataError``, says in one line where to put the files.

The file fingerprint (``fingerprint_digests``) is the SHA-256 of the lines
``"<file name>\\t<sha256 of the file>\\n"`` sorted by name: it changes exactly
when a file that was read changes, and not when the data folder moves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from experiments.data.common import DataError

GROUPLENS_ZIP_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_ZIP_MD5 = "0e33842e24a9c977be4e0107933c0723"
GROUPLENS_ZIP_SHA256: str | None = None
GROUPLENS_MEMBERS = ("ml-100k/u.data", "ml-100k/u.item", "ml-100k/u.user", "ml-100k/README")

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_DATASET_PREFIX = "recbole/dataset_example/ml-100k/"
RECBOLE_FILE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.kg": "200a0636fa07c218119a42e5bac7aa3e26e3665a6f919c1b22909bd412b14779",
    "ml-100k.link": "524dca2c3d62619688ab99b3ec53ea2acb9b64d38eafec3e02bdd0dc6bb7d948",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}


class MovieLensDownloadError(DataError):
    """MovieLens-100K could not be obtained; the message says where to put the files."""


class ChecksumError(DataError):
    """A downloaded file does not have the expected checksum."""


def announce(message: str) -> None:
    """One ``[recrl]`` line on stderr (downloads always say what they do, whatever ``progress`` is)."""
    print(f"[recrl] {message}", file=sys.stderr, flush=True)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_digests(digests: Mapping[str, str]) -> str:
    """SHA-256 over ``"name\\tdigest\\n"`` lines sorted by name (module docstring)."""
    lines = "".join(f"{name}\t{digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def verify_checksum(path: Path, expected: str, algorithm: str = "sha256") -> None:
    """Raise ``ChecksumError`` naming the file unless its digest equals ``expected``."""
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise ChecksumError(f"{path}: {algorithm} is {actual}, expected {expected}; delete the file and retry")


def download_url(url: str, destination: Path, timeout_seconds: float = 30.0, progress: bool = True) -> Path:
    """Stream ``url`` to ``destination`` (via a ``.part`` file) with a tqdm bar."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout_seconds) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with partial.open("wb") as handle, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"download {destination.name}", disable=not progress
        ) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                handle.write(block)
                bar.update(len(block))
    partial.replace(destination)
    return destination


def fetch_from_grouplens(cache: Path, progress: bool = True) -> Path:
    """Download and verify the GroupLens archive, extract the needed files to ``<cache>/ml-100k``."""
    archive = cache / "downloads" / "ml-100k.zip"
    if not archive.is_file():
        announce(f"downloading {GROUPLENS_ZIP_URL} -> {archive}")
        download_url(GROUPLENS_ZIP_URL, archive, progress=progress)
    try:
        verify_checksum(archive, GROUPLENS_ZIP_MD5, "md5")
        if GROUPLENS_ZIP_SHA256 is not None:
            verify_checksum(archive, GROUPLENS_ZIP_SHA256, "sha256")
    except ChecksumError:
        archive.unlink(missing_ok=True)
        raise
    target, staging = cache / "ml-100k", staging_folder(cache)
    announce(f"extracting {', '.join(Path(member).name for member in GROUPLENS_MEMBERS)} -> {target}")
    with zipfile.ZipFile(archive) as bundle:
        names = set(bundle.namelist())
        for member in tqdm(GROUPLENS_MEMBERS, desc="extract ml-100k", disable=not progress):
            if member not in names:
                raise ChecksumError(f"{archive}: member {member} is missing from the archive")
            with bundle.open(member) as source, (staging / Path(member).name).open("wb") as sink:
                shutil.copyfileobj(source, sink)
    return install_folder(staging, target)


def staging_folder(cache: Path) -> Path:
    """An empty `<cache>/ml-100k.tmp-<pid>` to extract into; `install_folder` renames it into place when whole."""
    staging = cache / f"ml-100k.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def install_folder(staging: Path, target: Path) -> Path:
    """Replace `target` (absent, or an incomplete data set) by the complete `staging` folder in one rename, so no
    run ever reads half a data set. Called under `download_lock`."""
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def extract_recbole_wheel(wheel: Path, cache: Path, progress: bool = True) -> Path:
    """Verify a RecBole 1.2.1 wheel and copy its ML-100K atomic files (each verified) to ``<cache>/ml-100k``."""
    verify_checksum(wheel, RECBOLE_WHEEL_SHA256, "sha256")
    target, staging = cache / "ml-100k", staging_folder(cache)
    announce(f"extracting {', '.join(sorted(RECBOLE_FILE_SHA256))} from {wheel.name} -> {target}")
    with zipfile.ZipFile(wheel) as bundle:
        for file_name, expected in tqdm(
            sorted(RECBOLE_FILE_SHA256.items()), desc="extract ml-100k from recbole wheel", disable=not progress
        ):
            member = RECBOLE_DATASET_PREFIX + file_name
            try:
                data = bundle.read(member)
            except KeyError as error:
                raise ChecksumError(f"{wheel}: member {member} is missing from the wheel") from error
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise ChecksumError(f"{wheel}!{member}: sha256 is {actual}, expected {expected}")
            (staging / file_name).write_bytes(data)
    return install_folder(staging, target)


def fetch_from_recbole_wheel(cache: Path, progress: bool = True) -> Path:
    """``pip download --no-deps recbole==1.2.1`` into the cache (not installed), then extract."""
    downloads = cache / "downloads"
    wheel = downloads / RECBOLE_WHEEL_NAME
    if not wheel.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as staging:
            command = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--dest", staging, RECBOLE_REQUIREMENT,
            ]
            announce(f"{' '.join(command[2:])} (from the Python package index configured for pip) -> {wheel}")
            result = subprocess.run(command, capture_output=not progress, text=True, timeout=600)
            if result.returncode != 0:
                raise MovieLensDownloadError(
                    f"pip download of {RECBOLE_REQUIREMENT} failed (exit code {result.returncode}): "
                    f"{(result.stderr or '').strip()[-500:]}"
                )
            fetched = Path(staging) / RECBOLE_WHEEL_NAME
            if not fetched.is_file():
                raise MovieLensDownloadError(f"pip download did not produce {RECBOLE_WHEEL_NAME} in {staging}")
            fetched.replace(wheel)
    try:
        return extract_recbole_wheel(wheel, cache, progress=progress)
    except ChecksumError:
        wheel.unlink(missing_ok=True)
        raise


def where_to_put_files_message(searched: list[Path], cache: Path) -> str:
    """One line: where recrl looked, and where to put the files (or how to download them)."""
    searched_text = ", ".join(str(directory / "ml-100k") for directory in searched)
    return (
        "MovieLens-100K was not found and could not be downloaded. "
        f"Searched: {searched_text}. "
        "Fix: put either the RecBole atomic files ml-100k.inter, ml-100k.item (and .user/.kg/.link) "
        "or the GroupLens files u.data and u.item (from "
        f"{GROUPLENS_ZIP_URL}) into <DATA_DIR>/ml-100k/, and pass --data-dir DATA_DIR or set "
        f"RECRL_DATA_DIR=DATA_DIR; or run once with network access so they are downloaded into {cache}/ml-100k/."
    )


@contextlib.contextmanager
def download_lock(cache: Path):
    """Hold `<cache>/ml-100k.lock` (blocking): a second run that also finds the data missing waits for the first
    one's download instead of writing the same files at the same time, then finds them in place."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "ml-100k.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or by the kernel if the run dies
        yield


def download_movielens_100k(cache: Path, searched: list[Path] | None = None, progress: bool = True) -> Path:
    """Obtain MovieLens-100K in ``<cache>/ml-100k``: GroupLens first, the RecBole wheel second.

    Raises:
        MovieLensDownloadError: both sources failed (the message says where to put the files).
    """
    announce(f"MovieLens-100K not found; downloading it into {cache / 'ml-100k'}")
    for stale in cache.glob("ml-100k.tmp-*"):  # left by a run killed while extracting
        shutil.rmtree(stale, ignore_errors=True)
    failures: list[str] = []
    for name, fetch in (("GroupLens archive", fetch_from_grouplens), ("recbole 1.2.1 wheel", fetch_from_recbole_wheel)):
        try:
            return fetch(cache, progress=progress)
        except (urllib.error.URLError, OSError, subprocess.SubprocessError, MovieLensDownloadError,
                ChecksumError, zipfile.BadZipFile) as error:
            reason = " ".join(str(error).split())  # one line
            failures.append(f"{name}: {reason}")
            announce(f"{name} failed: {reason}")
    raise MovieLensDownloadError(
        where_to_put_files_message(searched or [cache], cache) + " Download attempts: " + " | ".join(failures)
    )
