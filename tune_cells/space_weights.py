"""The best start this machine can have: a default space searches ImageNet-pretrained backbones
where their weights are cached or can be downloaded, and falls back to its from-scratch space
otherwise. Decided once, before the search, with one plain log line; never a failure.

A space opts in with `fallback: <space name>`; spaces without it (the `*-pretrained` spaces, a
user's own file) keep the strict check: a missing weights file is exit 2 naming it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from tune_cells.search_spaces import SearchSpace, builtin_space_path, load_space

log = logging.getLogger(__name__)

OFFLINE_ENV = "TUNE_CELLS_OFFLINE"  # set (tests, CI, air-gapped sites): only cached weights count
DOWNLOAD_CHECK_TIMEOUT_S = 3.0
# Parameters whose values name a network with ImageNet weights: a classifier, or a U-Net's encoder.
_ARCH_PARAMS = ("model", "encoder")


def fit_space_to_weights(space: SearchSpace) -> SearchSpace:
    """`space` as far as this machine can load its pretrained networks: values of `model` (or
    `encoder`) without obtainable weights are dropped, with the initial points that use them; when
    nothing pretrained is left, the space's fallback (from scratch)."""
    if not space.fallback or not space.may_use_pretrained:
        return space
    from tune_cells.models import has_pretrained_weights, pretrained_arch

    params = dict(space.params)
    # A U-Net's weights are its encoder's: the `encoder` values decide, not `model: unet`.
    arch_params = [name for name in _ARCH_PARAMS if not (name == "model" and "encoder" in params)]
    missing: list[str] = []
    for name in arch_params:
        values = _values(params.get(name))
        if not values:
            continue
        arch_of = {v: pretrained_arch(v) if name == "model" else pretrained_arch("unet", v) for v in values}
        usable = [v for v in values if has_pretrained_weights(arch_of[v]) and weights_obtainable(arch_of[v])]
        missing += [arch_of[v] for v in values if v not in usable and arch_of[v] not in missing]
        if not usable:
            fallback = load_space(builtin_space_path(space.fallback))
            log.info("no ImageNet weights for %s offline: searching from-scratch models (%s)",
                     ", ".join(missing), space.fallback)
            return fallback
        params[name] = _narrowed(params[name], usable)
    if not missing:
        return space
    kept = [point for point in space.initial_points
            if all(point.get(name) in _values(params.get(name)) or name not in point for name in _ARCH_PARAMS)]
    log.info("no ImageNet weights for %s offline: searching %s", ", ".join(missing),
             ", ".join(v for name in arch_params for v in _values(params.get(name))))
    return replace(space, params=params, initial_points=kept)


def weights_obtainable(arch: str) -> bool:
    """Cached in the torch hub folder, or (online) reachable at torchvision's URL."""
    from tune_cells.models import pretrained_available, weights_url

    if pretrained_available(arch):
        return True
    if os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes"):
        return False
    return _reachable(weights_url(arch))


def _reachable(url: str) -> bool:
    import urllib.request

    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=DOWNLOAD_CHECK_TIMEOUT_S) as response:
            return response.status == 200
    except Exception:  # DNS, refused, timeout, proxy: all mean "not from here, not now"
        return False


def _values(spec) -> list:
    if spec is None:
        return []
    if isinstance(spec, dict):
        return list(spec.get("choices", []))
    return [spec]


def _narrowed(spec, usable: list):
    if isinstance(spec, dict):
        return {**spec, "choices": usable} if len(usable) > 1 else usable[0]
    return spec
