"""Checks the gateway's OpenAPI document with third-party validators, for tests/openapi.rs.

Reads JSON on stdin: {"document": <the document>, "answers": [{"method", "path", "status", "body"}, ...]}.
The document must validate as OpenAPI 3.1 (openapi-spec-validator), and every answer's body must validate
against the schema the document gives for that method, path and status (openapi-schema-validator, which
resolves the document's $refs). Prints "ok" or exits non-zero saying what failed.
"""

import json
import sys

from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import OpenAPIV31SpecValidator


def main() -> None:
    given = json.load(sys.stdin)
    document = given["document"]
    OpenAPIV31SpecValidator(document).validate()
    for answer in given["answers"]:
        where = f'{answer["method"].upper()} {answer["path"]} {answer["status"]}'
        operation = document["paths"][answer["path"]][answer["method"]]
        response = operation["responses"][str(answer["status"])]
        schema = response["content"]["application/json"]["schema"]
        # The components go along so the schema's $refs resolve against it as they do in the document.
        rooted = dict(schema, components=document.get("components", {}))
        errors = sorted(OAS31Validator(rooted).iter_errors(answer["body"]), key=str)
        if errors:
            sys.exit(f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}")
    print("ok")


if __name__ == "__main__":
    main()
