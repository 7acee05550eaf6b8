"""Turn a checkpoint spec into weights: a torch model, or kernels read without one (the only module that knows how).

Sources (``CheckpointSpec.source``):
- ``hub``: timm pretrained weights ``arch.tag``, fetched through the Hugging Face Hub cache by
  :mod:`dwk.hub` (bounded, retried, resumable; ``HF_HUB_OFFLINE=1`` uses the cache only) and read
  like a local file. Offline and not cached it fails with :class:`CheckpointError` saying how to
  use a local file instead.
- ``file``: a timm architecture plus a local ``.safetensors`` or ``.pth/.pt/.bin`` file. Pickle files
  are read with ``torch.load(weights_only=True)`` only: a pickle that would run code is refused.
  Wrapped checkpoints (``state_dict``, ``model_ema``, ``model``, ... and ``module.`` /
  ``_orig_mod.`` prefixes) are unwrapped; weights in another layout (the original ConvNeXt
  releases) go through the timm model's own key-remapping (``checkpoint_filter_fn``); a classifier
  of another size (an ImageNet-22k head) is dropped, since dwk only needs the depthwise convs.
- ``local-dir``: a timm ``local-dir`` folder (``config.json`` + weights), built from its config.
- ``weights``: a safetensors file without ``arch``: depthwise kernels by tensor shape, streamed,
  no model built (:mod:`dwk.weights_file`).
- ``onnx``: the depthwise Conv nodes of an ONNX model (:mod:`dwk.onnx_source`).
- ``random``: random initialisation, seeded (the null control).
- ``planted``: a planted-structure checkpoint (METHOD 2.7) that dwk writes as a real safetensors file
  with its labels beside it, then loads like any local file.

Every failure a user can cause (unknown model, corrupt, truncated or mismatching file, a file that
is not a checkpoint) is a :class:`CheckpointError` naming the checkpoint and what to do; the flow
records it and goes on with the others. Each checkpoint's content hash (:func:`fingerprint`: the
file's sha256, or over all files of a folder / ONNX model with external data) goes to the store.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dwk._random import torch_seeded
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
    """What a source gives: a torch model, or (model-free sources) the extracted kernels directly.

    ``meta`` is per-checkpoint metadata for the store: content hash, timm pretrained config and
    tag, Hub location, how the file was unwrapped or remapped.
    """

    model: object | None
    labels: dict[str, np.ndarray] | None = None
    path: Path | None = None
    extracted: Any = None  # extract.Extracted for the weights-only and ONNX sources
    meta: dict[str, Any] = field(default_factory=dict)


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


def _create(spec: CheckpointSpec, *, seed: int = 0, **kwargs):
    """Build ``spec``'s timm model with its random initialisation seeded by ``seed``.

    Every construction holds the lock of :func:`dwk._random.torch_seeded`, also when weights are
    loaded over the random ones afterwards: an unseeded construction in one extraction thread draws
    from torch's global RNG while another thread builds a seeded (random-init or planted) model, and
    that model then differs between runs. (Found in a fresh clone: a planted MobileNet's non-planted
    weights changed between two extractions.) timm's URL-only fallback downloads inside the lock;
    the Hub path downloads before it.
    """
    import timm

    try:
        with torch_seeded(seed):
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
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    from dwk.planted import plant_model

    weights, labels_path = planted_paths(spec, data_dir)
    if weights.exists() and labels_path.exists():
        return weights, labels_path
    data_dir.mkdir(parents=True, exist_ok=True)
    model = _create(spec, seed=spec.planted.seed, pretrained=False)
    labels = plant_model(model, seed=spec.planted.seed, noise_share=spec.planted.noise_share, snr=spec.planted.snr)
    # Write to temporary names first: an interrupted write never leaves a half file under the real name.
    tmp_w, tmp_l = weights.with_suffix(".tmp"), labels_path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_w), metadata={"dwk": "planted"})
    save_np({k: v for k, v in labels.items()}, str(tmp_l))
    tmp_w.replace(weights)
    tmp_l.replace(labels_path)
    logger.info("wrote planted checkpoint %s (%d depthwise layers)", weights, len(labels))
    return weights, labels_path


# Keys under which checkpoints commonly wrap their weights, in the order they are tried.
WRAPPER_KEYS = ("state_dict", "model_ema", "state_dict_ema", "model", "module")
# Key prefixes of wrapped modules: DistributedDataParallel, torch.compile.
PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: Path, ckpt_id: str, info: dict[str, Any] | None = None) -> dict:
    """Read a weights file safely: safetensors, or a pickle with ``weights_only=True``.

    Wrappers and prefixes are taken apart; ``info`` (when given) records which (``wrapper``,
    ``prefix``) and the file ``format``.
    """
    import torch

    if not path.exists():
        raise CheckpointError(ckpt_id, f"weights file {path} does not exist")
    if path.is_dir():
        raise CheckpointError(ckpt_id, f"{path} is a folder, not a weights file")
    info = {} if info is None else info
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
            info["format"] = "safetensors"
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            info["format"] = "pickle (weights_only)"
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt or foreign file
        raise CheckpointError(
            ckpt_id, f"cannot read {path.name} as a checkpoint ({type(e).__name__}: {str(e)[:300]}); "
            "the file is truncated, corrupt, not a checkpoint, or a pickle that needs code to load "
            "(refused: dwk loads pickles with weights_only=True only)"
        ) from e
    # Checkpoints often wrap the weights, sometimes twice ({"model": {"state_dict": ...}}).
    wrappers = []
    for _ in range(3):
        key = next((k for k in WRAPPER_KEYS if isinstance(sd, dict) and isinstance(sd.get(k), dict)), None)
        if key is None:
            break
        wrappers.append(key)
        sd = sd[key]
    if wrappers:
        info["wrapper"] = ".".join(wrappers)
    if isinstance(sd, dict):
        sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(ckpt_id, f"{path.name} holds no state dict of tensors: not a checkpoint")
    stripped = []
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped.append(p)
                changed = True
    if stripped:
        info["prefix"] = "".join(stripped)
    return sd


def _compare(model, sd: dict) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and shape mismatches of ``sd`` against ``model``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    return missing, unexpected, mismatched


def _describe(problems: tuple[list[str], list[str], list[str]]) -> str:
    missing, unexpected, mismatched = problems
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
        if items:
            parts.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
    return "; ".join(parts)


def _classifier_prefixes(model) -> tuple[str, ...]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not cls:
        return ()
    return tuple(f"{c}." for c in ((cls,) if isinstance(cls, str) else cls))


def _timm_filter_fn(model):
    """The key-remapping function timm uses when it loads weights for this model's family, if any."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def load_weights_into(model, sd: dict, ckpt_id: str, what: str, info: dict[str, Any] | None = None):
    """Load ``sd`` into ``model`` exactly; returns the model (possibly without its classifier).

    Tried in order: the keys as they are; the model family's timm key-remapping (original
    releases such as Facebook's ConvNeXt checkpoints). When only the classifier differs (another
    number of classes, or none), it is dropped from both sides: the depthwise convs are all that
    dwk reads. Anything else is a ``CheckpointError`` saying what does not match.
    """
    info = {} if info is None else info
    candidates: list[tuple[str, Any]] = [("as is", sd)]
    fn = _timm_filter_fn(model)
    if fn is not None:
        candidates.append(("timm key-remapping", fn))
    first_problems = None
    cls = _classifier_prefixes(model)
    for how, cand in candidates:
        if callable(cand):
            try:
                cand = cand(dict(sd), model)
            except Exception as e:  # noqa: BLE001 - a filter that cannot read these keys: not this layout
                logger.debug("%s: %s failed: %s: %s", ckpt_id, how, type(e).__name__, e)
                continue
            if not isinstance(cand, dict):
                continue
        problems = _compare(model, cand)
        first_problems = first_problems or problems
        if not any(problems):
            model.load_state_dict(cand, strict=True)
            info["remapped"] = how != "as is"
            return model
        keys = [p.split(":")[0] for group in problems for p in group]
        if cls and keys and all(k.startswith(cls) for k in keys) and hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
            cand = {k: v for k, v in cand.items() if not k.startswith(cls)}
            if not any(_compare(model, cand)):
                model.load_state_dict(cand, strict=True)
                info["remapped"] = how != "as is"
                info["classifier_dropped"] = True
                logger.info("%s: classifier of another size dropped (%s)", ckpt_id, _describe(problems))
                return model
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    raise CheckpointError(
        ckpt_id, f"{what} does not match architecture {arch!r}: {_describe(first_problems)} (check 'arch' in the config)"
    )


