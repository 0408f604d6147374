"""The first key: at start, a gateway with `admin_key_file` set makes that file's key the admin
key (the file is made, 0600, when missing), so a fresh mesh can be managed at once."""

from __future__ import annotations

import logging
from pathlib import Path

from services.gateway.keys.secret import ensure_key_file
from services.gateway.keys.store import KeyStore
from shared.settings import Settings

log = logging.getLogger("lego.gateway.keys")


async def ensure_admin_key(keys: KeyStore, settings: Settings) -> None:
    """Store the admin key file's key as the admin key (nothing when auth is off or no file is set)."""
    if settings.auth == "off":
        log.warning("API keys are OFF (LEGO_AUTH=off): anyone who reaches this gateway may use every route")
        return
    if settings.auth != "on":
        raise ValueError(f"LEGO_AUTH={settings.auth!r}: use 'on' or 'off'")
    if not settings.admin_key_file:
        if not keys.list():
            log.warning(
                "API keys are on and none exists: every request will be refused with 401; set "
                "LEGO_ADMIN_KEY_FILE (a file holding the admin key, made if missing) or LEGO_AUTH=off"
            )
        return
    path = Path(settings.admin_key_file)
    key, made = ensure_key_file(path)
    await keys.ensure_admin(key)
    log.info("admin API key %s %s", "made in" if made else "from", path)  # the path, never the key
