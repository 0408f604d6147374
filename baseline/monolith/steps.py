"""How the baseline addresses its one whole-workflow step, on the mesh's own bus machinery.

A `pipeline` step is a `shared.messages.StepRequest` whose kind is this package's own
(`PIPELINE`, not one of the mesh's `StepKind`s) and whose model id is the workflow's name: it
travels on `lego.step.pipeline.<workflow>`, through the step stream, worker loop, presence and
backlog counters that every model service uses, so the same autoscaler scales it. The mesh
never publishes it and the shared library does not know it.
"""

from __future__ import annotations

import time
from typing import Any

from shared.messages import DenoiseParams, StepKind, StepRequest, register_params

PIPELINE = "pipeline"
NODE_ID = "pipeline"  # a whole-workflow request has this one node

if PIPELINE in set(StepKind):  # a mesh kind of this name would share its subjects and consumers
    raise RuntimeError(f"the baseline's step kind {PIPELINE!r} is also a mesh StepKind")


class PipelineParams(DenoiseParams):
    """A whole request, as the pipeline's `__call__` takes it: its denoising, its texts, and the
    control image's scale (the image travels as a tensor input). The workflow's own LoRAs are
    loaded with its pipeline, so `loras` and `controlnet` stay unset."""

    prompt: str
    negative_prompt: str = ""
    conditioning_scale: float = 1.0


register_params(PIPELINE, PipelineParams)


def pipeline_step(
    request_id: str, workflow: str, params: PipelineParams | dict[str, Any], reply_to: str, timeout_s: float
) -> StepRequest:
    """One request for a whole workflow: prompt and settings in `params`, uint8 images back."""
    return StepRequest(
        request_id=request_id,
        node_id=NODE_ID,
        kind=PIPELINE,
        model_id=workflow,
        params=params,
        reply_to=reply_to,
        deadline=time.time() + timeout_s,
    )
