"""Reading a ``multipart/form-data`` upload (``POST /v1/files``) as it streams in: its one file
part written to disk, its other fields kept (small), every size bounded before it is exceeded.

The service takes uploads of up to ``batch.max_file_bytes`` (100 MB by default): read whole into
memory, one upload would hold that much, and a few at once far more. Here no more than one chunk
and a boundary's length is in memory at a time, whatever the file's size, and an upload larger
than the bound is refused (413) as soon as the bytes past it arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from moa.api.errors import ApiError

# A part's headers, and a field that is not the file: small, or the upload is not one of ours.
MAX_HEADER_BYTES = 16 * 1024
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16


def bad_upload(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_request", param)


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The file is larger than this service takes ({limit} bytes).",
        "invalid_request_error",
        "file_too_large",
    )


@dataclass
class Upload:
    """What the form held: its fields, and its file (where it was written, its name and size)."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0


def boundary_of(content_type: str | None) -> bytes:
    """The boundary a ``multipart/form-data`` content type names; 400 for any other type."""
    msg = email.message.Message()
    msg["content-type"] = content_type or ""
    boundary = msg.get_param("boundary")
    if msg.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise bad_upload("Send the file as multipart/form-data (fields 'file' and 'purpose').")
    if len(boundary) > 200:
        raise bad_upload("The multipart boundary is too long.")
    return boundary.encode("latin-1")


def _disposition(head: bytes) -> tuple[str, str | None]:
    """A part's field name and file name, from its headers."""
    msg = email.message.Message()
    # Clients write a non-ASCII file name as its UTF-8 bytes (as browsers do), or RFC 2231-encoded.
    for line in head.decode("utf-8", errors="replace").split("\r\n"):
        header, sep, value = line.partition(":")
        if sep:
            msg[header.strip()] = value.strip()
    name = msg.get_param("name", header="content-disposition")
    if msg.get_content_disposition() != "form-data" or not isinstance(name, str):
        raise bad_upload("A part of the form has no form-data name.")
    filename = msg.get_filename()
    return name, filename


class FormReader:
    """Parses the form from its chunks (``feed``), writing the part named ``file_field`` to
    ``out``: at most ``max_file_bytes`` of it."""

    def __init__(self, boundary: bytes, file_field: str, out: BinaryIO, max_file_bytes: int) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.file_field, self.out, self.max_file_bytes = file_field, out, max_file_bytes
        self.upload = Upload()
        # The body starts with the first delimiter, without its leading CRLF (read as if it had one).
        self._buf = bytearray(b"\r\n")
        self._state = "preamble"  # preamble, after (a delimiter), head, body, end
        self._part: str | None = None
        self._value = bytearray()
        self._parts = 0

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while self._step():
            pass

    def _step(self) -> bool:
        """One move forward with what the buffer holds; False when it needs more bytes."""
        buf = self._buf
        if self._state == "preamble":
            at = buf.find(self.delimiter)
            if at < 0:
                keep = len(self.delimiter) - 1
                if len(buf) > keep:  # a preamble is allowed, and ignored
                    del buf[: len(buf) - keep]
                return False
            del buf[: at + len(self.delimiter)]
            self._state = "after"
            return True
        if self._state == "after":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = "end"
                return False
            if buf[:2] != b"\r\n":
                raise bad_upload("The multipart body is malformed.")
            del buf[:2]
            self._state = "head"
            return True
        if self._state == "head":
            at = buf.find(b"\r\n\r\n")
            if at < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise bad_upload("A part's headers are too large.")
                return False
            self._start_part(bytes(buf[:at]))
            del buf[: at + 4]
            self._state = "body"
            return True
        if self._state == "body":
            at = buf.find(self.delimiter)
            if at < 0:
                safe = len(buf) - (len(self.delimiter) - 1)  # a delimiter may start in what is kept
                if safe > 0:
                    self._content(bytes(buf[:safe]))
                    del buf[:safe]
                return False
            self._content(bytes(buf[:at]))
            del buf[: at + len(self.delimiter)]
            self._end_part()
            self._state = "after"
            return True
        return False  # end: an epilogue is allowed, and ignored

    def _start_part(self, head: bytes) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise bad_upload("The form has too many parts.")
        name, filename = _disposition(head)
        if name == self.file_field:
            if self.upload.filename is not None:
                raise bad_upload(f"The form has more than one '{self.file_field}'.", self.file_field)
            self.upload.filename = filename or "upload.jsonl"
        self._part = name
        self._value = bytearray()

    def _content(self, data: bytes) -> None:
        if self._part == self.file_field:
            self.upload.size += len(data)
            if self.upload.size > self.max_file_bytes:
                raise too_large(self.max_file_bytes)
            self.out.write(data)
        else:
            self._value += data
            if len(self._value) > MAX_FIELD_BYTES:
                raise bad_upload(f"The form field '{self._part}' is too large.", self._part)

    def _end_part(self) -> None:
        if self._part is not None and self._part != self.file_field:
            try:
                self.upload.fields[self._part] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_upload(f"The form field '{self._part}' is not UTF-8.", self._part) from None
        self._part = None

    def finish(self) -> Upload:
        if self._state != "end":
            raise bad_upload("The multipart body ends before its closing boundary.")
        return self.upload


async def read_upload(
    chunks: AsyncIterator[bytes], content_type: str | None, file_field: str, path: Path, max_file_bytes: int
) -> Upload:
    """Reads the form, writing its ``file_field`` part to ``path`` (created private, ``0600``:
    a batch's input holds its prompts). On any refusal the file is removed."""
    reader_boundary = boundary_of(content_type)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            reader = FormReader(reader_boundary, file_field, out, max_file_bytes)
            async for chunk in chunks:
                reader.feed(chunk)
            upload = reader.finish()
            out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return upload
