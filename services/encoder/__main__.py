from services.encoder.runner import SPEC
from shared.service import main

main(SPEC)
