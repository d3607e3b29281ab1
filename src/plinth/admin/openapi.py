"""The OpenAPI 3.1 document of the admin API, built from the operation table and pydantic models.

Generated rather than written by hand so it cannot drift from what the server accepts: the JSON
Schemas come from the same models that validate requests (pydantic emits JSON Schema 2020-12,
which OpenAPI 3.1 uses as is).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from plinth import __version__
from plinth.admin.schemas import ErrorBody

if TYPE_CHECKING:
    from plinth.admin.api import Operation

REF = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "Invalid request (body, query or a value the service refuses).",
    401: "Missing or invalid admin credential.",
    403: "The credential is a virtual API key, or the role may not do this.",
    404: "No such object.",
    409: "An object with that name already exists.",
}


def openapi_document(operations: list[Operation], prefix: str) -> dict[str, Any]:
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorBody, "serialization")]
    for op in operations:
        if op.media_type == "application/json":
            wanted.append((op.response, "serialization"))
        if op.body is not None:
            wanted.append((op.body, "validation"))
    wanted = list(dict.fromkeys(wanted))
    refs, defs = models_json_schema(wanted, ref_template=REF)
    schemas: dict[str, Any] = defs.get("$defs", {})

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(refs[(model, mode)])

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        # Starlette's `{name:path}` (a name that may hold '/') is a plain `{name}` in OpenAPI.
        item = paths.setdefault(prefix + re.sub(r"{(\w+):\w+}", r"{\1}", op.path), {})
        item[op.method.lower()] = _operation(op, ref)
    paths[prefix + "/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "tags": ["meta"],
            "security": [],
            "responses": {
                "200": {"description": "The OpenAPI 3.1 document.", "content": {"application/json": {}}}
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Plinth admin API",
            "version": __version__,
            "description": "Organizations, teams, projects, virtual API keys and their limits, users, "
            "budgets and spend reports. Authenticate with "
            "the platform admin key or a user token (`pt-...`) as a bearer token; virtual API keys "
            "are refused.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [{"name": name} for name in dict.fromkeys(op.tag for op in operations)],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "PLINTH_ADMIN_KEY or a user token (pt-...).",
                }
            },
        },
    }


def _operation(op: Operation, ref: Any) -> dict[str, Any]:
    doc = (op.handler.__doc__ or "").strip()
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
    }
    if doc:
        out["description"] = doc + (f"\n\nPermission: `{op.permission}`." if op.permission else "")
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)(?::\w+)?}", op.path)
    ]
    if op.query is not None:
        schema = op.query.model_json_schema(ref_template=REF)
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            prop = dict(prop)
            prop.pop("title", None)
            parameters.append({"name": name, "in": "query", "required": name in required, "schema": prop})
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {
            "required": not op.body_optional,
            "content": {"application/json": {"schema": ref(op.body, "validation")}},
        }
    if op.media_type == "application/json":
        content = {"application/json": {"schema": ref(op.response, "serialization")}}
    else:  # a file download, e.g. the CSV spend report
        content = {op.media_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(op.status): {"description": "Success.", "content": content}}
    for status in sorted({400, 401, 403, *(code for code in op.errors if code in _ERROR_TEXT)}):
        responses[str(status)] = {
            "description": _ERROR_TEXT[status],
            "content": {"application/json": {"schema": ref(ErrorBody, "serialization")}},
        }
    out["responses"] = responses
    return out
