"""Hub round trips against the local Hub-compatible server (tests/hub_server.py) with the real, unmodified clients."""

import base64
import hashlib
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from hub_server import hub_server_fixture  # noqa: F401  (registers the `hub_server` fixture)
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file

from modeling_medclip.hub import (
    UPLOAD_RECORD_NAME,
    BackgroundUploader,
    HubUploadError,
    PendingUpload,
    UploadRecord,
    hub_endpoint,
    push_final,
    upload_pending,
)


def make_checkpoint(folder: Path, seed: int) -> Path:
    """A checkpoint-like folder: a tiny safetensors file (LFS), a JSON file and a nested text file (regular)."""
    generator = torch.Generator().manual_seed(seed)
    (folder / "nested").mkdir(parents=True)
    save_file({"weight": torch.randn(4, 8, generator=generator), "bias": torch.zeros(8)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"seed": seed, "hidden_size": 8}))
    (folder / "nested" / "notes.txt").write_text(f"checkpoint with seed {seed}\n")
    return folder


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_upload_folder_download_and_snapshot(hub_server, tmp_path):
    api = HfApi()
    folder = make_checkpoint(tmp_path / "ckpt", seed=0)
    repo_url = api.create_repo("tiny-model")  # no namespace: the server's user, as on the Hub
    assert repo_url.repo_id == f"{hub_server.user}/tiny-model"
    assert repo_url.startswith(hub_server.endpoint)

    commit = api.upload_folder(repo_id="user/tiny-model", folder_path=folder, commit_message="Add checkpoint")
    assert hub_server.count("lfs-upload", "PUT") == 1  # only the safetensors file took the LFS path

    assert sorted(api.list_repo_files("user/tiny-model")) == [
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "nested/notes.txt",
    ]
    for name, digest in folder_digest(folder).items():
        path = hf_hub_download("user/tiny-model", name)
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest
        assert commit.oid in path  # cached under the snapshot of the commit just made
    snapshot = Path(snapshot_download("user/tiny-model", revision=commit.oid))
    downloaded = folder_digest(snapshot)
    assert "filter=lfs" in (snapshot / ".gitattributes").read_text()  # the repo's initial commit
    del downloaded[".gitattributes"]
    assert downloaded == folder_digest(folder)
    assert torch.equal(
        load_file(snapshot / "model.safetensors")["weight"], load_file(folder / "model.safetensors")["weight"]
    )

    siblings = {s.rfilename: s for s in api.model_info("user/tiny-model", files_metadata=True).siblings}
    assert siblings["model.safetensors"].lfs.sha256 == folder_digest(folder)["model.safetensors"]
    assert siblings["config.json"].lfs is None
    assert siblings["model.safetensors"].size == (folder / "model.safetensors").stat().st_size

    # Uploading the same folder again is a no-op: the server reports the remote oids and the client skips the commit.
    again = api.upload_folder(repo_id="user/tiny-model", folder_path=folder, commit_message="Same again")
    assert again.oid == commit.oid


def test_range_reads_through_hf_file_system(hub_server, tmp_path):
    api = HfApi()
    api.create_repo("user/ranges")
    data = bytes(range(256)) * 40
    api.upload_file(path_or_fileobj=data, path_in_repo="blob.bin", repo_id="user/ranges")
    fs = HfFileSystem()
    assert fs.cat_file("user/ranges/blob.bin", start=1000, end=1100) == data[1000:1100]
    with fs.open("user/ranges/blob.bin", "rb", block_size=512) as f:
        f.seek(9000)
        assert f.read(300) == data[9000:9300]
    assert fs.info("user/ranges/blob.bin")["size"] == len(data)


