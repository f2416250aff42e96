"""The fleet's JSON wire format: one encoding (compact, keys sorted) and content ids.

A leaf module, so the manifest schema (which names a revision by its content) and the
stored documents (:mod:`edgebundle.fleet.documents`, typed by that schema) share it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def revision_id(spec: Any) -> str:
    """A revision's id: a hash of its spec's JSON, so the same spec is the same revision."""
    return "rev-" + hashlib.sha256(dumps(spec).encode()).hexdigest()[:12]
