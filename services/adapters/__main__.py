from services.adapters.runner import SPEC
from shared.service import main

main(SPEC)
