"""Robust downloading: resumable HTTP, verification, safe zip extraction, multi-part zips.

Weights and data sets are large (hundreds of MB to tens of GB) and links drop, so every download
streams into a `.part` file, resumes it with an HTTP Range request, verifies size / sha256 when
known and only then renames into place. Extraction refuses unsafe member names and leaves a
`.completed` marker so that re-running any download command is free.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from .errors import DownloadError, one_line
from .fileio import sha256_file

COMPLETED_MARKER = ".completed"
USER_AGENT = "m2dx_clinic-downloader/0.1"
CHUNK_BYTES = 1 << 20
# Seconds to wait before retry n is `RETRY_SLEEP_S * n`; tests set it to 0.
RETRY_SLEEP_S = 1.0

__all__ = [
    "COMPLETED_MARKER",
    "download_file",
    "extract_zip",
    "is_completed",
    "join_multipart_zip",
    "mark_completed",
    "check_zip",
]


# --------------------------------------------------------------------------------------------
# small helpers


def part_path(dest: Path) -> Path:
    """Where an unfinished download of `dest` lives (same folder, so the final rename is atomic)."""
    return dest.with_name(dest.name + ".part")


def _verify(path: Path, expected_size: int | None, sha256: str | None) -> str | None:
    """Return a problem description, or None when the file matches what was expected."""
    if expected_size is not None:
        size = path.stat().st_size
        if size != expected_size:
            return f"size is {size} bytes, expected {expected_size}"
    if sha256 is not None:
        actual = sha256_file(path)
        if actual.lower() != sha256.strip().lower():
            return f"sha256 is {actual}, expected {sha256.strip().lower()}"
    return None


def is_completed(out_dir: Path) -> bool:
    """True when `out_dir` holds a finished extraction/download (its `.completed` marker exists)."""
    return (Path(out_dir) / COMPLETED_MARKER).is_file()


def mark_completed(out_dir: Path, note: str = "") -> Path:
    """Write the `.completed` marker last, so an interrupted job is redone rather than trusted."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / COMPLETED_MARKER
    marker.write_text((note.strip() + "\n") if note else "done\n", encoding="utf-8")
    return marker


# --------------------------------------------------------------------------------------------
# HTTP download


def _total_from_content_range(value: str | None) -> int | None:
    """Total size from `Content-Range: bytes a-b/total` (None when absent or `*`)."""
    if not value:
        return None
    m = re.match(r"\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*$", value)
    return int(m.group(1)) if m else None


def _start_from_content_range(value: str | None) -> int | None:
    if not value:
        return None
    m = re.match(r"\s*bytes\s+(\d+)-\d+/", value)
    return int(m.group(1)) if m else None


