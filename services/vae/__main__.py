from services.vae.runner import SPEC
from shared.service import main

main(SPEC)
