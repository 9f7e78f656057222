"""The Gemini API wire format (``models/{model}:generateContent`` and ``:streamGenerateContent``).

Like the real API, zero-valued usage fields are omitted (``cachedContentTokenCount`` appears only
when something was cached, ``candidatesTokenCount`` only once text was produced), so clients must
treat them as optional.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Mapping
from typing import Any

from moa.simulator.images import Image, assumed, b64decode, gemini_tokens, sniff
from moa.simulator.structured import OutputFormat
from moa.simulator.tools import Mode, Tool, ToolUse, declared_tokens, tool_call_text, tool_result_text
from moa.simulator.wire import (
    BadRequest,
    Completion,
    Err,
    SimRequest,
    Wire,
    dumps,
    is_integer,
    is_number,
    random_id,
    sse,
)
from moa.tokens import approx_tokens

_STATUS = {
    Err.BAD_REQUEST: "INVALID_ARGUMENT",
    Err.AUTH: "UNAUTHENTICATED",
    Err.NOT_FOUND: "NOT_FOUND",
    Err.RATE_LIMIT: "RESOURCE_EXHAUSTED",
    Err.SERVER: "INTERNAL",
    Err.UNAVAILABLE: "UNAVAILABLE",
}


def proto_duration(seconds: float) -> str:
    """A duration in protobuf's JSON form: seconds, with 0, 3, 6 or 9 fractional digits, and "s"."""
    whole, nanos = divmod(round(seconds * 1e9), 10**9)
    if not nanos:
        return f"{whole}s"
    digits = f"{nanos:09d}"
    for keep in (3, 6):
        if digits[keep:] == "0" * (9 - keep):
            return f"{whole}.{digits[:keep]}s"
    return f"{whole}.{digits}s"