class _Progress:
    """`progress.make_progress`'s byte bar when asked for, otherwise a no-op (tests, logs, non-TTY jobs)."""

    def __init__(self, enabled: bool, label: str):
        self._bar = None
        self._task = None
        if enabled:
            from .progress import make_progress  # imported here: progress pulls in torch, a download needs none

            self._bar = make_progress(transfer=True)
            self._label = label

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
            self._task = self._bar.add_task(self._label, total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def set(self, completed: int, total: int | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)


def _fetch_once(url: str, part: Path, timeout: float, bar: _Progress) -> tuple[bool, int | None]:
    """One HTTP attempt that appends to `part` (resuming it when non-empty).

    Returns (finished, total_size). `finished` is False when the connection ended before the
    announced length, so the caller resumes with another attempt.
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have > 0:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have > 0:
            # Range not satisfiable: the part file is already complete, or longer than the file.
            total = _total_from_content_range(err.headers.get("Content-Range"))
            err.close()
            if total is not None and total == have:
                return True, total
            part.unlink(missing_ok=True)
            return False, None
        raise
    with response:
        status = response.status
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if have > 0 and status == 206:
            start = _start_from_content_range(response.headers.get("Content-Range"))
            if start is not None and start != have:
                # The server resumed from somewhere else: start over rather than corrupt the file.
                part.unlink(missing_ok=True)
                return False, None
            mode = "ab"
            total = _total_from_content_range(response.headers.get("Content-Range"))
            if total is None and length is not None:
                total = have + length
        else:
            # 200 (also the answer of servers that ignore Range): restart from byte 0.
            have = 0
            mode = "wb"
            total = length
        bar.set(have, total)
        received = 0
        with open(part, mode) as f:
            while True:
                block = response.read(CHUNK_BYTES)
                if not block:
                    break
                f.write(block)
                received += len(block)
                bar.advance(len(block))
    if length is not None and received < length:
        return False, total
    return True, total


def download_file(
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    retries: int = 5,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Download `url` to `dest`, resuming a previous `.part` file, verifying, then renaming.

    `check(part_path)` may add a content check (e.g. "is a readable zip"); it raises
    DownloadError to reject the file. A rejected or mis-sized file is deleted so that the next
    run starts clean. Returns `dest`; an existing `dest` that verifies is not downloaded again.
    """
    dest = Path(dest).expanduser()
    if dest.is_file():
        problem = _verify(dest, expected_size, sha256)
        if problem is None:
            return dest
        dest.unlink()  # stale or corrupt copy from an earlier run: fetch a fresh one
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    if expected_size is not None and part.exists() and part.stat().st_size > expected_size:
        part.unlink()

    finished = False
    last_error: BaseException | None = None
    with _Progress(progress, dest.name) as bar:
        for attempt in range(retries + 1):
            if expected_size is not None and part.exists() and part.stat().st_size == expected_size:
                finished = True
                break
            try:
                finished, _ = _fetch_once(url, part, timeout, bar)
                last_error = None
            except urllib.error.HTTPError as err:
                if err.code < 500 and err.code not in (408, 429):
                    raise DownloadError(
                        f"{url}: HTTP {err.code} {err.reason}; check the URL / name, or download "
                        f"it by hand to {dest}"
                    ) from err
                last_error = err
                finished = False
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                last_error = err
                finished = False
            if finished:
                break
            if attempt < retries and last_error is not None:
                time.sleep(RETRY_SLEEP_S * (attempt + 1))
    if not finished:
        reason = one_line(last_error, limit=None, with_type=True) if last_error else "connection dropped"
        if not part.exists() or part.stat().st_size == 0:  # nothing arrived: no network, not a dropped download
            host = urllib.parse.urlsplit(url).netloc or url
            raise DownloadError(
                f"{url}: could not reach {host} after {retries + 1} attempts ({reason}); check this machine's "
                f"network connection (or HTTPS_PROXY), or download the file elsewhere and put it at {dest}"
            )
        raise DownloadError(
            f"{url}: download did not finish after {retries + 1} attempts ({reason}); "
            f"re-run the command to resume from {part}"
        )

    problem = _verify(part, expected_size, sha256)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url}: downloaded file {dest.name} does not verify ({problem}); the partial file "
            "was deleted, re-run to download again or check the expected size/sha256"
        )
    if check is not None:
        try:
            check(part)
        except DownloadError:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------
# zip handling


def check_zip(path: Path, *, full: bool = False) -> None:
    """Raise DownloadError unless `path` opens as a zip (and, with full=True, all CRCs match)."""
    try:
        with zipfile.ZipFile(path) as zf:
            if full:
                bad = zf.testzip()
                if bad is not None:
                    raise DownloadError(
                        f"{path}: member {bad} is corrupt (CRC mismatch); delete the file and "
                        "download it again"
                    )
            else:
                _probe_members(zf)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as err:
        raise DownloadError(
            f"{path}: not a readable zip archive ({err}); delete it and download it again"
        ) from err


