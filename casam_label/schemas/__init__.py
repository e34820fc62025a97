"""The JSON Schemas of casam-label's native API (docs/INTERACTIVE.md), one file per request
or reply, and ``check_reply`` for tests and Python clients to validate against them."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from casam_core.errors import InputError

SCHEMA_DIR = Path(__file__).resolve().parent
NAMES = tuple(sorted(p.name[: -len(".schema.json")] for p in SCHEMA_DIR.glob("*.schema.json")))


@lru_cache(maxsize=1)
def _validators() -> dict[str, Any]:
    import jsonschema
    from referencing import Registry, Resource

    schemas = {p.name[: -len(".schema.json")]: json.loads(p.read_text(encoding="utf-8"))
               for p in sorted(SCHEMA_DIR.glob("*.schema.json"))}
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    return {name: jsonschema.Draft202012Validator(s, registry=registry) for name, s in schemas.items()}


def check_reply(schema: str, data: Any) -> Any:
    """``data`` when it matches ``<schema>.schema.json``, else InputError naming the first problem."""
    import jsonschema

    problem = jsonschema.exceptions.best_match(_validators()[schema].iter_errors(data))
    if problem is not None:
        raise InputError(f"{schema}: {problem.json_path}: {problem.message[:200]}")
    return data
