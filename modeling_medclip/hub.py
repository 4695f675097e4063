"""Hugging Face Hub uploads for training: checkpoints in the background, a record of what is not yet on the Hub, and
the final push.

Training calls [`BackgroundUploader.upload`] after saving a checkpoint folder and goes on at once: the upload runs on
`huggingface_hub`'s own background worker (`HfApi.run_as_future`, one upload after the other, in order). Before it is
queued, the folder is written into the *upload record* `hub_uploads.json` next to it (see [`UploadRecord`]); it
leaves the record once it is on the Hub. What a run could not upload (the Hub was down, the run was killed) is still
listed there, so the next run, or [`upload_pending`], uploads it. Local folders are only ever read; keep a folder on
disk while it is listed ([`BackgroundUploader.pending_folders`], e.g. to spare it from checkpoint rotation).

```python
uploader = BackgroundUploader("me/medclip-run", revision="checkpoints")
uploader.upload_pending("out")  # what an earlier run left in out/hub_uploads.json, queued first
uploader.upload("out/checkpoint-500")  # returns immediately
...
uploader.close(timeout=120)  # waits at most 120 s in total; what is not on the Hub by then stays in the record
push_final("out/final", "me/medclip-run", commit_message="Final model")
```

Retries are single-layered: `huggingface_hub` retries its idempotent HTTP requests itself (HTTP 408/429/5xx and
network errors, at most 5 times with a backoff of 1, 2, 4, 8 and 8 s), and this module adds no retry loop around it.
An upload that still fails is logged with the folder's name, stays in the record, and is tried once more when the
next folder is queued (and by the next run). `close(timeout)` bounds the wait for all uploads together; uploads that
have not started by then are cancelled (still recorded), and an upload in progress is left to finish or fail on its
own (with the Hub down: about 23 s, the client's own retries) while the interpreter exits.

The endpoint is the one `huggingface_hub` uses (`HF_ENDPOINT`, default https://huggingface.co), see [`hub_endpoint`].
Tokens are never written to the record: pass `token` (or set `HF_TOKEN`) each time.
"""

import json
import logging
import os
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import asdict, dataclass
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, constants

logger = logging.getLogger(__name__)

UPLOAD_RECORD_NAME = "hub_uploads.json"
DEFAULT_CLOSE_TIMEOUT = 300.0


def hub_endpoint() -> str:
    """The Hub endpoint `huggingface_hub` talks to (from `HF_ENDPOINT`, read when it is imported), for logs."""
    return constants.ENDPOINT


@dataclass(frozen=True)
class PendingUpload:
    """One folder to upload: `folder` is its name inside the record's directory; the rest says where it goes."""

    folder: str
    repo_id: str
    path_in_repo: str
    revision: str | None = None
    repo_type: str = "model"
    commit_message: str = ""

    def __str__(self) -> str:
        return f"{self.folder} -> {self.repo_id}/{self.path_in_repo or ''} (revision {self.revision or 'main'})"


@dataclass(frozen=True)
class UploadFailure:
    """A folder that is not on the Hub: where it is, where it was going, and why (the last error, or not finished)."""

    folder: Path
    path_in_repo: str
    error: BaseException | None

    def __str__(self) -> str:
        reason = repr(self.error) if self.error is not None else "not finished before the deadline"
        record = self.folder.parent / UPLOAD_RECORD_NAME
        return f"{self.folder} -> {self.path_in_repo or '/'}: {reason} (kept in {record})"


class HubUploadError(RuntimeError):
    """Raised when uploads did not make it to the Hub; `failures` lists them (they stay in their upload record)."""

    def __init__(self, failures: list[UploadFailure]):
        self.failures = failures
        lines = "\n".join(f"  - {failure}" for failure in failures)
        super().__init__(f"{len(failures)} upload(s) to {hub_endpoint()} did not complete:\n{lines}")


