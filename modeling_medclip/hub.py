"""Hugging Face Hub helpers for training: checkpoint uploads in a background thread and the final push, with retries.

Training calls [`BackgroundUploader.upload`] after saving a checkpoint folder and goes on at once; one worker thread
commits the folders to the Hub in order, retrying transient errors (HTTP 408/429/5xx, network errors) with exponential
backoff and logging a warning that names the checkpoint on each failure. Local folders are only ever read.

```python
uploader = BackgroundUploader("me/medclip-run", revision="checkpoints")
uploader.upload("out/checkpoint-500")  # returns immediately
...
uploader.close()  # waits for pending uploads; raises HubUploadError listing the checkpoints that never made it
push_final("out/final", "me/medclip-run", commit_message="Final model")
```

The endpoint is the one `huggingface_hub` uses (`HF_ENDPOINT`, default https://huggingface.co), see [`hub_endpoint`].
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError

try:  # the HTTP client of huggingface_hub >= 2
    from httpx2 import TransportError
except ImportError:  # huggingface_hub 1.x
    from httpx import TransportError

logger = logging.getLogger(__name__)

RETRYABLE_STATUS_CODES = (408, 429, 500, 502, 503, 504)


def hub_endpoint() -> str:
    """The Hub endpoint `huggingface_hub` talks to (from `HF_ENDPOINT`, read when it is imported), for logs."""
    return constants.ENDPOINT


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: wait `initial_delay`, then twice as long each time (at most `max_delay`) seconds."""

    max_attempts: int = 5
    initial_delay: float = 2.0
    max_delay: float = 60.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError(f"delays must be >= 0, got {self.initial_delay} and {self.max_delay}")


@dataclass(frozen=True)
class UploadFailure:
    """A folder that could not be uploaded: where it is, where it was going, and the last error."""

    folder: Path
    path_in_repo: str
    attempts: int
    error: BaseException

    def __str__(self) -> str:
        return f"{self.folder} -> {self.path_in_repo or '/'} ({self.attempts} attempt(s)): {self.error!r}"


class HubUploadError(RuntimeError):
    """Raised when uploads failed for good; `failures` lists them."""

    def __init__(self, failures: list[UploadFailure]):
        self.failures = failures
        lines = "\n".join(f"  - {failure}" for failure in failures)
        super().__init__(f"{len(failures)} upload(s) to {hub_endpoint()} failed:\n{lines}")


def is_transient(error: BaseException) -> bool:
    """Whether retrying may help: HTTP 408/429/5xx or a network error, also when wrapped by `huggingface_hub`."""
    while error is not None:
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            return error.response.status_code in RETRYABLE_STATUS_CODES
        if isinstance(error, (TransportError, ConnectionError, TimeoutError)):
            return True
        error = error.__cause__
    return False


def _call_with_retries(fn, description: str, retry: RetryPolicy):
    """Call `fn()`; on a transient error log a warning naming `description`, back off and try again."""
    delay = retry.initial_delay
    for attempt in range(1, retry.max_attempts + 1):
        try:
            return fn()
        except Exception as error:
            if attempt == retry.max_attempts or not is_transient(error):
                raise
            logger.warning(
                "Upload of %s to %s failed (attempt %d/%d): %r. Retrying in %.1fs.",
                description,
                hub_endpoint(),
                attempt,
                retry.max_attempts,
                error,
                delay,
            )
            time.sleep(delay)
            delay = min(2 * delay, retry.max_delay)


def _ensure_repo(api: HfApi, repo_id: str, repo_type: str, revision: str | None, private: bool | None) -> None:
    """Create the repo and, for a `revision` other than the default branch, the branch, unless they exist."""
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision is not None and revision != constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)


def _check_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Cannot upload {folder}: it is not a folder")
    return folder


