"""One module per model family's denoising loop, gathered into one table.

Adding a family: its row in `shared.zoo.families.FAMILIES`, its module here (offering a
`LOOP = FamilyLoop(...)`), and that module in the tuple below. `unet.py` is the loop SD1.5's
and SDXL's modules share, no family of its own.
"""

from services.denoiser.families import flux, sd3, sd15, sdxl
from services.denoiser.loop import FamilyLoop

FAMILY_LOOPS: dict[str, FamilyLoop] = {name: m.LOOP for m in (sd3, flux, sd15, sdxl) for name in m.LOOP.families}
