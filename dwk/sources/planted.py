"""Planted source: depthwise weights drawn from the planted population of METHOD 2.7 (known labels).

- ``arch`` + ``planted``: the depthwise convs of a real architecture (timm or ``torchvision:NAME``)
  get planted kernels; dwk writes the model as a real safetensors file with its labels beside it
  (under the run's data folder) and reads it back like any local file.
- ``planted: {shape, n}`` without ``arch``: a bare population of ``n`` kernels (one pseudo-layer),
  the standard population of METHOD 2.7 when ``{shape: [7, 7], n: 20000, noise_share: 0.2}``.

These are the method's checks: the run reports how well the planted classes are recovered.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dwk.sources._base import Loaded, Source, sha256_file, versions_hash
from dwk.sources._torch import build_model, load_weights_into, read_state_dict

logger = logging.getLogger(__name__)


def planted_paths(spec, data_dir: Path) -> tuple[Path, Path]:
    """Where a planted checkpoint's weights and labels live (deterministic from its spec)."""
    p = spec.planted
    arch = spec.arch.replace(":", "-")
    stem = f"{arch}-planted-s{p.seed}-n{p.noise_share:g}-snr{p.snr:g}"
    return data_dir / f"{stem}.safetensors", data_dir / f"{stem}.labels.safetensors"


def write_planted(spec, data_dir: Path) -> tuple[Path, Path]:
    """Write a planted checkpoint (weights + labels) unless it already exists; return both paths."""
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    from dwk.planted import plant_model

    weights, labels_path = planted_paths(spec, data_dir)
    if weights.exists() and labels_path.exists():
        return weights, labels_path
    data_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(spec.arch, spec.id, seed=spec.planted.seed, pretrained=False)
    labels = plant_model(model, seed=spec.planted.seed, noise_share=spec.planted.noise_share, snr=spec.planted.snr)
    # Write to temporary names first: an interrupted write never leaves a half file under the real name.
    tmp_w, tmp_l = weights.with_suffix(".tmp"), labels_path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_w), metadata={"dwk": "planted"})
    save_np({k: v for k, v in labels.items()}, str(tmp_l))
    tmp_w.replace(weights)
    tmp_l.replace(labels_path)
    logger.info("wrote planted checkpoint %s (%d depthwise layers)", weights, len(labels))
    return weights, labels_path


class PlantedSource(Source):
    kind = "planted"

    @staticmethod
    def claims(spec) -> bool:
        return spec.planted is not None

    @property
    def builds_model(self) -> bool:  # type: ignore[override]
        return bool(self.spec.arch)

    def fingerprint(self) -> str:
        # Planted weights are a function of the spec (and of the timm/torch versions that build the
        # architecture), so the fingerprint is known without writing the file.
        what = "planted" if self.spec.arch else "population"
        return versions_hash(what, self.spec.arch, self.spec.planted.model_dump_json())

    def load(self) -> Loaded:
        spec = self.spec
        if not spec.arch:
            return self._population()
        if self.data_dir is None:
            raise ValueError("a planted checkpoint needs a data folder to write its weights into")
        path, labels_path = write_planted(spec, self.data_dir)
        from safetensors.numpy import load_file as load_np

        meta: dict = {}
        sd = read_state_dict(path, spec.id, meta)
        model = load_weights_into(build_model(spec.arch, spec.id, pretrained=False), sd, spec.id, path.name, meta)
        meta["sha256"] = sha256_file(path)
        return Loaded(model, load_np(str(labels_path)), path, meta=meta)

    def _population(self) -> Loaded:
        """A bare planted population as one pseudo-layer (no model, no file)."""
        from dwk.extract import Extracted, Layer, shape_key
        from dwk.planted import planted_population

        p = self.spec.planted
        kernels, labels = planted_population(p.n, p.shape, noise_share=p.noise_share, snr=p.snr, seed=p.seed)
        key = shape_key(*p.shape)
        layer = Layer(layer_index=0, module="planted-population", shape=key, stride=None, dilation=(1, 1),
                      padding=None, in_channels=None, out_channels=p.n, multiplier=None, depth=0.0)
        ex = Extracted(layers=[layer], kernels={key: kernels}, layer={key: np.zeros(p.n, np.int32)},
                       channel={key: np.arange(p.n, dtype=np.int32)}, labels={key: labels})
        return Loaded(None, extracted=ex, meta=dict(population=p.model_dump(mode="json")))
