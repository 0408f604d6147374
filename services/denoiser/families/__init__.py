"""One module per model family's denoising loop, gathered into one table.

Adding a family: its row in `shared.zoo.families.FAMILIES`, its module here (offering a
`LOOP = FamilyLoop(...)`), and that module in the tuple below. `unet.py` is the loop SD1.5's
and SDXL's modules share, no family of its own.
"""

from services.denoiser.families import flux, flux_edit, sd3, sd3_edit, sd15, sdxl
from services.denoiser.loop import FamilyLoop, LoopFn

FAMILY_LOOPS: dict[str, FamilyLoop] = {name: m.LOOP for m in (sd3, flux, sd15, sdxl) for name in m.LOOP.families}
# The edit loops (img2img, inpainting: `DenoiseInputs.strength` set), by family.
EDIT_LOOPS: dict[str, LoopFn] = {
    **{name: sd3_edit.sd3_edit_loop for name in sd3_edit.FAMILIES_SERVED},
    **{name: flux_edit.flux_edit_loop for name in flux_edit.FAMILIES_SERVED},
    # The UNet families' loops edit themselves (`unet.py`: `DenoiseInputs.strength`).
    "sd15": sd15.sd15_loop,
    "sdxl": sdxl.sdxl_loop,
}
