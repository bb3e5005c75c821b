"""The device the tests fake: vLLM's own Platform class reporting a compute capability, with the
compiled FA2/FA3 extensions present as far as vLLM can tell (there is no GPU here). Imported in the
test process (test_behaviour) and by the probes run on a release's real vLLM package (conftest)."""

from __future__ import annotations

import sys
import types
from typing import Any


def install() -> tuple[Any, Any]:
    """Make the imported vLLM's current platform a fake CUDA device of capability FakeGpu.capability
    (9.0 until changed); returns (FakeGpu, DeviceCapability)."""
    import vllm.platforms as platforms
    from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

    class FakeGpu(Platform):
        _enum = PlatformEnum.CUDA
        device_name = device_type = "cuda"
        dispatch_key = "CUDA"
        capability = DeviceCapability(9, 0)

        @classmethod
        def get_device_capability(cls, device_id: int = 0) -> Any:
            return cls.capability

    platforms._current_platform = FakeGpu()
    for ext in ("_vllm_fa2_C", "_vllm_fa3_C"):  # compiled FA2/FA3: present as far as vLLM can tell
        sys.modules[f"vllm.vllm_flash_attn.{ext}"] = types.ModuleType(ext)
    return FakeGpu, DeviceCapability
