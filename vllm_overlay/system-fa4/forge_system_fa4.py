# vllm-forge: take FA4 from a separately installed flash-attn-4 ("system FA4").
"""Which FA4 implementation vLLM calls: the bundled vllm.vllm_flash_attn.cute, or flash_attn.cute
from a separately installed flash-attn-4 (e.g. the one `vllm-forge build-fa4-wheel` makes).

System FA4 is asked for with the environment variable VLLM_USE_SYSTEM_FLASH_ATTN=1 or
attention_config.use_system_flash_attn; a wheel forged with `--fa4 system` bundles no FA4 and
always asks for it. The choice is made once per process, when the attention backend first asks
(backend selection / init), and never in the attention call path. A system FA4 that is missing,
does not import, or refuses SM90 head dim 512 or paged KV is not used: one warning, then the
bundled FA4 (if the wheel has one).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any, Callable

from vllm.logger import init_logger

logger = init_logger(__name__)

ENV = "VLLM_USE_SYSTEM_FLASH_ATTN"
SYSTEM_MODULE = "flash_attn.cute.interface"
BUNDLED = (Path(__file__).parent / "cute" / "interface.py").is_file()
_SM90_PAGED_REFUSAL = "paged KV not supported on SM 9.0"

_choice: str | None = None


def requested() -> bool:
    env = os.environ.get(ENV, "")
    if env:
        return env.strip().lower() in ("1", "true", "yes", "on")
    if not BUNDLED:
        return True
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return bool(config is not None and getattr(config.attention_config, "use_system_flash_attn", False))


@functools.cache
def unusable_reason() -> str | None:
    """Why the installed flash_attn.cute cannot serve SM90 head dim 512 with paged KV (None: it can)."""
    try:
        if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
            return "flash_attn.cute is not installed"
        interface = importlib.import_module(SYSTEM_MODULE)
    except Exception as e:  # an FA4 that does not import is as good as none
        return f"{SYSTEM_MODULE} does not import ({type(e).__name__}: {e})"
    validate = getattr(interface, "_validate_head_dims", None)
    if validate is None:
        return f"{SYSTEM_MODULE} has no _validate_head_dims (too old)"
    try:
        validate(512, 512, 9, 8)
    except AssertionError as e:
        return f"it refuses head dim 512 on SM90 ({e})"
    if _SM90_PAGED_REFUSAL in inspect.getsource(interface):
        return "it refuses paged KV on SM90"
    return None


def choose() -> str:
    """'system', 'bundled' or 'none', decided once per process."""
    global _choice
    if _choice is None:
        reason = unusable_reason() if requested() else None
        if requested() and reason is None:
            _choice = "system"
        else:
            _choice = "bundled" if BUNDLED else "none"
            if requested():
                logger.warning("System FA4 (flash_attn.cute) was requested but %s; using %s.", reason,
                               "the bundled FA4" if BUNDLED else "no FA4")
        logger.info("FA4 implementation: %s", _choice)
    return _choice


def flash_attn_fwd() -> Callable[..., Any]:
    choice = choose()
    if choice == "system":
        from flash_attn.cute.interface import _flash_attn_fwd
    elif choice == "bundled":
        from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd
    else:
        raise ImportError(f"no usable FA4: this vLLM bundles none and system FA4 is unusable ({unusable_reason()})")
    return _flash_attn_fwd  # type: ignore[no-any-return]
