"""Random source: an architecture (timm, or ``torchvision:NAME``) randomly initialised with ``seed``.

The null control of METHOD 2.7: it never shapes the clusters; its kernels are assigned to the
clusters the trained checkpoints define and must be classified far less often.
"""
from __future__ import annotations

from dwk.sources._base import Loaded, Source, versions_hash
from dwk.sources._torch import build_model


class RandomSource(Source):
    kind = "random"
    control = True

    @staticmethod
    def claims(spec) -> bool:
        return not spec.pretrained and spec.file is None and spec.onnx is None and spec.planted is None

    def fingerprint(self) -> str:
        return versions_hash("random", self.spec.model_name, self.spec.seed)

    def load(self) -> Loaded:
        return Loaded(build_model(self.spec.model_name, self.spec.id, seed=self.spec.seed, pretrained=False))
