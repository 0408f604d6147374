from services.denoiser.runner import SPEC
from shared.service import main

main(SPEC)
