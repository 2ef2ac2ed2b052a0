"""What schemathesis needs to speak Refract's one non-JSON media type."""

import schemathesis
from schemathesis.transport.serialization import serialize_binary


@schemathesis.serializer("application/wasm")
def wasm_request(ctx, value):
    # Uploads are bytes; the schema says `format: binary`.
    return serialize_binary(value)


@schemathesis.deserializer("application/wasm")
def wasm_response(ctx, response):
    # A downloaded component: its bytes, as a string the schema (`format: binary`) accepts.
    return response.content.decode("latin-1")
