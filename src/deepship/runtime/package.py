"""A model package on disk: its manifest (package.json), the hashes that protect it, the onnxruntime session.

`package.json` lists the sha256 of every other file, and carries `manifest_sha256`, the sha256 of its
own canonical JSON without that key, so neither a changed model nor a changed threshold or label list
loads silently. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from deepship.errors import PackageError

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "package.json"
MANIFEST_HASH_KEY = "manifest_sha256"
MODEL_FILE = "model.onnx"
EMBEDDINGS_OUTPUT = "embeddings"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace, UTF-8), its own hash left out:
    indentation or key order may change in transit, the content may not."""
    content = {k: v for k, v in manifest.items() if k != MANIFEST_HASH_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its `manifest_sha256`; what export writes as package.json."""
    content = json.loads(json.dumps(manifest))  # the hash covers what a reader will parse back (tuples -> lists)
    return {**content, MANIFEST_HASH_KEY: manifest_digest(content)}


def read_manifest(package_dir: Path) -> dict[str, Any]:
    """package.json, checked for a supported format version and against its own hash."""
    path = package_dir / MANIFEST
    if not path.is_file():
        raise PackageError(f"{package_dir}: no {MANIFEST}; is this a deepship model package (deepship export)?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PackageError(f"{path}: not valid JSON ({exc}); re-export the package") from None
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise PackageError(f"{path}: format_version {version!r} is not supported by this deepship "
                           f"(supports {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade deepship or re-export the package")
    verify_manifest(path, manifest)
    return manifest


def verify_manifest(path: Path, manifest: dict[str, Any]) -> None:
    recorded = manifest.get(MANIFEST_HASH_KEY)
    if recorded is None:
        # Packages exported before the manifest carried its own hash still load; nothing vouches for their
        # labels, thresholds or temperature, so say so once.
        print(f"warning: {path}: has no {MANIFEST_HASH_KEY}, so its labels and decision rule are not verified; "
              "re-export the package with this deepship", file=sys.stderr)
        return
    if recorded != manifest_digest(manifest):
        raise PackageError(f"{path}: content does not match its {MANIFEST_HASH_KEY}; the manifest (labels, "
                           "thresholds, calibration, ...) was modified or corrupted, re-export or re-copy the package")


def verify_files(package_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists must exist with the recorded sha256; the model must be listed."""
    files: dict[str, str] = manifest.get("files") or {}
    if MODEL_FILE not in files:
        raise PackageError(f"{package_dir / MANIFEST}: lists no sha256 for {MODEL_FILE}; re-export the package")
    for name, expected in sorted(files.items()):
        path = package_dir / name
        if not path.is_file():
            raise PackageError(f"{path}: missing from the package; re-export or copy the whole package folder")
        if sha256_file(path) != expected:
            raise PackageError(f"{path}: sha256 does not match {MANIFEST}; the file was modified or corrupted, "
                               "re-export or re-copy the package")


def build_session(model_path: Path, spinning: bool = True) -> "onnxruntime.InferenceSession":  # noqa: F821
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.log_severity_level = 3  # quantized models warn about every folded node otherwise
    if not spinning:
        # Idle intra-op threads spin-wait for the next call by default: lowest latency for back-to-back
        # calls, but a server's event loop then competes with them for the cores between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad models
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PackageError(f"{model_path}: onnxruntime cannot load it ({message[:300]}); re-export the package") from None
