"""Finished benchmark rows kept in a JSON-lines file, so a long grid can stop and go on later."""

from __future__ import annotations

import json
import os
from typing import Any

DENSE_TOLERANCE = 0.005  # the dense perplexity of a protocol drifts in its 4th decimal with float summation order


def same_protocol(saved: dict[str, Any], protocol: dict[str, Any]) -> bool:
    """Equal settings; the dense perplexity (a check that model and tokens are the same) within DENSE_TOLERANCE."""
    if saved.keys() != protocol.keys():
        return False
    return all(abs(value - protocol[key]) <= DENSE_TOLERANCE if key == "dense" else value == protocol[key]
               for key, value in saved.items())


class RowCache:
    """Rows keyed by their settings; ``get`` returns a finished row, ``put`` appends one at once."""

    def __init__(self, path: str, protocol: dict[str, Any]):
        self.path, self.protocol, self.rows = path, protocol, {}
        if os.path.exists(path):
            with open(path) as handle:
                for line in handle:
                    record = json.loads(line)
                    if same_protocol(record.get("protocol") or {}, protocol):
                        self.rows[self._key(record["key"])] = record["row"]

    @staticmethod
    def _key(key: dict[str, Any]) -> str:
        return json.dumps(key, sort_keys=True)

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        return self.rows.get(self._key(key))

    def put(self, key: dict[str, Any], row: dict[str, Any]) -> None:
        self.rows[self._key(key)] = row
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"protocol": self.protocol, "key": key, "row": row}) + "\n")