_FINISH = {
    "stop": "STOP",
    "stop_sequence": "STOP",
    "length": "MAX_TOKENS",
    "tool_calls": "STOP",
    "refusal": "SAFETY",
}
_TOOL_FIELDS = frozenset(
    {
        "functionDeclarations", "googleSearch", "googleSearchRetrieval", "codeExecution", "urlContext",
        "computerUse", "fileSearch", "googleMaps", "mcpServers", "retrieval", "enterpriseWebSearch",
    }
)  # fmt: skip
_DECLARATION_FIELDS = frozenset(
    {
        "name",
        "description",
        "parameters",
        "parametersJsonSchema",
        "response",
        "responseJsonSchema",
        "behavior",
    }
)
_TYPES = frozenset({"TYPE_UNSPECIFIED", "STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"})
_MODES: dict[str, Mode] = {
    "MODE_UNSPECIFIED": "auto",
    "AUTO": "auto",
    "ANY": "required",
    "NONE": "none",
    "VALIDATED": "auto",
}
_FUNCTION_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_.:-]{0,63}$")
_CALL_ORDER = (
    "Please ensure that function call turn comes immediately after a user turn or after a function "
    "response turn."
)
_RESPONSE_COUNT = (
    "Please ensure that the number of function response parts is equal to the number of function call "
    "parts of the function call turn."
)
_CALLED = "Model generated function call(s)."
_MODE_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
# The fields the API knows, top level and in generationConfig, in both spellings; anything else is
# refused by name ("Unknown name ...: Cannot find field.").
_FIELDS = frozenset(
    {
        "contents", "systemInstruction", "generationConfig", "safetySettings", "tools", "toolConfig",
        "cachedContent", "model",
    }
)  # fmt: skip
_CONFIG_FIELDS = frozenset(
    {
        "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema",
        "responseModalities", "candidateCount", "maxOutputTokens", "temperature", "topP", "topK",
        "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
        "enableEnhancedCivicAnswers", "speechConfig", "thinkingConfig", "imageConfig",
        "mediaResolution",
    }
)  # fmt: skip
MAX_STOP = 5
# The protocol's names of the common generation parameters.
_NAMES = {
    "top_p": "topP",
    "max_tokens": "maxOutputTokens",
    "stop": "stopSequences",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _unknown(obj: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    for key in obj:
        if _camel(key) not in known:
            at = f" at '{where}'" if where else ""
            raise BadRequest(f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.')


def _in_range(config: Mapping[str, Any], camel: str, snake: str, hi: float, lo: float = 0.0) -> float | None:
    v = _field(config, camel, snake)
    if v is None:
        return None
    if not is_number(v):
        raise BadRequest(f"Invalid value at 'generation_config.{snake}' (TYPE_FLOAT), {v!r}")
    if not lo <= v <= hi:
        where = f"GenerateContentRequest.generation_config.{snake}"
        raise BadRequest(f"* {where}: {snake} must be in the range [{lo:.1f}, {hi:.1f}]")
    return float(v)


def _field(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    """The REST API accepts both spellings of every field."""
    v = obj.get(camel)
    return obj.get(snake) if v is None else v


def _parts(content: Any, where: str) -> list[Any]:
    if not isinstance(content, Mapping):
        raise BadRequest(f"Invalid value at '{where}': expected a Content object")
    parts = content.get("parts")
    if isinstance(parts, Mapping):  # the REST API takes a lone object for a repeated field
        parts = [parts]
    if not isinstance(parts, list):
        raise BadRequest(f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.")
    return parts


def _parts_text(content: Any, where: str) -> str:
    return "".join(
        p["text"] for p in _parts(content, where) if isinstance(p, Mapping) and isinstance(p.get("text"), str)
    )


def _part(p: Any, key: str, snake: str) -> Mapping[str, Any] | None:
    v = _field(p, key, snake) if isinstance(p, Mapping) else None
    return v if isinstance(v, Mapping) else None


# Images Gemini reads, and other media it takes that the simulator does not model (accepted, not
# counted); anything else is "Unsupported MIME type" (the API's words, as reported verbatim in
# public issue threads, like the base64 and image-processing refusals below).
_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"})
_OTHER_MEDIA = ("audio/", "video/", "text/", "application/pdf")
_UNREADABLE = (
    "Unable to process input image. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting"
)


def _media_type(mime: Any, at: str) -> bool:
    """Whether ``mime`` is an image (False: other media the API takes); refused if it takes neither."""
    if not isinstance(mime, str) or not mime:
        # The simulator's own words: none were found for a blob without a type.
        raise BadRequest(f"* GenerateContentRequest.{at}.mime_type: MIME type is required.")
    if mime in _IMAGE_TYPES:
        return True
    if mime.startswith(_OTHER_MEDIA):
        return False
    raise BadRequest(f"Unsupported MIME type: {mime}")


def _media(part: Any, where: str) -> Image | None:
    """An ``inlineData`` or ``fileData`` part's image (None: not an image part), checked as the
    API checks it: inline data must be base64 (protobuf's bytes, either alphabet) of an image it
    can read; a file URI is never fetched (its size assumed)."""
    blob = _part(part, "inlineData", "inline_data")
    if blob is not None:
        at = f"{where}.inline_data"
        _unknown(blob, frozenset({"mimeType", "data", "displayName"}), at)
        data = blob.get("data")
        raw = b64decode(data, lenient=True) if isinstance(data, str) else None
        if isinstance(data, str) and raw is None:
            raise BadRequest(
                f"Invalid value at '{at}.data' (TYPE_BYTES), Base64 decoding failed for \"{data}\""
            )
        if not _media_type(_field(blob, "mimeType", "mime_type"), at):
            return None
        found = sniff(raw or b"")
        mime = _field(blob, "mimeType", "mime_type")
        if found is None and mime in ("image/heic", "image/heif") and raw:
            # A format whose header the simulator does not read: its size is assumed.
            image = dataclasses.replace(assumed("file", mime), source="data")
        elif found is None:
            raise BadRequest(_UNREADABLE)
        else:
            image = Image("data", found[0], found[1], found[2], measured=True)
        return dataclasses.replace(image, tokens=gemini_tokens(image.width, image.height), where=where)
    file = _part(part, "fileData", "file_data")
    if file is None:
        return None
    at = f"{where}.file_data"
    _unknown(file, frozenset({"mimeType", "fileUri", "displayName"}), at)
    uri = _field(file, "fileUri", "file_uri")
    if not isinstance(uri, str) or not uri:
        # The simulator's own words, as for a blob without a type.
        raise BadRequest(f"* GenerateContentRequest.{at}.file_uri: File URI is required.")
    mime = _field(file, "mimeType", "mime_type")
    if mime is not None and not _media_type(mime, at):
        return None
    image = assumed("file", mime)
    return dataclasses.replace(image, tokens=gemini_tokens(image.width, image.height), where=where)


def _turns(contents: list[Any], transcript: list[tuple[str, str]], images: list[Image]) -> None:
    """The contents as transcript turns (appended to ``transcript``; the user turns' images to
    ``images``), function calls and responses checked in order as the API checks them: a call
    turn only after a user turn or a response turn, and as many response parts as the call turn
    had calls (with Gemini 3's ids, each response answering one of them)."""
    calls: list[Mapping[str, Any]] = []  # the previous turn's function calls
    previous = None
    for i, c in enumerate(contents):
        role = c.get("role", "user") if isinstance(c, Mapping) else None
        if role not in ("user", "model", "function"):
            raise BadRequest(f"Please use a valid role: user, model. (contents[{i}].role)")
        where = f"contents[{i}]"
        parts = _parts(c, where)
        text = _parts_text(c, where)
        made = [f for j, p in enumerate(parts) if (f := _call_part(p, f"{where}.parts[{j}]")) is not None]
        answers = [
            r for j, p in enumerate(parts) if (r := _response_part(p, f"{where}.parts[{j}]")) is not None
        ]
        shown = [m for j, p in enumerate(parts) if (m := _media(p, f"{where}.parts[{j}]")) is not None]
        if role == "model":
            shown = []  # a model turn's data is what it generated, not an image it was shown
        if made and (role != "model" or previous not in ("user", "response")):
            raise BadRequest(_CALL_ORDER)
        if answers:
            if calls and len(answers) != len(calls):
                raise BadRequest(_RESPONSE_COUNT)
            ids = {k.get("id") for k in calls if k.get("id")}
            for r in answers:
                if ids and r.get("id") and r["id"] not in ids:
                    raise BadRequest("functionResponse.id does not match functionCall.id")
                transcript.append(("tool", tool_result_text(str(r.get("name", "")), r.get("response", {}))))
        if made:
            said = [tool_call_text(str(f.get("name")), dumps(f.get("args") or {}).decode()) for f in made]
            text = "\n".join([text, *said]).strip()
        if text or not answers or shown:
            images += [dataclasses.replace(image, turn=len(transcript)) for image in shown]
            transcript.append(("assistant" if role == "model" else "user", text))
        calls = made
        previous = "response" if answers else "model" if role == "model" else "user"


_MIME_TYPES = ("text/plain", "application/json", "application/xml", "application/yaml", "text/x.enum")
# The fields of the API's Schema (an OpenAPI 3.0 subset), in both spellings through ``_camel``.
_SCHEMA_FIELDS = frozenset(
    {
        "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
        "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
        "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum", "maximum",
    }
)  # fmt: skip
_TYPE_ENUM = "type.googleapis.com/google.ai.generativelanguage.v1beta.Type"


def _schema(schema: Any, path: str, named: str) -> None:
    """A ``responseSchema`` checked as the API checks it (its words, as reported verbatim in
    public issue threads): fields outside its Schema refused by name at their JSON path
    (``properties[0].value``), types from its enum, and an OBJECT's properties non-empty and
    covering its ``required`` (named at the field's path, ``properties["a"]``)."""
    if not isinstance(schema, Mapping):
        raise BadRequest(f"Invalid value at '{path}': expected a Schema object")
    _unknown(schema, _SCHEMA_FIELDS, path)
    kind = schema.get("type")
    if isinstance(kind, list):
        raise BadRequest(
            f"Invalid JSON payload received. Unknown name \"type\" at '{path}': Proto field is not "
            "repeating, cannot start list."
        )
    if kind is not None and (not isinstance(kind, str) or kind.upper() not in _TYPES):
        raise BadRequest(f"Invalid value at '{path}.type' ({_TYPE_ENUM}), \"{kind}\"")
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    if isinstance(kind, str) and kind.upper() == "OBJECT" and not props:
        raise BadRequest(f"* GenerateContentRequest.{named}.properties: should be non-empty for OBJECT type")
    for i, name in enumerate(schema.get("required") or ()):
        if name not in props:
            raise BadRequest(f"* GenerateContentRequest.{named}.required[{i}]: property is not defined")
    for i, (key, sub) in enumerate(props.items()):
        _schema(sub, f"{path}.properties[{i}].value", f'{named}.properties["{key}"]')
    if schema.get("items") is not None:
        _schema(schema["items"], f"{path}.items", f"{named}.items")
    for i, sub in enumerate(_field(schema, "anyOf", "any_of") or ()):
        _schema(sub, f"{path}.any_of[{i}]", f"{named}.any_of[{i}]")


def _output(config: Mapping[str, Any], tools: ToolUse | None, model: str) -> OutputFormat | None:
    """The JSON document ``generationConfig`` asks for (None: text): ``responseMimeType``
    ``application/json``, with a ``responseSchema`` (the API's Schema, checked) or a
    ``responseJsonSchema`` (full JSON Schema), or neither. Gemini holds decoding to a schema, so
    the document never breaks it; before Gemini 3, function calling and JSON do not combine."""
    mime = _field(config, "responseMimeType", "response_mime_type")
    schema = _field(config, "responseSchema", "response_schema")
    json_schema = _field(config, "responseJsonSchema", "response_json_schema")
    if mime is not None and mime not in _MIME_TYPES:
        raise BadRequest(
            "* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes are "
            "`text/plain`, `application/json`, `application/xml`, `application/yaml` and `text/x.enum`."
        )
    if schema is not None and json_schema is not None:
        raise BadRequest("response_schema must not be set when response_json_schema is set.")
    given = schema if schema is not None else json_schema
    if given is not None and mime not in ("application/json", "text/x.enum"):
        # The simulator's own words: the API's for this were not found.
        raise BadRequest(
            "* GenerateContentRequest.generation_config.response_mime_type: response_mime_type must be "
            "application/json or text/x.enum when a response schema is set."
        )
    if schema is not None:
        _schema(schema, "generation_config.response_schema", "generation_config.response_schema")
    if json_schema is not None and not isinstance(json_schema, Mapping):
        raise BadRequest("Invalid value at 'generation_config.response_json_schema': expected a JSON object")
    if mime != "application/json":
        return None  # text, or text/x.enum's bare enum value: not modelled, answered as text
    version = re.match(r"gemini-(\d+)", model)
    if tools is not None and (version is None or int(version.group(1)) < 3):
        raise BadRequest("Function calling with a response mime type: 'application/json' is unsupported")
    if given is None:
        return OutputFormat("json_object")
    return OutputFormat("json_schema", given, strict=True)


def _call_part(p: Any, where: str) -> Mapping[str, Any] | None:
    call = _part(p, "functionCall", "function_call")
    if call is not None:
        _unknown(
            call, frozenset({"name", "args", "id", "partialArgs", "willContinue"}), f"{where}.function_call"
        )
        if not isinstance(call.get("name"), str) or not call["name"]:
            raise BadRequest(f"* GenerateContentRequest.{where}.function_call.name: Name cannot be empty.")
    return call


def _response_part(p: Any, where: str) -> Mapping[str, Any] | None:
    response = _part(p, "functionResponse", "function_response")
    if response is not None:
        known = frozenset({"name", "response", "id", "parts", "willContinue", "scheduling"})
        _unknown(response, known, f"{where}.function_response")
        if not isinstance(response.get("name"), str) or not response["name"]:
            raise BadRequest(
                f"* GenerateContentRequest.{where}.function_response.name: Name cannot be empty."
            )
    return response


def _tool_use(body: Mapping[str, Any]) -> ToolUse | None:
    """The request's function declarations and its function calling config."""
    tools = body.get("tools")
    config = _field(body, "toolConfig", "tool_config")
    if tools is None:
        return None
    if isinstance(tools, Mapping):
        tools = [tools]
    if not isinstance(tools, list):
        raise BadRequest("Invalid value at 'tools': expected a list of Tool objects")
    declared: list[Tool] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise BadRequest(f"Invalid value at 'tools[{i}]': expected a Tool object")
        _unknown(tool, _TOOL_FIELDS, f"tools[{i}]")
        decls = _field(tool, "functionDeclarations", "function_declarations") or []
        for j, d in enumerate(decls if isinstance(decls, list) else [decls]):
            declared.append(_declaration(d, f"tools[{i}].function_declarations[{j}]"))
    fcc = (
        _field(config, "functionCallingConfig", "function_calling_config")
        if isinstance(config, Mapping)
        else None
    )
    mode: Mode = "auto"
    allowed: tuple[str, ...] = ()
    if isinstance(fcc, Mapping):
        _unknown(fcc, frozenset({"mode", "allowedFunctionNames"}), "tool_config.function_calling_config")
        raw = fcc.get("mode", "AUTO")
        if raw not in _MODES:
            raise BadRequest(
                f"Invalid value at 'tool_config.function_calling_config.mode' ({_MODE_TYPE}), \"{raw}\""
            )
        mode = _MODES[raw]
        names = _field(fcc, "allowedFunctionNames", "allowed_function_names")
        if names:
            where = "GenerateContentRequest.tool_config.function_calling_config.allowed_function_names"
            if raw not in ("ANY", "VALIDATED"):
                raise BadRequest(f"* {where}: allowed_function_names can only be set when mode is ANY.")
            unknown = [n for n in names if n not in {d.name for d in declared}]
            if unknown:
                raise BadRequest(
                    f"* {where}: function {unknown[0]!r} is not among the function declarations."
                )
            allowed = tuple(names)
    if not declared:
        return None  # only Google's own tools (search, code execution): nothing the model calls here
    return ToolUse(tools=tuple(declared), mode=mode, allowed=allowed)


def _declaration(d: Any, where: str) -> Tool:
    if not isinstance(d, Mapping):
        raise BadRequest(f"Invalid value at '{where}': expected a FunctionDeclaration object")
    _unknown(d, _DECLARATION_FIELDS, where)
    name = d.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise BadRequest(
            f"* GenerateContentRequest.{where}.name: Invalid function name. Must start with a letter or an "
            "underscore. Must be a-z, A-Z, 0-9, or contain underscores, dots, colons and dashes, with a "
            "maximum length of 64."
        )
    params = _field(d, "parameters", "parameters") or _field(
        d, "parametersJsonSchema", "parameters_json_schema"
    )
    params = params if isinstance(params, Mapping) else {}
    kind = params.get("type")
    if isinstance(kind, str) and kind.upper() not in _TYPES:
        raise BadRequest(
            f"Invalid value at '{where}.parameters.type' "
            f'(type.googleapis.com/google.ai.generativelanguage.v1beta.Type), "{kind}"'
        )
    description = d.get("description", "")
    return Tool(name, description if isinstance(description, str) else "", params)


class GeminiWire(Wire):
    name = "gemini"
    key_hint = "the x-goog-api-key header or the key query parameter"
    stream_content_type = b"text/event-stream"

    def api_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return headers.get("x-goog-api-key") or query.get("key") or None

    def new_id(self) -> str:
        return random_id(22)

    def call_id(self, model: str) -> str:
        """Gemini 3 gives every function call an id (to be echoed in its functionResponse);
        earlier models give none (an empty id here, and no ``id`` on the wire)."""
        version = re.match(r"gemini-(\d+)", model)
        if version is None or int(version.group(1)) < 3:
            return ""
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))

    def parse(self, body: Any, path_model: str | None, stream: bool) -> SimRequest:
        if not isinstance(body, Mapping):
            raise BadRequest("Invalid JSON payload received. Expected an object.")
        model = (path_model or "").removeprefix("models/")
        if not model:
            raise BadRequest("* GenerateContentRequest.model: unexpected model name format")
        contents = body.get("contents")
        if isinstance(contents, Mapping):  # the REST API takes a lone object for a repeated field
            contents = [contents]
        if not isinstance(contents, list) or not contents:
            raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
        transcript: list[tuple[str, str]] = []
        images: list[Image] = []
        system = _field(body, "systemInstruction", "system_instruction")
        if system is not None:
            transcript.append(("system", _parts_text(system, "system_instruction")))
        _turns(contents, transcript, images)
        _unknown(body, _FIELDS, "")
        tools = _tool_use(body)
        config = _field(body, "generationConfig", "generation_config") or {}
        if not isinstance(config, Mapping):
            raise BadRequest("Invalid value at 'generation_config': expected an object")
        _unknown(config, _CONFIG_FIELDS, "generation_config")
        output = _output(config, tools, model)
        max_tokens = _field(config, "maxOutputTokens", "max_output_tokens")
        if max_tokens is not None and not is_integer(max_tokens):
            raise BadRequest(
                f"Invalid value at 'generation_config.max_output_tokens' (TYPE_INT32), {max_tokens!r}"
            )
        if max_tokens is not None and max_tokens < 1:
            max_tokens = None  # the real API treats 0 as "unset"
        temperature = _in_range(config, "temperature", "temperature", 2.0)
        top_p = _in_range(config, "topP", "top_p", 1.0)
        seed = config.get("seed")
        if seed is not None and not is_integer(seed):
            raise BadRequest(f"Invalid value at 'generation_config.seed' (TYPE_INT32), {seed!r}")
        stop = _field(config, "stopSequences", "stop_sequences")
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
            raise BadRequest("Invalid value at 'generation_config.stop_sequences' (TYPE_STRING)")
        if stop and len(stop) > MAX_STOP:
            raise BadRequest(
                f"Unable to submit request because it has a stopSequences value of {len(stop)} but the "
                f"supported range is from 1 (inclusive) to {MAX_STOP + 1} (exclusive). "
                "Update the value and try again."
            )
        found = {
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "stop": stop,
            "seed": seed,
            "presence_penalty": _in_range(config, "presencePenalty", "presence_penalty", 2.0, -2.0),
            "frequency_penalty": _in_range(config, "frequencyPenalty", "frequency_penalty", 2.0, -2.0),
        }
        return SimRequest(
            model=model,
            transcript=tuple(transcript),
            stream=stream,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop or ()),
            params={k: v for k, v in found.items() if v is not None},
            tools=tools,
            tool_tokens=declared_tokens(tools),
            output=output,
            images=tuple(images),
        )

    def no_vision(self, req: SimRequest, image: Image) -> BadRequest:
        """Every Gemini model takes images; one profiled without vision refuses them in the words
        the API uses for features a model lacks (the simulator's own application of them)."""
        return BadRequest(f"Image input modality is not enabled for models/{req.model}")

    def missing_key(self, request_id: str) -> tuple[int, bytes]:
        # Not 401: the API refuses an anonymous caller with 403 PERMISSION_DENIED.
        message = (
            "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API."
        )
        return 403, dumps({"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}})

    def invalid_key(self, key: str, request_id: str) -> tuple[int, bytes]:
        # Not 401 either: a wrong key is a 400 INVALID_ARGUMENT whose ErrorInfo says API_KEY_INVALID,
        # and the key is never echoed.
        message = "API key not valid. Please pass a valid API key."
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {
                "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                "locale": "en-US",
                "message": message,
            },
        ]
        body = {"code": 400, "message": message, "status": "INVALID_ARGUMENT", "details": details}
        return 400, dumps({"error": body})

    def refused(self, param: str, model: str) -> BadRequest:
        # In the words the API uses for features a model lacks ("Penalty is not enabled for models/...").
        return BadRequest(f"{_NAMES.get(param, param)} is not enabled for models/{model}")

    def error(
        self, kind: Err, message: str, request_id: str, param: str | None = None, code: str | None = None
    ) -> bytes:
        return dumps({"error": {"code": kind.value, "message": message, "status": _STATUS[kind]}})

    def rate_limited(
        self, model: str, retry_after_s: float | None, request_id: str, now: float
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """No header: the API puts the wait in the body, a ``google.rpc.RetryInfo`` among the error's
        details (its ``retryDelay`` a protobuf JSON duration), after the ``QuotaFailure`` naming
        the spent quota and a ``Help`` link, as in the 429 bodies the API sends."""
        message = self.fault_message(Err.RATE_LIMIT, model, retry_after_s)
        error: dict[str, Any] = {"code": 429, "message": message, "status": _STATUS[Err.RATE_LIMIT]}
        if retry_after_s is not None:
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                            "quotaDimensions": {"location": "global", "model": model},
                            "quotaValue": "60",  # nominal: the simulator enforces no quota
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [
                        {
                            "description": "Learn more about Gemini API quotas",
                            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": proto_duration(retry_after_s),
                },
            ]
        return [], dumps({"error": error})

    def fault_message(self, kind: Err, model: str, retry_after_s: float | None) -> str:
        if kind is Err.RATE_LIMIT:
            if retry_after_s is not None:
                return (
                    "You exceeded your current quota, please check your plan and billing details. "
                    f"(simulated, model {model})\nPlease retry in {retry_after_s:g}s."
                )
            return f"Resource has been exhausted (e.g. check quota). (simulated, model {model})"
        if kind is Err.UNAVAILABLE:
            return "The model is overloaded. Please try again later. (simulated)"
        return (
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting (simulated)"
        )

    @staticmethod
    def _usage(req: SimRequest, c: Completion, candidates: int | None) -> dict[str, Any]:
        usage: dict[str, Any] = {"promptTokenCount": c.prompt_tokens}
        if candidates:
            usage["candidatesTokenCount"] = candidates
        usage["totalTokenCount"] = c.prompt_tokens + (candidates or 0)
        if c.cached_tokens:
            usage["cachedContentTokenCount"] = c.cached_tokens
        # The prompt by modality, as the API reports it: the images apart from the text.
        images = sum(i.tokens for i in req.images)
        details = [{"modality": "TEXT", "tokenCount": c.prompt_tokens - images}]
        if images:
            details.append({"modality": "IMAGE", "tokenCount": images})
        usage["promptTokensDetails"] = details
        return usage

    @staticmethod
    def _refusal_candidate() -> dict[str, Any]:
        """A refusal: Gemini blocks the answer for safety, with no content and the rating that
        blocked it."""
        rating = {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
        return {"finishReason": "SAFETY", "index": 0, "safetyRatings": [rating]}

    @staticmethod
    def _calls_candidate(c: Completion) -> dict[str, Any]:
        """A candidate carrying the calls as functionCall parts, or, when the model wrote one's
        arguments as malformed JSON, no content and finish reason MALFORMED_FUNCTION_CALL (the
        API parses the model's call itself and reports one it cannot parse that way)."""
        bad = next((k for k in c.calls if k.args is None), None)
        if bad is not None:
            message = f"Malformed function call: {bad.name}({bad.arguments})"
            return {
                "content": {},
                "finishReason": "MALFORMED_FUNCTION_CALL",
                "index": 0,
                "finishMessage": message,
            }
        parts = []
        for k in c.calls:
            call: dict[str, Any] = {"name": k.name, "args": k.args}
            if k.id:
                call = {"id": k.id} | call
            parts.append({"functionCall": call})
        content = {"parts": parts, "role": "model"}
        return {"content": content, "finishReason": "STOP", "index": 0, "finishMessage": _CALLED}

    def _chunk(self, req: SimRequest, c: Completion, text: str, final: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
        if final:
            candidate["finishReason"] = _FINISH[c.finish]
        candidate["index"] = 0
        if final and c.calls:
            candidate = self._calls_candidate(c)
        if c.refused:
            candidate = self._refusal_candidate()
        return {
            "candidates": [candidate],
            "usageMetadata": self._usage(req, c, c.completion_tokens if final else None),
            "modelVersion": req.model,
            "responseId": c.id,
        }

    def response(self, req: SimRequest, c: Completion) -> bytes:
        return dumps(self._chunk(req, c, c.text, final=True))

    def stream_head(self, req: SimRequest, c: Completion) -> bytes:
        return b""

    def stream_delta(self, req: SimRequest, c: Completion, piece: str, last: bool) -> bytes:
        # The real stream puts the finish reason on the chunk with the last text, and the usage so
        # far on every chunk (candidatesTokenCount growing: tests/fixtures/providers/gemini/
        # stream_captured.sse), the whole usage on the last.
        c.streamed += piece
        chunk = self._chunk(req, c, piece, final=last)
        if not last:
            so_far = approx_tokens(c.streamed)
            usage = chunk["usageMetadata"]
            usage["candidatesTokenCount"] = so_far
            usage["totalTokenCount"] = c.prompt_tokens + so_far
            usage["promptTokensDetails"] = usage.pop("promptTokensDetails")  # the API's key order
        return sse(chunk).replace(b"\n\n", b"\r\n\r\n")

    def stream_events(self, req: SimRequest, c: Completion) -> list[tuple[str, bytes]]:
        """A refusal is one blocked event (finish reason SAFETY, no content); anything else streams
        as usual."""
        if c.refused:
            return [(c.text, sse(self._chunk(req, c, "", final=True)).replace(b"\n\n", b"\r\n\r\n"))]
        return super().stream_events(req, c)

    def call_events(self, req: SimRequest, c: Completion) -> list[tuple[str, bytes]]:
        """Gemini streams a model's calls whole: one event with every functionCall part, the
        finish reason and the whole usage (tests/fixtures/providers/gemini/function_call.stream.sse)."""
        if not c.calls:
            return []
        said = "".join(k.name + k.arguments for k in c.calls)
        return [(said, sse(self._chunk(req, c, "", final=True)).replace(b"\n\n", b"\r\n\r\n"))]

    def stream_tail(self, req: SimRequest, c: Completion) -> bytes:
        if c.text or c.calls:
            return b""  # already sent with the last piece
        return sse(self._chunk(req, c, "", final=True)).replace(b"\n\n", b"\r\n\r\n")
