"""A generation request posted from a background thread, for tests that kill something while
it runs: the test goes on (waits for the loop to start, kills a process) and collects the
answer after."""

from __future__ import annotations

import threading

import httpx


class Generation:
    """`POST {url}/v1/images/generations` with `body` and an `X-Request-Id`, started at once on a
    thread; `answer()` waits for it and returns {"status", "json"}."""

    def __init__(self, url: str, body: dict, request_id: str, timeout_s: float = 300) -> None:
        self._answer: dict = {}
        self._thread = threading.Thread(target=self._post, args=(url, body, request_id, timeout_s), daemon=True)
        self._thread.start()

    def _post(self, url: str, body: dict, request_id: str, timeout_s: float) -> None:
        r = httpx.post(
            f"{url}/v1/images/generations", json=body, headers={"X-Request-Id": request_id}, timeout=timeout_s
        )
        self._answer["status"], self._answer["json"] = r.status_code, r.json()

    def answer(self, timeout_s: float = 300) -> dict:
        self._thread.join(timeout_s)
        return self._answer