def push_final(
    folder: str | Path,
    repo_id: str,
    revision: str | None = None,
    commit_message: str = "Upload final model",
    *,
    path_in_repo: str | None = None,
    repo_type: str = "model",
    private: bool | None = None,
    token: str | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> CommitInfo:
    """Upload `folder` to `repo_id` (creating the repo and branch if needed) and wait for it, retrying transient errors.

    Returns:
        The `CommitInfo` of the commit. Raises the last error if every attempt failed.
    """
    folder = _check_folder(folder)
    api = HfApi(token=token)

    def push() -> CommitInfo:
        _ensure_repo(api, repo_id, repo_type, revision, private)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            repo_type=repo_type,
            revision=revision,
            commit_message=commit_message,
        )

    logger.info("Pushing %s to %s/%s (revision %s).", folder, hub_endpoint(), repo_id, revision or "main")
    return _call_with_retries(push, f"'{folder}'", retry)


@dataclass(frozen=True)
class _UploadJob:
    folder: Path
    path_in_repo: str
    commit_message: str


class BackgroundUploader:
    """Upload folders (checkpoints) to one Hub repo from a background thread, in the order they were queued.

    Args:
        repo_id: The target repo, e.g. `"me/medclip-run"`; created (`exist_ok=True`) before the first upload.
        revision: The branch to commit to (created from `main` if missing); `None` for the default branch.
        repo_type: `"model"` (default) or `"dataset"`.
        private: Visibility of the repo if it has to be created.
        token: Hub token; `None` for the one `huggingface_hub` finds (`HF_TOKEN`, `hf auth login`).
        retry: How often and how patiently to retry transient errors.

    A folder must stay on disk until its upload is done (`wait()`); the uploader never deletes or changes it.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        repo_type: str = "model",
        private: bool | None = None,
        token: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
    ):
        self.repo_id = repo_id
        self.revision = revision
        self.repo_type = repo_type
        self.private = private
        self.retry = retry
        self.api = HfApi(token=token)
        self._repo_ready = False
        self._failures: list[UploadFailure] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[_UploadJob | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"hub-upload-{repo_id}", daemon=True)
        self._thread.start()

    def upload(self, folder: str | Path, path_in_repo: str | None = None, commit_message: str | None = None) -> None:
        """Queue `folder` for upload to `path_in_repo` (default: the folder's name) and return at once."""
        if self._closed:
            raise RuntimeError("This BackgroundUploader is closed")
        folder = _check_folder(folder)
        path_in_repo = folder.name if path_in_repo is None else path_in_repo
        commit_message = commit_message or f"Upload {path_in_repo or folder.name}"
        self._queue.put(_UploadJob(folder, path_in_repo, commit_message))

    @property
    def failures(self) -> list[UploadFailure]:
        """The uploads that failed for good so far."""
        with self._lock:
            return list(self._failures)

    def wait(self) -> list[UploadFailure]:
        """Block until every queued upload is done (uploaded or failed for good); return the failures so far."""
        self._queue.join()
        return self.failures

    def close(self, raise_on_failure: bool = True) -> list[UploadFailure]:
        """Finish the queued uploads and stop the worker; raise `HubUploadError` if any upload failed for good."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        failures = self.failures
        if failures and raise_on_failure:
            raise HubUploadError(failures)
        return failures

    def __enter__(self) -> "BackgroundUploader":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(raise_on_failure=exc_type is None)  # do not hide the caller's own exception

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._run(job)
            finally:
                self._queue.task_done()

    def _run(self, job: _UploadJob) -> None:
        attempts = 0

        def push() -> CommitInfo:
            nonlocal attempts
            attempts += 1
            if not self._repo_ready:
                _ensure_repo(self.api, self.repo_id, self.repo_type, self.revision, self.private)
                self._repo_ready = True
            return self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=job.folder,
                path_in_repo=job.path_in_repo,
                repo_type=self.repo_type,
                revision=self.revision,
                commit_message=job.commit_message,
            )

        try:
            commit = _call_with_retries(push, f"checkpoint '{job.folder}'", self.retry)
        except Exception as error:
            logger.warning(
                "Giving up on the upload of checkpoint '%s' after %d attempt(s): %r", job.folder, attempts, error
            )
            with self._lock:
                self._failures.append(UploadFailure(job.folder, job.path_in_repo, attempts, error))
        else:
            logger.info("Uploaded checkpoint '%s' to %s (%s).", job.folder, self.repo_id, commit.oid)
