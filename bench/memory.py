"""Memory to serve the whole catalogue: micro-served (each model once) versus monolithic.

Monolithic serving loads one diffusers pipeline per workflow, each with its own copy of every
model it uses (its text encoders, base, VAE, ControlNet, LoRA). The mesh loads each model id
once: one T5 serves SD3, SD3.5-Large and Flux; one SD3 base serves its four workflows, with
LoRAs switched per request. Three figures:

1. tiny configs, parameter bytes (exact: the zoo's models, as the services load them);
2. tiny configs, resident memory measured: one process loading every model once, against one
   process holding one reference pipeline per workflow (RSS growth after imports; the torch
   runtime itself is not counted for either, though monolithic serving pays it per replica);
3. full-size architectures (SD3-Medium, SD3.5-Large, Flux.1-dev, SD1.5, CLIP-L/G, T5-XXL, VAEs,
   public ControlNets, rank-16 LoRAs) from their configs on the meta device, in bf16.

Run: `python bench/memory.py` (about a minute). The last line is the full-size ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shared.settings import Settings  # noqa: E402
from shared.workflows.catalogue import catalogue  # noqa: E402
from shared.zoo.registry import LORAS, MODEL_IDS  # noqa: E402


def workflow_models() -> dict[str, list[str]]:
    return {name: [m for _, m in spec.models()] for name, spec in catalogue().items()}


def workflow_loras() -> dict[str, list[str]]:
    """The LoRAs each LoRA workflow's monolithic replica keeps loaded: every one it offers."""
    return {name: list(spec.loras) for name, spec in catalogue().items()}


def _modules(bundle):
    for attr in ("model", "transformer", "vae", "controlnet"):
        if hasattr(bundle, attr):
            return getattr(bundle, attr)
    raise TypeError(f"no module in {bundle!r}")


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def tiny_bytes(settings: Settings) -> tuple[dict[str, int], dict[str, int]]:
    """Parameter bytes of each tiny model id and of each tiny LoRA file."""
    from safetensors import safe_open

    from shared.zoo import load_model, lora_path

    models = {}
    for model_id in MODEL_IDS:
        models[model_id] = _bytes(_modules(load_model(model_id, settings)))
        gc.collect()
    loras = {}
    for name in LORAS:
        path = lora_path(name, settings)
        path = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
        with safe_open(str(path), "pt") as f:
            loras[name] = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    return models, loras


def full_size_bytes() -> tuple[dict[str, int], dict[str, int]]:
    from shared.zoo.full_size import BYTES_PER_PARAM, build_full_size, lora_parameter_count, parameter_count

    models, lora_of_base = {}, {}
    for model_id in MODEL_IDS:
        module = build_full_size(model_id)
        models[model_id] = parameter_count(module) * BYTES_PER_PARAM
        if model_id.endswith("-transformer"):
            lora_of_base[model_id] = lora_parameter_count(module) * BYTES_PER_PARAM
        del module
    loras = {name: lora_of_base[info.base] for name, info in LORAS.items()}
    return models, loras


def totals(models: dict[str, int], loras: dict[str, int]) -> tuple[int, int]:
    """(micro, monolithic) bytes for the whole catalogue."""
    micro = sum(models.values()) + sum(loras.values())
    mono = 0
    for name, ids in workflow_models().items():
        mono += sum(models[m] for m in ids) + sum(loras[x] for x in workflow_loras()[name])
    return micro, mono


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure_rss(mode: str, cache_dir: str) -> int:
    """RSS growth (bytes) of a fresh process loading the catalogue `mode`-style."""
    code = f"""
import gc, json, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, diffusers, transformers
from bench.memory import _rss_kib, catalogue, workflow_loras
from shared.settings import Settings
settings = Settings(model_cache_dir={cache_dir!r})
from baseline.pipelines import build_reference_pipeline, load_reference_loras
from shared.zoo import load_model
from shared.zoo.registry import MODEL_IDS
torch.set_grad_enabled(False)
gc.collect(); before = _rss_kib()
held = []
if {mode!r} == "micro":
    held = [load_model(m, settings) for m in MODEL_IDS]
else:
    for name, spec in catalogue().items():
        pipe = build_reference_pipeline(settings, family=spec.family, controlnet=bool(spec.controlnets))
        if spec.loras:
            load_reference_loras(pipe, [(x, 1.0) for x in workflow_loras()[name]], settings)
        held.append(pipe)
gc.collect()
print(json.dumps((_rss_kib() - before) * 1024))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-rss", action="store_true", help="skip the measured-RSS part (two subprocesses)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    settings = Settings.from_env()
    from shared.zoo import prepare_zoo

    prepare_zoo(settings)
    figures: dict = {}

    print("== tiny configs (the zoo the tests and the demo run), parameter bytes ==")
    models, loras = tiny_bytes(settings)
    micro, mono = totals(models, loras)
    figures["tiny_params"] = {"micro": micro, "monolithic": mono, "ratio": micro / mono}
    pipelines = len(workflow_models())
    print(f"micro-served: {mib(micro)}   monolithic ({pipelines} pipelines): {mib(mono)}   ratio {micro / mono:.3f}")

    if not args.no_rss:
        print("== tiny configs, resident memory measured (RSS growth of a fresh process) ==")
        rss_micro = measure_rss("micro", settings.model_cache_dir)
        rss_mono = measure_rss("monolithic", settings.model_cache_dir)
        figures["tiny_rss"] = {"micro": rss_micro, "monolithic": rss_mono, "ratio": rss_micro / rss_mono}
        print(f"micro-served: {mib(rss_micro)}   monolithic: {mib(rss_mono)}   ratio {rss_micro / rss_mono:.3f}")

    print("== full-size architectures (bf16, from their configs; no weights needed) ==")
    models, loras = full_size_bytes()
    print(f"{'model':<24}{'size':>12}   workflows using it")
    for model_id, size in models.items():
        users = [w for w, ids in workflow_models().items() if model_id in ids]
        print(f"{model_id:<24}{gib(size):>12}   {len(users)}")
    print(
        f"{'each LoRA (rank 16)':<24}{'':>12}   " + ", ".join(f"{b}: {mib(s)}" for b, s in sorted(loras.items())[::2])
    )
    micro, mono = totals(models, loras)
    figures["full_size_params"] = {"micro": micro, "monolithic": mono, "ratio": micro / mono}
    print(f"micro-served: {gib(micro)}   monolithic ({len(workflow_models())} pipelines): {gib(mono)}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    print(f"ratio micro/monolithic (full size): {micro / mono:.3f}")


if __name__ == "__main__":
    main()
