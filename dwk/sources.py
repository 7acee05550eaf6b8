"""Turn a checkpoint spec into a torch model with its weights (the only module that knows how).

Sources (``CheckpointSpec.source``):
- ``hub``: ``timm.create_model(id, pretrained=True)`` downloads from the Hugging Face Hub. Offline it
  fails with :class:`CheckpointError` saying how to use a local file instead.
- ``file``: a timm architecture plus a local ``.safetensors`` or ``.pth/.pt/.bin`` file. Pickle files
  are read with ``torch.load(weights_only=True)`` only: a pickle that would run code is refused.
- ``random``: random initialisation, seeded (the null control).
- ``planted``: a planted-structure checkpoint (METHOD 2.7) that dwk writes as a real safetensors file
  with its labels beside it, then loads like any local file.

Every failure a user can cause (unknown model, corrupt or mismatching file) is a
:class:`CheckpointError` naming the checkpoint and what to do; the flow records it and goes on.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dwk.config import CheckpointSpec

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded for a reason retrying will not fix."""

    def __init__(self, ckpt_id: str, reason: str):
        super().__init__(f"checkpoint {ckpt_id!r}: {reason}")
        self.ckpt_id = ckpt_id
        self.reason = reason


@dataclass
class Loaded:
    model: object
    labels: dict[str, np.ndarray] | None = None
    path: Path | None = None


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _versions_hash(*parts: object) -> str:
    import timm
    import torch

    payload = json.dumps([*map(str, parts), timm.__version__, torch.__version__])
    return hashlib.sha256(payload.encode()).hexdigest()


def _create(spec: CheckpointSpec, **kwargs):
    import timm

    try:
        return timm.create_model(spec.model_name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = timm.list_models(f"*{spec.model_name.split('.')[0][:8]}*")[:5]
            raise CheckpointError(
                spec.id, f"timm has no model {spec.model_name!r}" + (f"; similar names: {close}" if close else "")
            ) from None
        raise


def planted_paths(spec: CheckpointSpec, data_dir: Path) -> tuple[Path, Path]:
    """Where a planted checkpoint's weights and labels live (deterministic from its spec)."""
    assert spec.planted is not None
    p = spec.planted
    stem = f"{spec.arch}-planted-s{p.seed}-n{p.noise_share:g}-snr{p.snr:g}"
    return data_dir / f"{stem}.safetensors", data_dir / f"{stem}.labels.safetensors"


def write_planted(spec: CheckpointSpec, data_dir: Path) -> tuple[Path, Path]:
    """Write a planted checkpoint (weights + labels) unless it already exists; return both paths."""
    import torch
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    from dwk.planted import plant_model

    weights, labels_path = planted_paths(spec, data_dir)
    if weights.exists() and labels_path.exists():
        return weights, labels_path
    data_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.planted.seed)
    model = _create(spec, pretrained=False)
    labels = plant_model(model, seed=spec.planted.seed, noise_share=spec.planted.noise_share, snr=spec.planted.snr)
    # Write to temporary names first: an interrupted write never leaves a half file under the real name.
    tmp_w, tmp_l = weights.with_suffix(".tmp"), labels_path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_w), metadata={"dwk": "planted"})
    save_np({k: v for k, v in labels.items()}, str(tmp_l))
    tmp_w.replace(weights)
    tmp_l.replace(labels_path)
    logger.info("wrote planted checkpoint %s (%d depthwise layers)", weights, len(labels))
    return weights, labels_path


def read_state_dict(path: Path, ckpt_id: str) -> dict:
    """Read a weights file safely: safetensors, or a pickle with ``weights_only=True``."""
    import torch

    if not path.exists():
        raise CheckpointError(ckpt_id, f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt or foreign file
        raise CheckpointError(
            ckpt_id, f"cannot read {path.name} as a checkpoint ({type(e).__name__}: {str(e)[:300]}); "
            "the file is truncated, corrupt, not a checkpoint, or a pickle that needs code to load "
            "(refused: dwk loads pickles with weights_only=True only)"
        ) from e
    # Checkpoints often wrap the weights; take the common wrappers apart.
    for key in ("state_dict", "model_ema", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(ckpt_id, f"{path.name} holds no state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def fingerprint(spec: CheckpointSpec, data_dir: Path) -> str:
    """A content hash of where the weights come from, known without building the model.

    Files are hashed byte for byte (a changed file is re-extracted); random and Hub weights are
    identified by name, seed and the timm/torch versions that make them.
    """
    src = spec.source
    if src == "random":
        return _versions_hash("random", spec.model_name, spec.seed)
    if src == "hub":
        return _versions_hash("hub", spec.model_name)
    path = write_planted(spec, data_dir)[0] if src == "planted" else Path(spec.file)
    if not path.exists():
        raise CheckpointError(spec.id, f"weights file {path} does not exist")
    return sha256_file(path)


def load(spec: CheckpointSpec, data_dir: Path) -> Loaded:
    """Build the model of ``spec`` with its weights. ``data_dir`` holds files dwk writes (planted)."""
    import torch

    src = spec.source
    if src == "random":
        torch.manual_seed(spec.seed)
        return Loaded(_create(spec, pretrained=False))
    if src == "hub":
        return _load_hub(spec)
    labels = None
    if src == "planted":
        path, labels_path = write_planted(spec, data_dir)
        from safetensors.numpy import load_file as load_np

        labels = load_np(str(labels_path))
    else:
        path = Path(spec.file)
    sd = read_state_dict(path, spec.id)
    model = _create(spec, pretrained=False)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            spec.id, f"{path.name} does not match architecture {spec.model_name!r}: {str(e).splitlines()[0][:300]}"
            " (check 'arch' in the config)"
        ) from None
    return Loaded(model, labels, path)


def _load_hub(spec: CheckpointSpec) -> Loaded:
    try:
        model = _create(spec, pretrained=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - the Hub client raises many types for one cause
        text = f"{type(e).__name__}: {e}"
        if any(s in text for s in ("LocalEntryNotFound", "ConnectionError", "ConnectError", "offline", "resolve", "Max retries", "HTTPSConnection", "Network")):
            raise CheckpointError(
                spec.id,
                "pretrained weights could not be downloaded: the Hugging Face Hub is unreachable from here "
                f"({text[:200]}). Download the weights where the Hub is reachable and use a local file: "
                f"`- id: {spec.id}` -> `- {{id: {spec.id}, arch: {spec.model_name.split('.')[0]}, file: PATH.safetensors}}`",
            ) from e
        raise
    return Loaded(model)
