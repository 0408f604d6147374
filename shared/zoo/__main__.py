"""`python -m shared.zoo`: build the tiny seeded models into the cache (once) and say where."""

from __future__ import annotations

from shared.logs import quiet_libraries
from shared.settings import Settings
from shared.zoo import models_root

if __name__ == "__main__":
    quiet_libraries()
    print(f"models ready in {models_root(Settings.from_env())}")
