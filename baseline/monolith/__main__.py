from baseline.monolith.runner import SPEC
from shared.service import main

main(SPEC)