def _files_hash(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


# Weight files of a timm local-dir folder, in the order timm prefers them (timm.models._hub).
LOCAL_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_LOCAL_DIR_EXTS = (".safetensors", ".pth", ".pth.tar", ".bin")


def local_dir_files(folder: Path, ckpt_id: str) -> tuple[Path, Path]:
    """``(config.json, weights file)`` of a timm local-dir folder."""
    if not folder.is_dir():
        raise CheckpointError(ckpt_id, f"folder {folder} does not exist")
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


def fingerprint(spec: CheckpointSpec, data_dir: Path) -> str:
    """A content hash of where the weights come from, known without building the model.

    Files are hashed byte for byte (a changed file is re-extracted): a weights file, a local-dir
    folder's config and weights, an ONNX model with its external data. Random and Hub weights are
    identified by name, seed and the timm/torch versions that make them (the downloaded file's
    sha256 is recorded beside it once it is there).
    """
    src = spec.source
    if src == "random":
        return _versions_hash("random", spec.model_name, spec.seed)
    if src == "hub":
        return _versions_hash("hub", spec.model_name)
    if src == "local-dir":
        config, weights = local_dir_files(Path(spec.file), spec.id)
        return _files_hash([config, weights], Path(spec.file))
    if src == "onnx":
        from dwk.onnx_source import OnnxSourceError, content_hash

        path = Path(spec.onnx)
        if not path.is_file():
            raise CheckpointError(spec.id, f"ONNX file {path} does not exist")
        try:
            return content_hash(path)
        except OnnxSourceError as e:
            raise CheckpointError(spec.id, str(e)) from e
    if src == "planted" and not spec.arch:
        return _versions_hash("population", spec.planted.model_dump_json())
    path = write_planted(spec, data_dir)[0] if src == "planted" else Path(spec.file)
    if not path.is_file():
        raise CheckpointError(spec.id, f"weights file {path} does not exist")
    return sha256_file(path)


def _timm_info(name: str) -> dict[str, Any] | None:
    """timm's pretrained config and tag metadata when ``name`` carries a tag (``arch.tag``)."""
    if "." not in name:
        return None
    from dwk import hub

    try:
        return hub.checkpoint_info(name)
    except (CheckpointError, RuntimeError) as e:
        logger.debug("no pretrained metadata for %s: %s", name, e)
        return None


def load(spec: CheckpointSpec, data_dir: Path) -> Loaded:
    """Build the model of ``spec`` with its weights, or read its kernels directly (weights-only, ONNX).

    ``data_dir`` holds files dwk writes (planted).
    """

    src = spec.source
    if src == "random":
        return Loaded(_create(spec, seed=spec.seed, pretrained=False))
    if src == "hub":
        return _load_hub(spec)
    if src == "weights":
        return _load_weights_only(spec)
    if src == "onnx":
        return _load_onnx(spec)
    if src == "local-dir":
        return _load_local_dir(spec)
    labels = None
    if src == "planted" and not spec.arch:
        return _planted_population(spec)
    if src == "planted":
        path, labels_path = write_planted(spec, data_dir)
        from safetensors.numpy import load_file as load_np

        labels = load_np(str(labels_path))
    else:
        path = Path(spec.file)
    meta: dict[str, Any] = {}
    sd = read_state_dict(path, spec.id, meta)
    model = load_weights_into(_create(spec, pretrained=False), sd, spec.id, path.name, meta)
    meta["sha256"] = sha256_file(path)
    info = _timm_info(spec.model_name)
    if info:
        meta["timm"] = info
    return Loaded(model, labels, path, meta=meta)


def _planted_population(spec: CheckpointSpec) -> Loaded:
    """A bare planted population as one pseudo-layer (no model, no file)."""
    from dwk.extract import Extracted, Layer, shape_key
    from dwk.planted import planted_population

    p = spec.planted
    kernels, labels = planted_population(p.n, p.shape, noise_share=p.noise_share, snr=p.snr, seed=p.seed)
    key = shape_key(*p.shape)
    layer = Layer(layer_index=0, module="planted-population", shape=key, stride=None, dilation=(1, 1), padding=None,
                  in_channels=None, out_channels=p.n, multiplier=None, depth=0.0)
    ex = Extracted(layers=[layer], kernels={key: kernels}, layer={key: np.zeros(p.n, np.int32)},
                   channel={key: np.arange(p.n, dtype=np.int32)}, labels={key: labels})
    return Loaded(None, extracted=ex, meta=dict(population=p.model_dump(mode="json")))


def _load_local_dir(spec: CheckpointSpec) -> Loaded:
    import timm

    folder = Path(spec.file)
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
        with torch_seeded(0):  # see _create
            model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=False)
    except (RuntimeError, ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise CheckpointError(spec.id, f"timm cannot build the model of {config} ({type(e).__name__}: "
                                       f"{str(e)[:300]})") from e
    meta: dict[str, Any] = {"local_dir": str(folder), "model": arch}
    sd = read_state_dict(weights, spec.id, meta)
    model = load_weights_into(model, sd, spec.id, f"{folder.name}/{weights.name}", meta)
    meta["sha256"] = _files_hash([config, weights], folder)
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    if arch:
        from dwk import hub

        meta["timm"] = hub.checkpoint_info(f"{arch}.{pcfg['tag']}" if pcfg.get("tag") else arch, pcfg)
    return Loaded(model, None, weights, meta=meta)


def _load_weights_only(spec: CheckpointSpec) -> Loaded:
    from dwk.extract import NoDepthwiseError
    from dwk.weights_file import extract_safetensors

    path = Path(spec.file)
    if not path.is_file():
        raise CheckpointError(spec.id, f"weights file {path} does not exist")
    try:
        extracted = extract_safetensors(path)
    except NoDepthwiseError as e:
        raise CheckpointError(spec.id, str(e)) from e
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a corrupt or foreign file
        raise CheckpointError(
            spec.id, f"cannot read {path.name} as a safetensors checkpoint ({type(e).__name__}: {str(e)[:300]}); "
            "the file is truncated, corrupt or not a checkpoint"
        ) from e
    return Loaded(None, None, path, extracted=extracted,
                  meta=dict(format="safetensors (weights-only)", sha256=sha256_file(path)))


def _load_onnx(spec: CheckpointSpec) -> Loaded:
    from dwk.extract import NoDepthwiseError
    from dwk.onnx_source import OnnxSourceError, content_hash, extract_onnx

    path = Path(spec.onnx)
    if not path.is_file():
        raise CheckpointError(spec.id, f"ONNX file {path} does not exist")
    try:
        extracted = extract_onnx(path)
        digest = content_hash(path)
    except (OnnxSourceError, NoDepthwiseError) as e:
        raise CheckpointError(spec.id, str(e)) from e
    return Loaded(None, None, path, extracted=extracted, meta=dict(format="onnx", sha256=digest))


def _load_hub(spec: CheckpointSpec) -> Loaded:
    from dwk import hub

    name = spec.model_name
    cfg = hub.pretrained_cfg(name, spec.id)
    if cfg.hf_hub_id and not cfg.custom_load:
        f = hub.download(name, spec.id, cfg=cfg)
        meta: dict[str, Any] = {}
        sd = read_state_dict(f.path, spec.id, meta)
        model = load_weights_into(_create(spec, pretrained=False), sd, spec.id, f"{f.repo_id}/{f.filename}", meta)
        meta.update(sha256=sha256_file(f.path), hub=f.to_dict(), timm=hub.checkpoint_info(name, cfg))
        return Loaded(model, None, f.path, meta=meta)
    # No Hub copy (URL-only or custom formats): timm's own loader, torch.hub cache, weights_only=True.
    try:
        model = _create(spec, pretrained=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - the download stack raises many types for one cause
        text = f"{type(e).__name__}: {e}"
        if any(s in text for s in ("ConnectionError", "ConnectError", "offline", "resolve", "Max retries",
                                   "HTTPSConnection", "Network", "URLError")):
            raise CheckpointError(
                spec.id,
                "pretrained weights could not be downloaded: the Hub is unreachable from here "
                f"({text[:200]}). Download the weights where it is reachable and use a local file: "
                f"`- id: {spec.id}` -> `- {{id: {spec.id}, arch: {name.split('.')[0]}, file: PATH.safetensors}}`",
            ) from e
        raise
    return Loaded(model, meta=dict(timm=hub.checkpoint_info(name, cfg)))
