"""File source: a timm architecture (``arch``) plus a local weights file (``file``).

``.safetensors`` or ``.pth/.pt/.bin/.ckpt``; pickles are read with ``torch.load(weights_only=True)``
only. Wrapped checkpoints (``state_dict``, ``model_ema``, ``model``, ... and ``module.`` /
``_orig_mod.`` prefixes) are unwrapped; weights in another layout (the original ConvNeXt releases)
go through the timm model's own key-remapping (``checkpoint_filter_fn``); a classifier of another
size (an ImageNet-22k head) is dropped, since dwk only needs the depthwise convs. ``file`` may be
``pkg://PACKAGE/PATH``, a file inside an installed package.
"""
from __future__ import annotations

from typing import Any

from dwk.sources._base import Loaded, Source, existing_file, is_weight_file, package_meta, sha256_file
from dwk.sources._torch import build_model, is_torchvision, load_weights_into, read_state_dict, timm_info


def load_file_into_arch(spec, arch: str) -> Loaded:
    """Build ``arch`` and load ``spec.file`` into it exactly (shared with the torchvision source)."""
    path = existing_file(spec.file, spec.id)
    meta: dict[str, Any] = {}
    sd = read_state_dict(path, spec.id, meta)
    model = load_weights_into(build_model(arch, spec.id, pretrained=False), sd, spec.id, path.name, meta)
    meta["sha256"] = sha256_file(path)
    if pkg := package_meta(spec.file):
        meta["package"] = pkg
    return Loaded(model, None, path, meta=meta)


class FileSource(Source):
    kind = "file"

    @staticmethod
    def claims(spec) -> bool:
        return spec.file is not None and bool(spec.arch) and not is_torchvision(spec.arch) \
            and is_weight_file(spec.file)

    def fingerprint(self) -> str:
        return sha256_file(existing_file(self.spec.file, self.spec.id))

    def load(self) -> Loaded:
        loaded = load_file_into_arch(self.spec, self.spec.model_name)
        if info := timm_info(self.spec.model_name):
            loaded.meta["timm"] = info
        return loaded
