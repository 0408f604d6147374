"""One module per model family's denoising loop; importing this package registers them all
with `services.denoiser.loop` (each module's `@family_loop`).

Adding a family: its row in `shared.zoo.families.FAMILIES`, its module here, and its import
below. `unet.py` is the loop SD1.5's and SDXL's modules share, no family of its own.
"""

from services.denoiser.families import flux, sd3, sd15, sdxl

__all__ = ["flux", "sd3", "sd15", "sdxl"]
