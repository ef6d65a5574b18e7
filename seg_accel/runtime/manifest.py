"""Checkpoint manifests: every file of a checkpoint with its size and sha256, written last.

A checkpoint is trusted for a resume only when its manifest is there and every file it
lists has the listed size and hash: a truncated or corrupted file (a full disk, a copy
that stopped, a bit flip) is found before anything is loaded, and ``auto_resume`` falls
back to the previous checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_CHUNK = 4 * 2**20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """List every file under ``folder`` (but ``skip``) in ``manifest.json``, written last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST and name not in skip:
            files[name] = {"size": path.stat().st_size, "sha256": sha256(path)}
    manifest = {"format": 1, "files": files}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(folder / MANIFEST)
    return manifest


def verify(folder: Path) -> str | None:
    """None when the checkpoint is whole; otherwise what is wrong, naming the file."""
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        return f"{manifest_file} is missing (the save did not finish)"
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and files
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{manifest_file} is not a readable manifest"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{path} has {size} bytes, the manifest says {entry.get('size')} (truncated or replaced)"
        if sha256(path) != entry.get("sha256"):
            return f"{path} does not match its sha256 in the manifest (corrupted or replaced)"
    return None