def test_branches_tags_commits_and_pagination(hub_server, tmp_path):
    api = HfApi()
    api.create_repo("user/branches")
    api.upload_file(path_or_fileobj=b"main v1", path_in_repo="a.txt", repo_id="user/branches", commit_message="v1")
    api.create_branch("user/branches", branch="checkpoints")
    api.create_branch("user/branches", branch="checkpoints", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as error:
        api.create_branch("user/branches", branch="checkpoints")
    assert error.value.response.status_code == 409
    api.upload_file(
        path_or_fileobj=b"on branch", path_in_repo="ckpt/b.txt", repo_id="user/branches", revision="checkpoints"
    )
    api.create_tag("user/branches", tag="v1", revision="main")

    assert Path(hf_hub_download("user/branches", "ckpt/b.txt", revision="checkpoints")).read_bytes() == b"on branch"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/branches", "ckpt/b.txt")  # not on main
    assert Path(hf_hub_download("user/branches", "a.txt", revision="v1")).read_bytes() == b"main v1"

    refs = api.list_repo_refs("user/branches")
    branches = {ref.name: ref.target_commit for ref in refs.branches}
    assert set(branches) == {"main", "checkpoints"}
    assert [ref.name for ref in refs.tags] == ["v1"] and refs.tags[0].target_commit == branches["main"]

    hub_server.page_size = 2  # force several pages: the client follows the Link headers
    commits = api.list_repo_commits("user/branches", revision="checkpoints")
    assert [c.title for c in commits] == ["Upload ckpt/b.txt with huggingface_hub", "v1", "initial commit"]
    assert commits[0].commit_id == branches["checkpoints"]
    files = api.list_repo_files("user/branches", revision="checkpoints")
    assert sorted(files) == [".gitattributes", "a.txt", "ckpt/b.txt"]
    assert hub_server.count("tree") >= 2
    folders = [e.path for e in api.list_repo_tree("user/branches", revision="checkpoints") if not hasattr(e, "size")]
    assert folders == ["ckpt"]


def test_not_found_errors_and_auth(hub_server, tmp_path):
    api = HfApi()
    api.create_repo("user/errors")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/errors", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/errors", ".gitattributes", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/no-such-repo", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files("user/no-such-repo", repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo("user/errors")
    assert error.value.response.status_code == 409
    assert api.create_repo("user/errors", exist_ok=True).repo_id == "user/errors"
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/errors")
    assert error.value.response.status_code == 401


def post_json(hub_server, route: str, payload: dict | str) -> tuple[int, str]:
    """A raw, authorized POST to the server (the client validates names itself; a hostile caller does not)."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    request = urllib.request.Request(
        f"{hub_server.endpoint}{route}",
        data=body.encode(),
        headers={"Authorization": "Bearer x", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def all_paths(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "../../outside/", "name": "victim"},  # the old server deleted tmp_path/outside/s/user/victim
        {"type": "../../outside/s/", "organization": "user", "name": "victim"},
        {"type": "model", "organization": "..", "name": "outside"},
        {"type": "model", "organization": ".", "name": "user"},  # would make the namespace folder `user` a repo
        {"type": "model", "organization": "user", "name": "."},
        {"type": "model", "name": "../user"},
        {"type": "model", "name": "a/b"},
    ],
)
def test_server_refuses_repo_names_outside_its_root(hub_server, tmp_path, payload):
    HfApi().create_repo("user/victim")
    outside = tmp_path / "outside" / "s" / "user" / "victim"  # root/repos/<type>s/user/victim for type ../../outside/
    outside.mkdir(parents=True)
    (outside / "refs.json").write_text("{}")
    before, root_before = all_paths(tmp_path / "outside"), all_paths(hub_server.root)
    for route in ("/api/repos/delete", "/api/repos/create"):
        status, body = post_json(hub_server, route, payload)
        assert status == 400, (route, status, body)
    assert all_paths(tmp_path / "outside") == before
    assert all_paths(hub_server.root) == root_before
    assert HfApi().list_repo_files("user/victim") == [".gitattributes"]


@pytest.mark.parametrize(
    "name", ["", "-lead", "trail-", ".dot", "dot.", "a--b", "a..b", "x.git", "caf\u00e9", "a b", "a" * 97, None]
)
def test_server_applies_the_hub_naming_rules(hub_server, name):
    status, body = post_json(hub_server, "/api/repos/create", {"type": "model", "name": name})
    assert status == 400 and "Invalid repo name" in body
    assert post_json(hub_server, "/api/repos/create", {"type": "model", "organization": name or "-", "name": "ok"})[0] == 400
    assert post_json(hub_server, "/api/repos/create", {"type": "weights", "name": "ok"})[0] == 400
    assert post_json(hub_server, "/api/repos/create", {"type": "model", "name": "a" * 96})[0] == 200
    assert post_json(hub_server, "/api/repos/create", {"type": "dataset", "name": "Ok_name-1.2"})[0] == 200


@pytest.mark.parametrize(
    "path", ["../escape.txt", "a/../../escape.txt", "./a.txt", "a/./b.txt", "/abs.txt", "a//b.txt", ".git/config",
             "a/.git/hooks/x", "", "a/", "back\\slash.txt", "nul\x00.txt"],
)  # fmt: skip
def test_server_refuses_file_paths_outside_the_repo(hub_server, path):
    HfApi().create_repo("user/paths")
    header = {"key": "header", "value": {"summary": "hostile", "description": ""}}
    operation = {"key": "file", "value": {"path": path, "content": base64.b64encode(b"x").decode(), "encoding": "base64"}}
    commit = "\n".join(json.dumps(line) for line in (header, operation))
    assert post_json(hub_server, "/api/models/user/paths/commit/main", commit)[0] == 400
    preupload = {"files": [{"path": path, "size": 1, "sample": ""}]}
    assert post_json(hub_server, "/api/models/user/paths/preupload/main", preupload)[0] == 400
    assert HfApi().list_repo_files("user/paths") == [".gitattributes"]
    deleted = {"key": "deletedFolder", "value": {"path": path}}
    status, _ = post_json(hub_server, "/api/models/user/paths/commit/main", "\n".join(map(json.dumps, (header, deleted))))
    assert status == 400 or path == "a/"  # a folder path may end with "/" (then it does not exist: 404)


def test_server_refuses_bad_branch_names(hub_server):
    HfApi().create_repo("user/refs")
    for branch in ("..", "a/../b", ".hidden", "x.lock", "a:b", "a b", "a@{1}"):
        assert post_json(hub_server, f"/api/models/user/refs/branch/{quote(branch, safe='')}", {})[0] == 400, branch
    assert [ref.name for ref in HfApi().list_repo_refs("user/refs").branches] == ["main"]


def test_transformers_push_to_hub_and_from_pretrained(hub_server):
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    model = BertModel(config)
    model.push_to_hub("tiny-bert")
    assert hub_server.count("lfs-upload", "PUT") == 1  # model.safetensors

    reloaded = AutoModel.from_pretrained("user/tiny-bert")
    assert type(reloaded) is BertModel and reloaded.config.hidden_size == 32
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_datasets_push_to_hub_and_streaming_load(hub_server):
    import datasets

    rows = {"report": ["no acute findings", "small left effusion", "cardiomegaly"], "label": [0, 1, 1]}
    datasets.Dataset.from_dict(rows).push_to_hub("user/tiny-reports")
    assert hub_server.count("lfs-upload", "PUT") == 1  # the parquet shard went through LFS

    streamed = datasets.load_dataset("user/tiny-reports", split="train", streaming=True)
    assert list(streamed) == [{"report": r, "label": y} for r, y in zip(rows["report"], rows["label"], strict=True)]


def test_fresh_process_reaches_the_server_through_its_env(hub_server, tmp_path):
    HfApi().create_repo("user/from-parent")
    code = (
        "from huggingface_hub import HfApi, constants; "
        "HfApi().upload_file(path_or_fileobj=b'child', path_in_repo='child.txt', repo_id='user/from-parent'); "
        "print(constants.ENDPOINT)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=hub_server.env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hub_server.endpoint
    assert Path(hf_hub_download("user/from-parent", "child.txt")).read_bytes() == b"child"


def test_hub_endpoint_is_the_local_server(hub_server):
    assert hub_endpoint() == hub_server.endpoint


def record_entries(directory: Path) -> list[str]:
    return [upload.folder for upload in UploadRecord(directory).entries()]


def test_background_uploader_does_not_block_the_caller(hub_server, tmp_path):
    first = make_checkpoint(tmp_path / "checkpoint-10", seed=1)
    second = make_checkpoint(tmp_path / "checkpoint-20", seed=2)
    hub_server.set_delay(0.5, route="create-repo")  # the worker's first request, then each commit, take 0.5 s
    hub_server.set_delay(0.5, route="commit")

    uploader = BackgroundUploader("user/run", revision="checkpoints")
    start = time.perf_counter()
    uploader.upload(first)
    uploader.upload(second, commit_message="Second checkpoint")
    queued_in = time.perf_counter() - start
    assert queued_in < 0.5, f"upload() blocked the caller for {queued_in:.2f}s"
    assert hub_server.count("commit") == 0  # nothing committed yet when the calls returned
    assert record_entries(tmp_path) == ["checkpoint-10", "checkpoint-20"]  # recorded before they were queued
    assert uploader.pending_folders() == {first.resolve(), second.resolve()}

    assert uploader.wait() == []
    assert uploader.close() == []
    assert not (tmp_path / UPLOAD_RECORD_NAME).exists() and uploader.pending_folders() == set()
    api = HfApi()
    files = api.list_repo_files("user/run", revision="checkpoints")
    for checkpoint in (first, second):
        for name, digest in folder_digest(checkpoint).items():
            assert f"{checkpoint.name}/{name}" in files
            path = hf_hub_download("user/run", f"{checkpoint.name}/{name}", revision="checkpoints")
            assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest
    assert "checkpoint-10/config.json" not in api.list_repo_files("user/run")  # main is untouched
    titles = [c.title for c in api.list_repo_commits("user/run", revision="checkpoints")]
    assert titles[:2] == ["Second checkpoint", "Upload checkpoint-10"]


def test_one_layer_of_retries_and_a_failed_upload_is_tried_again_with_the_next(hub_server, tmp_path, caplog):
    first = make_checkpoint(tmp_path / "checkpoint-5", seed=5)
    second = make_checkpoint(tmp_path / "checkpoint-6", seed=6)
    hub_server.fail_next(2, status=500, route="preupload")  # retried by huggingface_hub itself (1 s, then 2 s)
    uploader = BackgroundUploader("user/retry-run")
    uploader.upload(first)
    assert uploader.wait() == []
    assert hub_server.count("preupload", "POST") == 3 and hub_server.count("commit", "POST") == 1
    assert record_entries(tmp_path) == []

    hub_server.fail_next(1, status=500, route="commit")  # a commit is not retried by the client, nor by us
    first_again = make_checkpoint(tmp_path / "checkpoint-7", seed=7)
    with caplog.at_level(logging.WARNING, logger="modeling_medclip.hub"):
        uploader.upload(first_again)
        [failure] = uploader.wait()
    assert failure.folder == first_again.resolve() and failure.error.response.status_code == 500
    assert str(first_again.resolve()) in caplog.text
    assert hub_server.count("commit", "POST") == 2 and record_entries(tmp_path) == ["checkpoint-7"]
    uploader.upload(second)  # the failed one is queued once more, ahead of the new one
    assert uploader.close() == []
    assert hub_server.count("commit", "POST") == 4
    files = HfApi().list_repo_files("user/retry-run")
    assert all(f"{c.name}/model.safetensors" in files for c in (first, first_again, second))
    assert record_entries(tmp_path) == []


def test_failed_upload_stays_recorded_and_the_next_run_uploads_it(hub_server, tmp_path, caplog):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-7", seed=7)
    before = folder_digest(checkpoint)
    hub_server.fail_next(1, status=403, route="commit")  # not transient: the client does not retry
    uploader = BackgroundUploader("user/doomed-run", revision="checkpoints")
    with caplog.at_level(logging.WARNING, logger="modeling_medclip.hub"):
        uploader.upload(checkpoint)
        with pytest.raises(HubUploadError, match="checkpoint-7") as error:
            uploader.close()
    [failure] = error.value.failures
    assert failure.folder == checkpoint.resolve() and failure.error.response.status_code == 403
    assert any(str(checkpoint.resolve()) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert hub_server.count("commit", "POST") == 1
    assert folder_digest(checkpoint) == before  # local checkpoint intact, byte for byte
    assert "checkpoint-7/config.json" not in HfApi().list_repo_files("user/doomed-run", revision="checkpoints")
    assert record_entries(tmp_path) == ["checkpoint-7"]
    with pytest.raises(RuntimeError, match="closed"):
        uploader.upload(checkpoint)

    # The next run: a fresh uploader (even for another repo) sends what the record lists, to where it was going.
    next_run = BackgroundUploader("user/other-repo")
    assert [upload.folder for upload in next_run.upload_pending(tmp_path)] == ["checkpoint-7"]
    assert next_run.close() == []
    assert record_entries(tmp_path) == []
    path = hf_hub_download("user/doomed-run", "checkpoint-7/model.safetensors", revision="checkpoints")
    assert Path(path).read_bytes() == (checkpoint / "model.safetensors").read_bytes()


def test_close_has_a_total_deadline_and_unfinished_uploads_stay_recorded(hub_server, tmp_path):
    checkpoints = [make_checkpoint(tmp_path / f"checkpoint-{step}", seed=step) for step in (1, 2, 3)]
    hub_server.set_delay(2.0, route="commit")
    uploader = BackgroundUploader("user/slow-run")
    for checkpoint in checkpoints:
        uploader.upload(checkpoint)
    start = time.monotonic()
    unfinished = uploader.close(timeout=0.5, raise_on_failure=False)
    assert time.monotonic() - start < 2.0  # the deadline, not 3 commits of 2 s
    assert [failure.folder.name for failure in unfinished] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert all(failure.error is None and "deadline" in str(failure) for failure in unfinished)
    uploader.wait()  # the upload in progress finishes on its own; the two not started were cancelled
    hub_server.set_delay(0, route="commit")
    assert hub_server.count("commit", "POST") == 1
    assert record_entries(tmp_path) == ["checkpoint-2", "checkpoint-3"]
    assert upload_pending(tmp_path) == []  # what the next run does first
    files = HfApi().list_repo_files("user/slow-run")
    assert all(f"{c.name}/model.safetensors" in files for c in checkpoints)
    assert not (tmp_path / UPLOAD_RECORD_NAME).exists()


def test_upload_pending_drops_folders_that_are_gone_and_survives_a_torn_record(hub_server, tmp_path, caplog):
    record = UploadRecord(tmp_path)
    record.add(PendingUpload(folder="checkpoint-3", repo_id="user/gone", path_in_repo="checkpoint-3"))
    with caplog.at_level(logging.WARNING, logger="modeling_medclip.hub"):
        assert upload_pending(tmp_path) == []
    assert "no longer exists" in caplog.text and record.entries() == []
    (tmp_path / UPLOAD_RECORD_NAME).write_text('{"pending": [{"folder": "checkp')  # what a kill mid-write would leave
    with caplog.at_level(logging.WARNING, logger="modeling_medclip.hub"):
        assert record.entries() == []
    assert "unreadable upload record" in caplog.text
    with pytest.raises(ValueError, match="not a folder"):
        BackgroundUploader("user/gone").upload(tmp_path / "missing")


def test_push_final_lands_on_the_branch(hub_server, tmp_path):
    final = make_checkpoint(tmp_path / "final", seed=3)
    hub_server.fail_next(1, status=502, route="preupload")
    commit = push_final(final, "user/final-run", revision="release", commit_message="Final model")
    assert hub_server.count("preupload", "POST") == 2  # the client's own retry
    refs = {ref.name: ref.target_commit for ref in HfApi().list_repo_refs("user/final-run").branches}
    assert refs["release"] == commit.oid
    snapshot = Path(snapshot_download("user/final-run", revision="release"))
    assert folder_digest(snapshot)["model.safetensors"] == folder_digest(final)["model.safetensors"]
    assert folder_digest(snapshot)["nested/notes.txt"] == folder_digest(final)["nested/notes.txt"]


UPLOAD_WHILE_THE_HUB_IS_DOWN = """
import sys, time
from modeling_medclip.hub import BackgroundUploader
uploader = BackgroundUploader("user/outage-run", revision="checkpoints")
for folder in sys.argv[1:]:
    uploader.upload(folder)
failures = uploader.close(timeout=3, raise_on_failure=False)
print(len(failures), "not uploaded", flush=True)
"""


def test_hub_down_for_the_whole_run_exits_in_bounded_time_and_the_next_run_uploads_everything(tmp_path, monkeypatch):
    from hub_server import point_clients_at, start_hub_server

    checkpoints = [make_checkpoint(tmp_path / f"checkpoint-{step}", seed=step) for step in (10, 20, 30, 40)]
    with start_hub_server(tmp_path / "hub") as down:  # a real endpoint, closed before anything reaches it
        env = {**down.env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", UPLOAD_WHILE_THE_HUB_IS_DOWN, *map(str, checkpoints)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "4 not uploaded" in result.stdout
    # bounded: the deadline (3 s) plus the client's own retries of the one upload in progress (about 23 s), not the
    # 4 x 5 nested attempts of minutes each that a retry loop around the client would take
    assert elapsed < 60, f"the process took {elapsed:.0f}s to exit with the Hub down"
    assert record_entries(tmp_path) == ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40"]

    with start_hub_server(tmp_path / "hub") as hub:  # the Hub is back (another port, same storage)
        point_clients_at(hub, monkeypatch)
        assert upload_pending(tmp_path) == []
        files = HfApi().list_repo_files("user/outage-run", revision="checkpoints")
    for checkpoint in checkpoints:
        assert all(f"{checkpoint.name}/{name}" in files for name in folder_digest(checkpoint))
    assert not (tmp_path / UPLOAD_RECORD_NAME).exists()
