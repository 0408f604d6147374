"""The gateway moves references, not tensors: it must not import torch or diffusers."""

from __future__ import annotations

import subprocess
import sys


def test_gateway_imports_no_torch_or_diffusers():
    code = (
        "import sys, services.gateway.app, services.gateway.__main__, lego.cli; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"gateway imported {proc.stdout.strip()} {proc.stderr[-500:]}"


def test_every_entry_point_has_help():
    modules = (
        "services.gateway",
        "services.encoder",
        "services.denoiser",
        "services.vae",
        "services.autoscaler",
        "baseline.monolith",
        "lego.cli",
    )
    # All at once: each is a fresh interpreter importing its service, the cores share them.
    procs = {
        module: subprocess.Popen(
            [sys.executable, "-m", module, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for module in modules
    }
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (module, err)
        assert "usage:" in out and "--" in out, module


def test_autoscaler_imports_no_torch_or_diffusers():
    code = (
        "import sys, services.autoscaler.__main__, services.autoscaler.controller, services.autoscaler.signals, "
        "services.autoscaler.actuators.local, services.autoscaler.actuators.kubernetes, "
        "services.autoscaler.actuators.compose, services.gateway.routers.status; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"autoscaler imported {proc.stdout.strip()} {proc.stderr[-500:]}"
