"""timm's registry of pretrained checkpoints: selection by pattern, and what a name says about its weights.

**Selection.** A config entry ``{pattern: "convnextv2_*.fcmae_ft_*"}`` (or ``{module: convnext}``
for a whole timm module) expands, through timm's own registry (``timm.list_models(pretrained=True)``),
into one ``{id: arch.tag}`` entry per matching pretrained checkpoint. ``dwk.config.load_config`` does
this before any flow sees the config, so each concrete checkpoint is one mapped task.
``dwk sources PATTERN`` previews it.

**Metadata.** :func:`checkpoint_info` reads timm's pretrained config (license, input size, classes,
where the weights come from) and parses the tag: ``fb_in22k_ft_in1k_384`` means pre-trained on
ImageNet-22k, fine-tuned on ImageNet-1k, at 384 px. It goes into the store's per-checkpoint record.

A leaf beside ``dwk.config`` and ``dwk.sources``: it imports neither.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dwk.errors import CheckpointError

if TYPE_CHECKING:
    from dwk.config import CheckpointPattern

logger = logging.getLogger(__name__)

# Dataset names that appear in timm pretrained tags (anything else in a tag is a recipe or source name).
DATASETS = frozenset({
    "in1k", "in12k", "in21k", "in22k", "inw21k", "jft", "jft300m", "ig1b", "yfcc15m", "yfcc100m", "cc12m",
    "laion2b", "laion400m", "laiona", "openai", "datacomp1b", "datacompxl", "dfn2b", "dfn5b", "webli", "lvd142m",
    "lvd1689m", "merged2b", "m30m", "m38m", "sa1b", "sat493m",
})


# ----------------------------------------------------------------------------- selection
def expand(pattern: CheckpointPattern) -> list[str]:
    """The ``arch.tag`` names of timm's pretrained checkpoints that a pattern entry selects, sorted naturally.

    A filter without a tag part (``convnext_atto``) matches every tag of that architecture, as in
    ``timm.list_models``.
    """
    import timm

    names = timm.list_models(filter=list(pattern.patterns), module=list(pattern.modules), pretrained=True,
                             exclude_filters=list(pattern.exclude))
    if not names:
        where = f" in timm module(s) {list(pattern.modules)}" if pattern.modules else ""
        raise ValueError(f"pattern {list(pattern.patterns)}{where} matches no pretrained timm checkpoint "
                         f"(timm {timm.__version__}); try `dwk sources PATTERN` to preview")
    if len(names) > pattern.max_checkpoints:
        raise ValueError(f"pattern {list(pattern.patterns)} matches {len(names)} pretrained checkpoints, more than "
                         f"max_checkpoints={pattern.max_checkpoints}: narrow it (or raise max_checkpoints)")
    return names


# ----------------------------------------------------------------------------- metadata
def parse_tag(tag: str | None) -> dict[str, Any]:
    """What a timm pretrained tag says about training data and resolution.

    ``fb_in22k_ft_in1k_384`` -> pretrain ``[in22k]``, finetune ``[in1k]``, resolution 384, recipe
    ``[fb]``. Datasets before ``ft`` are pre-training data, after it fine-tuning data; without
    ``ft`` the first dataset is the training data and later ones fine-tuning stages. Self-supervised
    recipes (``fcmae``, ``mae``, ``clip``) name no dataset: their pre-training data stays unknown.
    """
    toks = (tag or "").split("_") if tag else []
    resolution = None
    if toks and toks[-1].isdigit():
        resolution = int(toks.pop())
    for t in toks:
        if resolution is None and re.fullmatch(r"r\d{3,4}", t):
            resolution = int(t[1:])
    if "ft" in toks:
        i = toks.index("ft")
        pre, post = toks[:i], toks[i + 1:]
        pretrain = [t for t in pre if t in DATASETS]
        finetune = [t for t in post if t in DATASETS]
    else:
        data = [t for t in toks if t in DATASETS]
        pretrain, finetune = data[:1], data[1:]
    recipe = [t for t in toks if t not in DATASETS and t != "ft" and not re.fullmatch(r"[re]\d+", t)]
    return dict(pretrain_data=pretrain, finetune_data=finetune, data=">".join(pretrain + finetune) or None,
                resolution=resolution, recipe=recipe)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def pretrained_cfg(name: str, ckpt_id: str | None = None):
    """timm's PretrainedCfg of ``arch.tag``; a CheckpointError when timm has no such model or tag."""
    import timm
    from timm.models import get_pretrained_cfg

    ckpt_id = ckpt_id or name
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:8]}*")[:5]
        raise CheckpointError(ckpt_id, f"timm has no model {arch!r}" + (f"; similar names: {close}" if close else ""))
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        tags = [n.split(".", 1)[1] for n in timm.list_models(arch, pretrained=True)]
        raise CheckpointError(ckpt_id, f"timm has no pretrained tag {name!r}; tags of {arch}: {tags[:12]}") from None
    if cfg is None:
        raise CheckpointError(ckpt_id, f"timm has no pretrained weights for {name!r}")
    return cfg


def checkpoint_info(name: str, cfg=None) -> dict[str, Any]:
    """Per-checkpoint metadata from timm's pretrained config and the tag (JSON-ready)."""
    cfg = cfg if cfg is not None else pretrained_cfg(name)
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    tag = d.get("tag") or (name.split(".", 1)[1] if "." in name else None)
    info = dict(name=name, architecture=d.get("architecture") or name.split(".", 1)[0], tag=tag, **parse_tag(tag))
    if info["resolution"] is None and d.get("input_size"):
        info["resolution"] = int(d["input_size"][-1])
    for k in ("license", "num_classes", "input_size", "test_input_size", "crop_pct", "hf_hub_id", "url",
              "origin_url", "paper_ids", "paper_name"):
        if d.get(k) is not None:
            info[k] = _jsonable(d[k])
    return info


def describe(names: list[str]) -> tuple[list[dict], dict[str, Any]]:
    """Rows of :func:`checkpoint_info` for a list of names, and counts by architecture and training data."""
    rows = [checkpoint_info(n) for n in names]
    summary = dict(
        n_checkpoints=len(rows), n_architectures=len({r["architecture"] for r in rows}),
        data=dict(Counter(r["data"] or "unknown" for r in rows).most_common()),
        licenses=dict(Counter(r.get("license") or "unknown" for r in rows).most_common()),
    )
    return rows, summary
