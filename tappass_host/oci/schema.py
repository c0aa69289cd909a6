"""Validation of a rendered config against the OCI runtime-spec JSON Schema.

The schema is the spec's own draft-04 files from Debian's
golang-github-opencontainers-specs-dev (DESIGN §12), never a copy. Its files
refer to each other by bare relative names (`defs.json#/definitions/...`),
so every file is registered under its file:// URI and relative references
resolve against the file that holds them.
"""

import functools
import json
from pathlib import Path

from jsonschema import Draft4Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry
from referencing.jsonschema import DRAFT4

from tappass_host.errors import TappassError
from tappass_host.oci import field_path

SCHEMA_PACKAGE = "golang-github-opencontainers-specs-dev"
DEFAULT_SCHEMA_DIR = "/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema"
ROOT_SCHEMA = "config-schema.json"


class SchemaUnavailable(TappassError):
    """The OCI runtime-spec schema files are not installed."""


class BundleSchemaError(TappassError):
    """A rendered OCI config does not match the runtime-spec schema."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"OCI config fails the runtime-spec schema at {field or '(top level)'}: {problem}")


def validate(config: dict, schema_dir: str = DEFAULT_SCHEMA_DIR) -> None:
    """Raise BundleSchemaError on the most relevant error; schema_dir "" skips the check."""
    if schema_dir == "":
        return
    error = best_match(_validator(str(Path(schema_dir).resolve())).iter_errors(config))
    if error is not None:
        raise BundleSchemaError(field_path(error.absolute_path), _describe(error))


@functools.cache
def _validator(schema_dir: str) -> Draft4Validator:
    directory = Path(schema_dir)
    root = directory / ROOT_SCHEMA
    if not root.is_file():
        raise SchemaUnavailable(
            f"OCI runtime-spec schema not found in {schema_dir}: install {SCHEMA_PACKAGE} "
            f'(apt-get install -y {SCHEMA_PACKAGE}) or set oci_schema_dir = "" to skip the check'
        )
    resources = []
    for path in sorted(directory.glob("*.json")):
        try:
            contents = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SchemaUnavailable(f"unreadable OCI schema file {path}: {exc}") from exc
        resources.append((path.as_uri(), DRAFT4.create_resource(contents)))
    registry = Registry().with_resources(resources)
    return Draft4Validator({"$ref": root.as_uri()}, registry=registry)


def _describe(error: ValidationError) -> str:
    """What is wrong, without echoing the (possibly secret) value."""
    expected = error.validator_value
    match error.validator:
        case "type":
            return f"must be of type {' or '.join(expected) if isinstance(expected, list) else expected}"
        case "required":
            # the message names the missing property, a key from the schema
            return error.message
        case "enum":
            return f"must be one of {', '.join(map(str, expected))}"
        case "pattern":
            return f"does not match the pattern {expected}"
        case "minimum" | "maximum" | "minLength" | "maxLength" | "minItems" | "maxItems":
            return f"violates {error.validator} {expected}"
        case _:
            return f"fails the {error.validator} rule"