class UploadRecord:
    """The folders of one directory that are not yet on the Hub: `<directory>/hub_uploads.json`.

    The file is `{"pending": [PendingUpload as a dict, ...]}`, rewritten atomically (temporary file, `fsync`,
    `os.replace`) on every change, so a kill leaves either the old or the new list. Thread-safe.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / UPLOAD_RECORD_NAME
        self._lock = threading.Lock()

    def entries(self) -> list[PendingUpload]:
        """The recorded uploads, oldest first; a record that cannot be read is reported and treated as empty."""
        with self._lock:
            return self._read()

    def add(self, upload: PendingUpload) -> None:
        with self._lock:
            entries = self._read()
            if upload not in entries:
                self._write([*entries, upload])

    def remove(self, upload: PendingUpload) -> None:
        with self._lock:
            entries = self._read()
            if upload in entries:
                self._write([entry for entry in entries if entry != upload])

    def _read(self) -> list[PendingUpload]:
        if not self.path.is_file():
            return []
        try:
            return [PendingUpload(**entry) for entry in json.loads(self.path.read_text())["pending"]]
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("Ignoring the unreadable upload record %s: %r", self.path, error)
            return []

    def _write(self, entries: list[PendingUpload]) -> None:
        if not entries:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as file:
            json.dump({"pending": [asdict(entry) for entry in entries]}, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.path)


def _check_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Cannot upload {folder}: it is not a folder")
    return folder


def _ensure_repo(api: HfApi, repo_id: str, repo_type: str, revision: str | None, private: bool | None) -> None:
    """Create the repo and, for a `revision` other than the default branch, the branch, unless they exist."""
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision is not None and revision != constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)


def push_final(
    folder: str | os.PathLike,
    repo_id: str,
    revision: str | None = None,
    commit_message: str = "Upload final model",
    *,
    path_in_repo: str | None = None,
    repo_type: str = "model",
    private: bool | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Upload `folder` to `repo_id` (creating the repo and branch if needed) and wait for it.

    `huggingface_hub` retries each request on transient errors; the last error is raised if it still fails.

    Returns:
        The `CommitInfo` of the commit.
    """
    folder = _check_folder(folder)
    api = HfApi(token=token)
    logger.info("Pushing %s to %s/%s (revision %s).", folder, hub_endpoint(), repo_id, revision or "main")
    _ensure_repo(api, repo_id, repo_type, revision, private)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=path_in_repo,
        repo_type=repo_type,
        revision=revision,
        commit_message=commit_message,
    )


