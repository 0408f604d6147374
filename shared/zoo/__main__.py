"""`python -m shared.zoo`: build every tiny seeded model into the cache (once) and say where.

The launcher runs this before starting services, so they find the cache built. With a
`models_dir` of real weights nothing is built; the directories found are listed.
"""

from __future__ import annotations

from shared.logs import quiet_libraries
from shared.settings import Settings
from shared.zoo import prepare_zoo

if __name__ == "__main__":
    quiet_libraries()
    settings = Settings.from_env()
    for key, path in prepare_zoo(settings).items():
        print(f"{key:>24}  {path}")
    print(f"models ready ({settings.models_dir or settings.model_cache_dir})")
