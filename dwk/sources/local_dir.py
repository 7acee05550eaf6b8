"""Local-dir source: a timm ``local-dir`` folder (``config.json`` + weights), built from its own config.

A ``file:`` whose name has no weights suffix names such a folder; ``arch`` is optional and, when
given, must agree with the folder's config.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dwk._random import torch_seeded
from dwk.errors import CheckpointError
from dwk.sources._base import Loaded, Source, files_hash, is_weight_file, resolve_file
from dwk.sources._torch import is_torchvision, load_weights_into, read_state_dict

# Weight files of a timm local-dir folder, in the order timm prefers them (timm.models._hub).
LOCAL_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_LOCAL_DIR_EXTS = (".safetensors", ".pth", ".pth.tar", ".bin")


def local_dir_files(folder: Path, ckpt_id: str) -> tuple[Path, Path]:
    """``(config.json, weights file)`` of a timm local-dir folder."""
    if not folder.is_dir():
        what = "is a file, not a folder: give it a weights suffix (.safetensors, .pth, ...)" if folder.is_file() \
            else "does not exist"
        raise CheckpointError(ckpt_id, f"folder {folder} {what}")
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(ckpt_id, f"{folder} is not a timm local-dir folder: it has no config.json")
    for name in LOCAL_DIR_FILES:
        if (folder / name).is_file():
            return config, folder / name
    for ext in _LOCAL_DIR_EXTS:
        found = sorted(p for p in folder.glob(f"*{ext}") if p.is_file())
        if found:
            return config, found[0]
    raise CheckpointError(ckpt_id, f"{folder} has a config.json but no weights file ({', '.join(LOCAL_DIR_FILES)})")


class LocalDirSource(Source):
    kind = "local-dir"

    @staticmethod
    def claims(spec) -> bool:
        return spec.file is not None and not is_weight_file(spec.file) and not is_torchvision(spec.arch)

    @property
    def folder(self) -> Path:
        return resolve_file(self.spec.file, self.spec.id)

    def fingerprint(self) -> str:
        config, weights = local_dir_files(self.folder, self.spec.id)
        return files_hash([config, weights], self.folder)

    def load(self) -> Loaded:
        import timm

        from dwk import timm_registry

        spec, folder = self.spec, self.folder
        config, weights = local_dir_files(folder, spec.id)
        try:
            cfg = json.loads(config.read_text())
            arch = cfg.get("architecture") or (cfg.get("pretrained_cfg") or {}).get("architecture")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(spec.id, f"{config} is not a timm model config ({type(e).__name__}: {e})") from e
        if spec.arch and arch and spec.arch.split(".")[0] != arch.split(".")[0]:
            raise CheckpointError(spec.id, f"{config} names architecture {arch!r} but the config says arch "
                                           f"{spec.arch!r}; drop 'arch' or fix it")
        try:
            with torch_seeded(0):  # see dwk.sources._torch.build_model
                model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=False)
        except (RuntimeError, ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(spec.id, f"timm cannot build the model of {config} ({type(e).__name__}: "
                                           f"{str(e)[:300]})") from e
        meta: dict[str, Any] = {"local_dir": str(folder), "model": arch}
        sd = read_state_dict(weights, spec.id, meta)
        model = load_weights_into(model, sd, spec.id, f"{folder.name}/{weights.name}", meta)
        meta["sha256"] = files_hash([config, weights], folder)
        pcfg = getattr(model, "pretrained_cfg", None) or {}
        if arch:
            meta["timm"] = timm_registry.checkpoint_info(f"{arch}.{pcfg['tag']}" if pcfg.get("tag") else arch, pcfg)
        return Loaded(model, None, weights, meta=meta)
