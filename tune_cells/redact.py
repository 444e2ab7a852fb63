"""Credentials out of everything shown or logged: a URI keeps its user, never its password."""

from __future__ import annotations

import logging
import re

# scheme://user:password@ anywhere in a text; the password runs to the last '@' before the host
# (an unescaped '@' in it is how people type them), never across a '/' or a space.
_PASSWORD_IN_URI = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):(?P<password>[^\s/]*)@")


def without_credentials(value):
    """`value` with every URI's password replaced (`https://user:secret@host` → `https://user:***@host`):
    parameters are visible to everyone who can read the store. Non-strings are returned as they are."""
    if not isinstance(value, str) or "://" not in value:
        return value
    return _PASSWORD_IN_URI.sub(lambda match: f"{match['head']}:***@", value)


class CredentialFilter(logging.Filter):
    """Masks passwords in URIs in every record a handler writes (an exception message from a
    library may quote the tracking URI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = without_credentials(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:  # the traceback -v shows; formatters reuse exc_text
            record.exc_text = without_credentials(logging.Formatter().formatException(record.exc_info))
        return True
