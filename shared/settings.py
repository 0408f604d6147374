"""Settings from environment variables (`LEGO_*`), with defaults that work on one machine.

CLI flags of each service override these; `lego up` passes them down as environment.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "legodiffusion")


def _default_state_dir() -> str:
    return str(Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "legodiffusion")


@dataclass
class Settings:
    """All knobs in one place. Each field reads `LEGO_<FIELD NAME IN CAPITALS>`."""

    nats_url: str = "nats://127.0.0.1:4222"  # or a cluster's servers, comma-separated
    # Bus behaviour
    ack_wait_s: float = 30.0  # redelivery delay after a replica dies mid-step
    max_deliver: int = 5  # attempts before a step becomes an error result
    step_stream_max_age_s: float = 3600.0
    duplicate_window_s: float = 120.0
    stream_replicas: int = 1  # copies of each stream and bucket on a NATS cluster (3 on a 3-server one)
    # A step or result publish JetStream does not acknowledge (a server down, a stream electing a
    # new leader) is sent again for this long before it fails (same Nats-Msg-Id: no duplicates).
    publish_retry_s: float = 30.0
    # Tensor plane
    tensor_host: str = "127.0.0.1"  # address other services reach this process's tensor server on
    tensor_bind: str = "127.0.0.1"
    inline_max_bytes: int = 65536  # tensors up to this size ride inside the message
    transport: str = "auto"  # auto | tcp | shm | ucx: force one transport for every pair
    # Offer the UCX transport (extra `.[ucx]`): auto = when ucxx is installed and there is a GPU;
    # on = whenever ucxx is installed; off = never. In auto mode UCX carries GPU tensors only.
    ucx_enabled: str = "auto"
    tensor_ttl_s: float = 600.0  # a tensor nobody released is freed after this
    # A model service's /metrics and /healthz (HTTP, on tensor_bind); 0: a free port, announced in presence
    metrics_port: int = 0
    # Models
    models_dir: str = ""  # your weights (an SD3 directory, or sd3/ sd35-large/ flux/ controlnets/ loras/); empty: tiny
    model_cache_dir: str = field(default_factory=_default_cache_dir)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when torch sees a GPU)
    # Weights' dtype: auto = bfloat16 on a GPU (as these models are served), float32 on the CPU
    # (bf16 matmuls are slow there); or bfloat16 | float16 | float32.
    dtype: str = "auto"
    torch_threads: int = 0  # 0 -> torch default
    # Requests per batched transformer call in a denoiser (step-level batching: requests join
    # and leave between steps); 0: auto = 2 on a GPU, 1 on the CPU (no gain there: the cores are busy).
    # On an H100 at 1024x1024, 2 gave +5% throughput at the same mean latency, 8 gave +9% at +27%
    # latency (bench/RESULTS.md): the transformer is compute-bound there, and a replica holding
    # many steps keeps them from replicas the autoscaler adds.
    denoise_max_batch: int = 0
    # Steps an encoder (texts) or VAE (images) runs in one call when they queue up; 0: auto = 16
    # texts / 4 images on a GPU, 1 on the CPU.
    encode_max_batch: int = 0
    vae_max_batch: int = 0
    controlnet_max_batch: int = 0  # ControlNet steps an adapters replica runs in one call; 0: 8 on a GPU, else 1
    lora_cache_mb: float = 1024.0  # LoRA adapters a denoiser keeps loaded; least recently used go first
    lora_cache_max_adapters: int = 16  # and at most this many (peft's switch cost grows with them); 0: no cap
    lora_host_cache_mb: float = 4096.0  # LoRA files a denoiser keeps read in host memory (LRU; in-use ones stay)
    lora_dir: str = ""  # where uploaded LoRAs are stored, readable by every denoiser; empty: <state_dir>/loras
    lora_delete_grace_s: float = 600.0  # a deleted upload's file stays this long (planned requests may read it)
    # Parallel groups (services/denoiser/group/): a denoiser replica owning this many devices (1, 2
    # or 4: GPUs cuda:0..k-1 of its pod, or CPU worker processes), joined by torch.distributed.
    denoise_group_size: int = 1
    # How such a group picks each request's degree (shared/parallel_policy.py): adaptive (split a
    # request over idle devices, side by side under load) | never (one device a request) | always.
    parallel_mode: str = "adaptive"
    # Gateway
    gateway_id: str = field(default_factory=lambda: f"gw-{socket.gethostname()}-{os.getpid()}".replace(".", "-"))
    request_timeout_s: float = 300.0
    default_workflow: str = "sd3"
    # Gateways without private state (services/gateway/leases.py): a gateway refreshes its
    # heartbeat this often; one silent for 5 times as long is dead and its requests are adopted.
    gateway_heartbeat_s: float = 1.0
    request_record_ttl_s: float = 86400.0  # records (and Idempotency-Keys) of requests are kept this long
    event_ttl_s: float = 3600.0  # a request's progress events are kept this long (any gateway streams them)
    # SIGTERM: how long a draining gateway waits for its handed-over answers (keep it under the
    # orchestrator's grace period, e.g. Kubernetes' terminationGracePeriodSeconds, less 5 s)
    drain_grace_s: float = 20.0
    # Autoscaler (services/autoscaler; on by default under `lego up`)
    autoscale_slo: str = "5x"  # latency SLO: "5x" = 5 times the solo latency, or seconds ("12s")
    autoscale_min: str = "1"  # replicas per unit: "N" for every unit, or "N,UNIT=N,..." per unit
    autoscale_max: str = "3"
    autoscale_utilisation: float = 0.7  # target busy fraction of a replica at the arrival rate
    autoscale_cooldown_s: float = 30.0  # a unit scales down only after wanting fewer for this long
    autoscale_interval_s: float = 1.0  # one observe -> decide -> act tick
    autoscale_window_s: float = 10.0  # arrival rates are measured over this window
    autoscale_memory_budget_gb: float = 0.0  # per device, all replicas together; 0: 80% of this host's RAM
    autoscale_warm_fill: float = 0.0  # share of the budget kept filled with warm replicas by popularity; 0: off
    # Security. Secrets (the admin API key, the NATS passwords) are files with 0600 permissions
    # under state_dir, generated at first start; never in the repo, never in a log line.
    state_dir: str = field(default_factory=_default_state_dir)
    auth: str = "on"  # gateway: on = every route but /healthz, /readyz, /metrics needs an API key; off = --no-auth
    admin_key_file: str = ""  # gateway: ensure this file's key is an admin key at start (created, 0600, if missing)
    nats_user: str = ""  # this process's NATS user (its role); empty: connect without credentials
    nats_password_file: str = ""  # the file holding that user's password
    nats_tls_ca: str = ""  # CA bundle: connect to NATS over TLS (tls://) and verify the server with it
    gateway_tls_cert: str = ""  # gateway: serve HTTPS with this certificate chain (PEM) ...
    gateway_tls_key: str = ""  # ... and this private key
    # Hostile input (gateway)
    max_body_bytes: int = 16 * 1024 * 1024  # a larger request body is refused with 413
    max_image_pixels: int = 1024 * 1024  # a control image that decodes larger is refused before decoding
    # response_format="url" (gateway): how long an image link lives, and the bytes of images the
    # gateway keeps for links (in memory; the oldest go first when full)
    image_url_ttl_s: float = 3600.0
    image_url_max_mb: float = 256.0
    # (the shortest timeout_s a request may set is the API schema's MIN_TIMEOUT_S, 1 s: the OpenAPI document states it)
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build from `LEGO_*` variables (of `environ`, default the process's); keyword overrides
        (e.g. CLI flags) win when not None."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"LEGO_{f.name.upper()}")
            if raw is not None:
                kind = type(getattr(cls(), f.name))
                try:
                    values[f.name] = kind(raw)
                except ValueError as exc:
                    raise ValueError(f"LEGO_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """These settings as `LEGO_*` variables: what a process this one starts (a group's
        follower) needs to see the same settings, flags included."""
        return {f"LEGO_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_flags(cls, flags: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
        """`from_env`, then a command's flags: a flag whose destination is a field's name
        (`--nats-url` -> `nats_url`) overrides that field when given. One rule for every command,
        so a command's flag list is its list of settings, with no keyword to copy per flag."""
        names = {f.name for f in fields(cls)}
        return cls.from_env(environ, **{k: v for k, v in vars(flags).items() if k in names})
