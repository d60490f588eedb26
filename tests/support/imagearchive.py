"""A `docker save` archive made on the control node without Docker: one layer holding one file,
in the archive format `docker load` reads (manifest.json, the image config, the layer tar).
It stands in for the multi-GB vLLM image an air-gapped site ships."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    archive.addfile(info, io.BytesIO(data))


def write_image_archive(path: Path, tag: str, content: str = "glmfleet test image\n") -> str:
    """Write the archive; returns the image id that `docker load` will give the image."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as layer_tar:
        add(layer_tar, "glmfleet-test-image.txt", content.encode())
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/bin/false"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "glmfleet tests"}],
        },
        sort_keys=True,
    ).encode()
    config_digest = hashlib.sha256(config).hexdigest()
    layer_dir = hashlib.sha256(layer_bytes).hexdigest()
    manifest = json.dumps(
        [{"Config": f"{config_digest}.json", "RepoTags": [tag], "Layers": [f"{layer_dir}/layer.tar"]}]
    )
    with tarfile.open(path, "w") as archive:
        add(archive, f"{layer_dir}/layer.tar", layer_bytes)
        add(archive, f"{config_digest}.json", config)
        add(archive, "manifest.json", manifest.encode())
    return f"sha256:{config_digest}"
