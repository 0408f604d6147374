"""Settings from environment variables (`LEGO_*`), with defaults that work on one machine.

CLI flags of each service override these; `lego up` passes them down as environment.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "legodiffusion")


@dataclass
class Settings:
    """All knobs in one place. Each field reads `LEGO_<FIELD NAME IN CAPITALS>`."""

    nats_url: str = "nats://127.0.0.1:4222"
    # Bus behaviour
    ack_wait_s: float = 30.0  # redelivery delay after a replica dies mid-step
    max_deliver: int = 5  # attempts before a step becomes an error result
    step_stream_max_age_s: float = 3600.0
    duplicate_window_s: float = 120.0
    # Tensor plane
    tensor_host: str = "127.0.0.1"  # address other services reach this process's tensor server on
    tensor_bind: str = "127.0.0.1"
    inline_max_bytes: int = 65536  # tensors up to this size ride inside the message
    transport: str = "auto"  # auto | tcp | shm | ucx: force one transport for every pair
    # Offer the UCX transport (extra `.[ucx]`): auto = when ucxx is installed and there is a GPU;
    # on = whenever ucxx is installed; off = never. In auto mode UCX carries GPU tensors only.
    ucx_enabled: str = "auto"
    tensor_ttl_s: float = 600.0  # a tensor nobody released is freed after this
    # Models
    models_dir: str = ""  # your weights (an SD3 directory, or sd3/ sd35-large/ flux/ controlnets/ loras/); empty: tiny
    model_cache_dir: str = field(default_factory=_default_cache_dir)
    device: str = "cpu"
    torch_threads: int = 0  # 0 -> torch default
    lora_cache_mb: float = 1024.0  # LoRA adapters a denoiser keeps loaded; least recently used go first
    # Gateway
    gateway_id: str = field(default_factory=lambda: f"gw-{socket.gethostname()}-{os.getpid()}".replace(".", "-"))
    request_timeout_s: float = 300.0
    default_workflow: str = "sd3"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Build from `LEGO_*` variables; keyword overrides (e.g. CLI flags) win when not None."""
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = os.environ.get(f"LEGO_{f.name.upper()}")
            if raw is not None:
                kind = type(getattr(cls(), f.name))
                try:
                    values[f.name] = kind(raw)
                except ValueError as exc:
                    raise ValueError(f"LEGO_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The same settings as environment variables, for child processes."""
        return {f"LEGO_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}
