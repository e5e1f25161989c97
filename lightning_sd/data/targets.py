"""`_target_` strings of the data config (a user's verifier or row formatter) resolved to functions."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial
from typing import Any

from lightning_sd.data.records import DataError


def import_function(spec: dict, key: str) -> Callable[..., Any]:
    """The function named by `spec["_target_"]` ('package.module.function'), with the spec's other entries bound
    as keyword options. Raises `DataError` naming `key` when it cannot be imported or is not callable."""
    target = spec.get("_target_")
    if not isinstance(target, str) or "." not in target:
        raise DataError(f"{key}._target_={target!r} must name a function as 'package.module.function'")
    module_name, attr = target.rsplit(".", 1)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise DataError(f"{key}._target_={target!r}: cannot import it ({err}); make sure the module is importable "
                        "from the folder train.py runs in (or on PYTHONPATH)") from None
    if not callable(fn):
        raise DataError(f"{key}._target_={target!r} is not a function")
    options = {k: v for k, v in spec.items() if k != "_target_"}
    return partial(fn, **options) if options else fn


__all__ = ["import_function"]