class BackgroundUploader:
    """Upload folders (checkpoints) to the Hub in the background, in the order they were queued, keeping a record of
    what is not there yet (see the module docstring).

    Args:
        repo_id: The target repo of [`upload`], e.g. `"me/medclip-run"`; created (`exist_ok=True`) before the first
            upload to it. Not needed for [`upload_pending`] alone: each recorded upload names its repo.
        revision: The branch to commit to (created from `main` if missing); `None` for the default branch.
        repo_type: `"model"` (default) or `"dataset"`.
        private: Visibility of the repo if it has to be created.
        token: Hub token; `None` for the one `huggingface_hub` finds (`HF_TOKEN`, `hf auth login`). Never recorded.
    """

    def __init__(
        self,
        repo_id: str | None = None,
        *,
        revision: str | None = None,
        repo_type: str = "model",
        private: bool | None = None,
        token: str | None = None,
    ):
        self.repo_id = repo_id
        self.revision = revision
        self.repo_type = repo_type
        self.private = private
        self.api = HfApi(token=token)
        self._lock = threading.Lock()
        self._records: dict[Path, UploadRecord] = {}
        self._jobs: list[tuple[Path, PendingUpload, Future]] = []
        self._ready_repos: set[tuple[str, str, str | None]] = set()
        self._failures: list[UploadFailure] = []
        self._closed = False

    def upload(
        self, folder: str | os.PathLike, path_in_repo: str | None = None, commit_message: str | None = None
    ) -> None:
        """Record `folder` and queue its upload to `path_in_repo` (default: the folder's name); returns at once."""
        if self.repo_id is None:
            raise ValueError("BackgroundUploader.upload needs the uploader's repo_id")
        folder = _check_folder(folder)
        path_in_repo = folder.name if path_in_repo is None else path_in_repo
        upload = PendingUpload(
            folder=folder.name,
            repo_id=self.repo_id,
            path_in_repo=path_in_repo,
            revision=self.revision,
            repo_type=self.repo_type,
            commit_message=commit_message or f"Upload {path_in_repo or folder.name}",
        )
        self._retry_failures()
        self._submit(folder.parent, upload)

    def upload_pending(self, directory: str | os.PathLike) -> list[PendingUpload]:
        """Queue every upload listed in the record of `directory` (left there by an earlier run), to the repo each
        was going to; entries whose folder no longer exists are dropped with a warning. Returns what was queued."""
        record = self._record(Path(directory))
        queued = []
        for upload in record.entries():
            if not (record.directory / upload.folder).is_dir():
                logger.warning("Dropping %s from %s: the folder no longer exists.", upload, record.path)
                record.remove(upload)
                continue
            self._submit(record.directory, upload)
            queued.append(upload)
        if queued:
            logger.info("Uploading %d folder(s) an earlier run left in %s.", len(queued), record.path)
        return queued

    def _retry_failures(self) -> None:
        """Queue the uploads that failed so far once more, ahead of a new one (not a retry loop: one new try each)."""
        with self._lock:
            failures, self._failures = self._failures, []
            jobs = {
                (directory / upload.folder, upload.path_in_repo): (directory, upload)
                for directory, upload, _ in self._jobs
            }
        for failure in failures:
            directory, upload = jobs[(failure.folder, failure.path_in_repo)]
            if (directory / upload.folder).is_dir():
                self._submit(directory, upload)

    def pending_folders(self) -> set[Path]:
        """The folders queued or uploading in this process, or listed in one of its records (not on the Hub yet)."""
        with self._lock:
            records = list(self._records.values())
            folders = {directory / upload.folder for directory, upload, future in self._jobs if not future.done()}
        return folders | {record.directory / upload.folder for record in records for upload in record.entries()}

    @property
    def failures(self) -> list[UploadFailure]:
        """The uploads that failed and are not queued again (each still listed in its record)."""
        with self._lock:
            return list(self._failures)

    def wait(self, timeout: float | None = None) -> list[UploadFailure]:
        """Block until every queued upload is done or `timeout` seconds have passed; return the failures so far."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            futures = [future for _, _, future in self._jobs]
        for future in futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                future.exception(timeout=remaining)
            except TimeoutError:
                break
            except CancelledError:
                continue
        return self.failures

    def close(
        self, timeout: float | None = DEFAULT_CLOSE_TIMEOUT, raise_on_failure: bool = True
    ) -> list[UploadFailure]:
        """Wait at most `timeout` seconds (in total) for the queued uploads, cancel those not started by then, and
        return (or, with `raise_on_failure`, raise as `HubUploadError`) every upload that is not on the Hub.

        Everything returned is still listed in its upload record, for the next run or [`upload_pending`].
        """
        self._closed = True
        self.wait(timeout)
        with self._lock:
            jobs = list(self._jobs)
        unfinished = []
        for directory, upload, future in jobs:
            if not future.done():
                future.cancel()  # not started yet: never will be; started: left to finish or fail on its own
                unfinished.append(UploadFailure(directory / upload.folder, upload.path_in_repo, None))
                logger.warning("Upload of %s did not finish before the deadline; it stays recorded.", upload)
        failures = self.failures + unfinished
        if failures and raise_on_failure:
            raise HubUploadError(failures)
        return failures

    def __enter__(self) -> "BackgroundUploader":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(raise_on_failure=exc_type is None)  # do not hide the caller's own exception

    def _record(self, directory: Path) -> UploadRecord:
        directory = directory.resolve()
        with self._lock:
            return self._records.setdefault(directory, UploadRecord(directory))

    def _submit(self, directory: Path, upload: PendingUpload) -> None:
        if self._closed:
            raise RuntimeError("This BackgroundUploader is closed")
        record = self._record(directory)
        record.add(upload)  # recorded before it is queued: a kill from here on leaves it listed
        future = self.api.run_as_future(self._push, record, upload)
        with self._lock:
            self._jobs.append((record.directory, upload, future))

    def _push(self, record: UploadRecord, upload: PendingUpload) -> CommitInfo | None:
        """Runs on `huggingface_hub`'s worker thread: one upload, no retries beyond the client's own."""
        folder = record.directory / upload.folder
        try:
            key = (upload.repo_id, upload.repo_type, upload.revision)
            if key not in self._ready_repos:
                _ensure_repo(self.api, upload.repo_id, upload.repo_type, upload.revision, self.private)
                self._ready_repos.add(key)
            commit = self.api.upload_folder(
                repo_id=upload.repo_id,
                folder_path=folder,
                path_in_repo=upload.path_in_repo,
                repo_type=upload.repo_type,
                revision=upload.revision,
                commit_message=upload.commit_message,
            )
        except Exception as error:
            logger.warning(
                "Upload of '%s' to %s failed: %r. It stays in %s.", folder, hub_endpoint(), error, record.path
            )
            with self._lock:
                self._failures.append(UploadFailure(folder, upload.path_in_repo, error))
            return None
        record.remove(upload)
        logger.info("Uploaded '%s' to %s (%s).", folder, upload.repo_id, getattr(commit, "oid", None))
        return commit


def upload_pending(
    directory: str | os.PathLike, *, token: str | None = None, timeout: float | None = DEFAULT_CLOSE_TIMEOUT
) -> list[UploadFailure]:
    """Upload what the record of `directory` (`hub_uploads.json`) lists and wait (at most `timeout` seconds).

    Returns what is still not on the Hub (still recorded).
    """
    uploader = BackgroundUploader(token=token)
    uploader.upload_pending(directory)
    return uploader.close(timeout=timeout, raise_on_failure=False)


__all__ = [
    "BackgroundUploader",
    "HubUploadError",
    "PendingUpload",
    "UPLOAD_RECORD_NAME",
    "UploadFailure",
    "UploadRecord",
    "hub_endpoint",
    "push_final",
    "upload_pending",
]
