"""Model sharing: with the whole catalogue served, each model id is loaded once, and that one
copy serves every workflow (and family) that names it. The services themselves say what they
loaded (their presence records, as `GET /v1/models` lists them)."""

from __future__ import annotations

from collections import defaultdict

import httpx

from shared.workflows.catalogue import catalogue
from shared.zoo.registry import MODEL_IDS, MODELS

DOUBLED = {"sd3-transformer": 2}  # the session mesh runs two SD3 denoisers (for the crash test)


def _models(mesh) -> dict[str, dict]:
    r = httpx.get(f"{mesh.url}/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    return {m["model_id"]: m for m in r.json()["models"]}


def test_every_model_id_is_loaded_exactly_once(mesh):
    models = _models(mesh)
    assert sorted(models) == sorted(MODEL_IDS)
    loaded_by_process: dict[int, list[str]] = defaultdict(list)
    for model_id, info in models.items():
        replicas = info["replicas"]
        assert len(replicas) == DOUBLED.get(model_id, 1), (model_id, replicas)
        assert all(r["param_bytes"] > 0 for r in replicas), (model_id, replicas)
        for r in replicas:
            loaded_by_process[r["pid"]].append(model_id)
        assert info["service"] == MODELS[model_id].service
    # No process holds a model twice, and the encoders, VAEs and ControlNets each share one process.
    for pid, ids in loaded_by_process.items():
        assert len(ids) == len(set(ids)), (pid, ids)
    pid_of = {m: info["replicas"][0]["pid"] for m, info in models.items() if len(info["replicas"]) == 1}
    assert pid_of["clip-l"] == pid_of["clip-g"] == pid_of["t5"]
    assert pid_of["sd3-vae"] == pid_of["flux-vae"]
    assert pid_of["sd3-controlnet"] == pid_of["sd35-large-controlnet"] == pid_of["flux-controlnet"]


def test_models_list_the_workflows_that_share_them(mesh):
    models = _models(mesh)
    every = {name for name, w in catalogue().items() if w.family not in ("sd15", "sdxl")}  # the MMDiT families
    assert set(models["t5"]["workflows"]) == every  # one T5 for SD3, SD3.5-Large and Flux
    # one CLIP-L for them and SDXL, one CLIP-G for SD3, SD3.5-Large and SDXL
    assert set(models["clip-l"]["workflows"]) == every | {"sdxl"}
    assert set(models["clip-g"]["workflows"]) == {w for w in every if not w.startswith("flux")} | {"sdxl"}
    assert set(models["sd3-vae"]["workflows"]) == {w for w in every if w.startswith("sd3")}
    assert set(models["sd3-controlnet"]["workflows"]) == {"sd3-controlnet", "sd3-controlnet-lora"}
    assert set(models["flux-transformer"]["workflows"]) == {w for w in every if w.startswith("flux")}
    for sd15_model in ("sd15-clip", "sd15-unet", "sd15-vae"):  # SD1.5 shares nothing with them
        assert set(models[sd15_model]["workflows"]) == {"sd15"}
    for sdxl_model in ("sdxl-unet", "sdxl-vae"):  # SDXL's own models
        assert set(models[sdxl_model]["workflows"]) == {"sdxl"}


def test_one_t5_replica_serves_all_three_families(mesh):
    ran_on = {}
    for workflow in ("sd3", "sd35-large", "flux"):
        body = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "seed": 5, "workflow": workflow}
        r = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=300)
        assert r.status_code == 200, r.text
        status = httpx.get(f"{mesh.url}/v1/requests/{r.json()['request_id']}", timeout=30).json()
        ran_on[workflow] = (status["replicas"]["t5"], status["replicas"]["clip_l"])
    t5_replica = _models(mesh)["t5"]["replicas"][0]["replica_id"]
    assert {t5 for t5, _ in ran_on.values()} == {t5_replica}, ran_on
    assert len({clip for _, clip in ran_on.values()}) == 1, ran_on