def _probe_members(zf: zipfile.ZipFile, samples: int = 64) -> None:
    """Open a spread of members' local headers: catches wrong offsets without reading all data."""
    infos = zf.infolist()
    if not infos:
        return
    step = max(1, len(infos) // samples)
    chosen = infos[::step] + [infos[-1]]
    for info in chosen:
        with zf.open(info) as member:
            member.read(1)


def _unsafe_member(name: str) -> bool:
    """A member name that would escape the output folder (absolute, drive letter or `..`)."""
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        return True
    return any(part == ".." for part in PurePosixPath(normalized).parts)


def extract_zip(zip_path: Path, out_dir: Path) -> Path:
    """Extract `zip_path` into `out_dir` safely, once: a `.completed` marker makes re-runs free.

    Every member name is checked before anything is written, so an archive with an absolute or
    `..` path (zip-slip) is refused as a whole.
    """
    zip_path, out_dir = Path(zip_path), Path(out_dir)
    if is_completed(out_dir):
        return out_dir
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DownloadError(
            f"{zip_path}: not a readable zip archive ({err}); delete it and download it again"
        ) from err
    with zf:
        unsafe = [info.filename for info in zf.infolist() if _unsafe_member(info.filename)]
        if unsafe:
            raise DownloadError(
                f"{zip_path}: refusing to extract unsafe member path {unsafe[0]!r} "
                f"({len(unsafe)} such); the archive is not trustworthy, get it from the official source"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            zf.extractall(out_dir)
        except (zipfile.BadZipFile, EOFError, ValueError) as err:
            raise DownloadError(
                f"{zip_path}: archive is corrupt ({err}); delete it and download it again"
            ) from err
    mark_completed(out_dir, f"extracted from {zip_path.name}")
    return out_dir


def _order_parts(parts: Sequence[Path]) -> list[Path]:
    """Order split-archive pieces as zip expects them: .z01, .z02, ..., then .zip last."""
    numbered: list[tuple[int, Path]] = []
    final: list[Path] = []
    for p in parts:
        p = Path(p)
        m = re.fullmatch(r"\.z(\d+)", p.suffix.lower())
        if m:
            numbered.append((int(m.group(1)), p))
        elif p.suffix.lower() == ".zip":
            final.append(p)
        else:
            raise DownloadError(
                f"{p}: not a split-zip piece (expected names ending .z01, .z02, ... and .zip)"
            )
    if len(final) != 1:
        raise DownloadError(
            f"split archive needs exactly one .zip piece, got {len(final)} among {len(parts)} "
            "files; pass all pieces (.z01 ... and .zip)"
        )
    numbered.sort()
    numbers = [n for n, _ in numbered]
    if numbers != list(range(1, len(numbers) + 1)):
        raise DownloadError(
            f"{final[0]}: split-archive pieces are incomplete (have .z{numbers}); download the "
            "missing pieces and retry"
        )
    return [p for _, p in numbered] + final


def _zip_is_usable(path: Path) -> bool:
    try:
        check_zip(path)
    except DownloadError:
        return False
    return True


def join_multipart_zip(parts: list[Path], out: Path) -> Path:
    """Join a split zip (`name.z01`, `name.z02`, ..., `name.zip`) into one readable archive `out`.

    Concatenating the pieces is enough for archives whose offsets are global. A split made by
    `zip -s` stores offsets per piece and a split signature; then `zip -s 0` (from the `zip`
    package) rewrites it. The output is written to a temporary name and renamed atomically.
    """
    ordered = _order_parts(parts)
    for p in ordered:
        if not p.is_file():
            raise DownloadError(f"{p}: split-archive piece is missing; download it and retry")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(out)
    with open(tmp, "wb") as dst:
        for p in ordered:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, CHUNK_BYTES)
    with open(tmp, "rb") as f:
        split_signature = f.read(4) == b"PK\x07\x08"
    if not split_signature and _zip_is_usable(tmp):
        os.replace(tmp, out)
        return out
    tmp.unlink(missing_ok=True)

    zip_bin = shutil.which("zip")
    if zip_bin is None:
        raise DownloadError(
            f"{ordered[-1]}: split archive needs re-assembly by the `zip` tool, which is not "
            "installed; install it (apt install zip) or extract with 7z (7z x "
            f"{ordered[-1]}) and pass the folder"
        )
    _rejoin_with_zip_tool(zip_bin, ordered, out, tmp)
    return out


def _rejoin_with_zip_tool(zip_bin: str, ordered: list[Path], out: Path, tmp: Path) -> None:
    """Run `zip -s 0 in.zip --out tmp.zip`; `zip` looks for the .zNN pieces next to in.zip."""
    last = ordered[-1]
    stem = last.with_suffix("")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".join-") as work:
        work_dir = Path(work)
        # zip needs the pieces side by side under one stem; link them there if they are not.
        expected = [stem.with_name(f"{stem.name}.z{i:02d}") for i in range(1, len(ordered))]
        if [p.resolve() for p in ordered[:-1]] != [p.resolve() for p in expected]:
            for i, p in enumerate(ordered[:-1], start=1):
                os.symlink(p.resolve(), work_dir / f"joined.z{i:02d}")
            os.symlink(last.resolve(), work_dir / "joined.zip")
            source = work_dir / "joined.zip"
        else:
            source = last
        target = work_dir / "single.zip"
        result = subprocess.run(
            [zip_bin, "-s", "0", str(source), "--out", str(target)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0 or not _zip_is_usable(target):
            message = (result.stderr or result.stdout).strip().splitlines()
            detail = message[-1] if message else f"exit code {result.returncode}"
            raise DownloadError(
                f"{last}: could not join the split archive with `zip -s 0` ({detail}); "
                "re-download the pieces or extract with 7z"
            )
        os.replace(target, tmp)
    os.replace(tmp, out)
