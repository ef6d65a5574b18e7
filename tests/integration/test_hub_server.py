"""The local Hub test server (tests/hub_server.py) against the real huggingface_hub, datasets and transformers."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import _http, get_session

from tests.hub_server import LFS_SIZE_THRESHOLD, HubServer

MODEL = "tester/tiny-model"


def _write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def test_upload_list_info_and_download(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    assert api.whoami()["name"] == "tester"
    url = api.create_repo(MODEL)
    assert (url.repo_id, url.repo_type) == (MODEL, "model")
    assert api.create_repo(MODEL, exist_ok=True).repo_id == MODEL
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(MODEL)
    assert conflict.value.response.status_code == 409

    weights = os.urandom(LFS_SIZE_THRESHOLD + 1_000_000)
    local = {"README.md": b"# Tiny model\n", "weights.bin": weights}
    commit = api.upload_folder(folder_path=_write_folder(tmp_path / "upload", local), repo_id=MODEL)

    assert hub_server.files(MODEL) == local
    assert ("POST", f"/{MODEL}.git/info/lfs/objects/batch") in hub_server.requests_log
    assert any(method == "PUT" and path.startswith("/lfs/upload/") for method, path in hub_server.requests_log)
    assert sorted(api.list_repo_files(MODEL)) == ["README.md", "weights.bin"]
    info = api.model_info(MODEL, files_metadata=True)
    assert info.sha == commit.oid
    siblings = {sibling.rfilename: sibling for sibling in info.siblings}
    assert siblings["README.md"].lfs is None and siblings["weights.bin"].lfs.size == len(weights)
    assert Path(hf_hub_download(MODEL, "weights.bin")).read_bytes() == weights
    assert Path(hf_hub_download(MODEL, "README.md", revision=commit.oid)).read_bytes() == local["README.md"]

    # Unchanged files (same git blob id / sha256 in the preupload answer) make no new commit
    assert api.upload_folder(folder_path=tmp_path / "upload", repo_id=MODEL).oid == commit.oid


def test_range_requests(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(MODEL)
    content = bytes(range(256)) * 4096
    api.upload_file(path_or_fileobj=content, path_in_repo="data/blob.bin", repo_id=MODEL)

    with HfFileSystem().open(f"{MODEL}/data/blob.bin", "rb", block_size=4096) as file:
        file.seek(300_000)
        assert file.read(1000) == content[300_000:301_000]
    response = get_session().get(hf_hub_url(MODEL, "data/blob.bin"), headers={"Range": "bytes=10-19"})
    assert response.status_code == 206 and response.content == content[10:20]
    assert response.headers["Content-Range"] == f"bytes 10-19/{len(content)}"
    beyond = get_session().get(hf_hub_url(MODEL, "data/blob.bin"), headers={"Range": f"bytes={len(content)}-"})
    assert beyond.status_code == 416

    # An LFS object the server already holds is not uploaded again
    uploads = [path for method, path in hub_server.requests_log if method == "PUT"]
    api.upload_file(path_or_fileobj=content, path_in_repo="copy.bin", repo_id=MODEL)
    assert [path for method, path in hub_server.requests_log if method == "PUT"] == uploads
    assert hub_server.files(MODEL)["copy.bin"] == content


def test_tree_pagination_and_deletion(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(MODEL)
    api.upload_folder(folder_path=_write_folder(hub_server.root.parent / "many", {
        f"dir{i}/file{j}.txt": f"{i}-{j}".encode() for i in range(2) for j in range(3)}), repo_id=MODEL)
    hub_server.tree_page_size = 2

    assert len(api.list_repo_files(MODEL)) == 6
    assert sum(path == f"/api/models/{MODEL}/tree/main" for _, path in hub_server.requests_log) >= 4
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(MODEL)}
    assert top == {"dir0": "RepoFolder", "dir1": "RepoFolder"}
    assert [entry.path for entry in api.get_paths_info(MODEL, ["dir0/file1.txt", "nope"])] == ["dir0/file1.txt"]

    api.delete_folder("dir1", repo_id=MODEL)
    api.delete_file("dir0/file0.txt", repo_id=MODEL)
    assert sorted(hub_server.files(MODEL)) == ["dir0/file1.txt", "dir0/file2.txt"]


def test_datasets_streams_a_parquet_dataset_repo(hub_server: HubServer, tmp_path: Path) -> None:
    import datasets

    repo_id = "tester/tiny-dataset"
    HfApi().create_repo(repo_id, repo_type="dataset")
    folder = tmp_path / "dataset"
    (folder / "data").mkdir(parents=True)
    for shard in range(2):
        rows = range(shard * 5, shard * 5 + 5)
        datasets.Dataset.from_dict({"idx": list(rows), "text": [f"row {i}" for i in rows]}).to_parquet(
            folder / "data" / f"train-0000{shard}-of-00002.parquet")
    HfApi().upload_folder(folder_path=folder, repo_id=repo_id, repo_type="dataset")

    stream = datasets.load_dataset(repo_id, split="train", streaming=True)
    assert sorted((row["idx"], row["text"]) for row in stream) == [(i, f"row {i}") for i in range(10)]
    data_files = datasets.load_dataset_builder(repo_id).config.data_files["train"]
    assert sorted(Path(str(path)).name for path in data_files) == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]


def test_transformers_loads_a_pushed_model(hub_server: HubServer, tmp_path: Path) -> None:
    import torch
    import transformers

    config = transformers.SegformerConfig(num_labels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                          num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=16)
    model = transformers.SegformerForSemanticSegmentation(config)
    model.save_pretrained(tmp_path / "model")
    HfApi().create_repo(MODEL)
    HfApi().upload_folder(folder_path=tmp_path / "model", repo_id=MODEL)

    loaded = transformers.AutoModelForSemanticSegmentation.from_pretrained(MODEL)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_stopped_server_gives_connection_errors(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    api = HfApi()
    api.create_repo(MODEL)
    url = hub_server.url
    hub_server.stop()
    waits: list[float] = []  # the client retries a failed preupload 5 times, waiting 1+2+4+8+8 s
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=waits.append))

    with pytest.raises(httpx2.ConnectError):
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id=MODEL)
    assert len(waits) == 5  # the client's retries, none slept (their time says nothing here)

    assert hub_server.start() == url
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id=MODEL)
    assert hub_server.files(MODEL) == {"hello.txt": b"hello"}


def test_missing_repo_revision_and_file(hub_server: HubServer) -> None:
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/missing", "config.json")
    api.create_repo(MODEL)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=MODEL)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(MODEL, "missing.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(MODEL, revision="0" * 40)
    assert not api.file_exists(MODEL, "missing.json") and api.file_exists(MODEL, "config.json")


def test_writes_need_a_token(hub_server: HubServer) -> None:
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=False).create_repo(MODEL)
    assert error.value.response.status_code == 401


def test_subprocesses_use_the_server(hub_server: HubServer) -> None:
    code = "from huggingface_hub import HfApi; print(HfApi().whoami()['name'])"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tester"
