"""A LoRA registered on a running mesh, used and deleted with no restart: its image equals
diffusers' pipeline with `load_lora_weights` of the same file; a request using it when it is
deleted (its file removed too) finishes with it; the next request naming it is refused."""

from __future__ import annotations

from pathlib import Path

import httpx
import torch

from tests.oracle import assert_images_match, png_to_array
from tests.waiting import wait_for

NAME = "e2e-ink"


def new_lora(settings, into: Path) -> Path:
    """A LoRA file of the SD3 base none of the built-ins equals: sd3-lora-a's layers, mixed tensors."""
    import safetensors.torch

    from shared.zoo import lora_path

    a, b = (
        safetensors.torch.load_file(str(lora_path(n, settings) / "pytorch_lora_weights.safetensors"))
        for n in ("sd3-lora-a", "sd3-lora-b")
    )
    into.mkdir(parents=True, exist_ok=True)
    out = into / "ink.safetensors"
    safetensors.torch.save_file({k: (0.7 * a[k] - 0.5 * b[k]).contiguous() for k in a}, str(out))
    return out


def pipeline_images(settings, file: Path, bodies: list[dict]) -> list:
    """diffusers' StableDiffusion3Pipeline with the file loaded by `load_lora_weights`, per body."""
    from baseline.pipelines import build_reference_pipeline

    pipe = build_reference_pipeline(settings, family="sd3", controlnet=False)
    pipe.load_lora_weights(str(file), adapter_name=NAME)
    images = []
    for body in bodies:
        pipe.set_adapters([NAME], adapter_weights=[body["loras"][0]["scale"]])
        width, height = (int(v) for v in body["size"].split("x"))
        images += pipe(
            prompt=body["prompt"],
            negative_prompt="",
            height=height,
            width=width,
            num_inference_steps=body["num_inference_steps"],
            guidance_scale=body["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(body["seed"]),
        ).images
    return images


def test_register_use_and_delete_a_lora_on_a_running_mesh(mesh, settings, tmp_path: Path) -> None:
    file = new_lora(settings, tmp_path / "loras")
    made = httpx.post(f"{mesh.url}/v1/loras", json={"name": NAME, "base": "sd3", "path": str(file)}, timeout=60)
    assert made.status_code == 201, made.text
    body = {
        "prompt": "a lighthouse on a cliff, ink drawing",
        "workflow": "sd3-lora",
        "size": "64x64",
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "seed": 91,
        "loras": [{"name": NAME, "scale": 0.8}],
    }
    slow = {**body, "num_inference_steps": 40, "wait": False}
    want, want_slow = pipeline_images(settings, file, [body, slow])
    r = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert_images_match(png_to_array(r.json()["data"][0]["b64_json"]), want)

    # Deleted while a request is denoising with it, and its file removed: that request finishes with it.
    accepted = httpx.post(f"{mesh.url}/v1/images/generations", json=slow, timeout=60)
    assert accepted.status_code == 202, accepted.text
    status_url = f"{mesh.url}{accepted.json()['status_url']}"

    def denoising() -> dict | None:
        status = httpx.get(status_url, timeout=10).json()
        assert status["status"] == "running", f"finished before it was seen denoising: {status}"
        return status if status["step"] >= 1 else None

    wait_for("the request to be denoising with the LoRA", denoising, timeout_s=120, every_s=0.02)
    assert httpx.delete(f"{mesh.url}/v1/loras/{NAME}", timeout=10).status_code == 200
    file.unlink()
    done = wait_for("the request to finish", lambda: _finished(status_url), timeout_s=120)
    assert done["status"] == "succeeded", done
    assert_images_match(png_to_array(done["data"][0]["b64_json"]), want_slow)

    refused = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=60)
    assert refused.status_code == 422 and f"unknown LoRA {NAME!r}" in refused.json()["error"]["message"]


def _finished(status_url: str) -> dict | None:
    status = httpx.get(status_url, timeout=10).json()
    return None if status["status"] == "running" else status


def test_only_an_admin_registers_or_deletes_loras(locked_gateway, settings) -> None:
    """With API keys on, a tenant's key (scope generate) lists LoRAs but may not add or delete one."""
    from shared.zoo import lora_path

    admin = {"Authorization": f"Bearer {locked_gateway.admin_key}"}
    made = httpx.post(
        f"{locked_gateway.url}/v1/keys", json={"name": "lora-tenant", "scopes": ["generate"]}, headers=admin, timeout=30
    )
    assert made.status_code == 201, made.text
    tenant = {"Authorization": f"Bearer {made.json()['key']}"}
    body = {"name": "tenant-ink", "base": "sd3", "path": str(lora_path("sd3-lora-a", settings))}
    assert httpx.post(f"{locked_gateway.url}/v1/loras", json=body, headers=tenant, timeout=30).status_code == 403
    assert httpx.delete(f"{locked_gateway.url}/v1/loras/sd3-lora-a", headers=tenant, timeout=30).status_code == 403
    listed = httpx.get(f"{locked_gateway.url}/v1/loras", headers=tenant, timeout=30)
    assert listed.status_code == 200 and "sd3-lora-a" in [r["name"] for r in listed.json()["loras"]]
    assert httpx.post(f"{locked_gateway.url}/v1/loras", json=body, timeout=30).status_code == 401
