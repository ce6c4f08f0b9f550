"""ListTrials' page tokens: opaque to clients, a trial number and its study inside."""

from __future__ import annotations

import base64
import binascii
import json

from services.common.errors import InvalidArgument

__all__ = ["MAX_TRIAL_PAGE", "page_token", "read_page_token"]

# The most trials one ListTrials page holds.
MAX_TRIAL_PAGE = 1000
# A token is tens of characters; anything far longer is not one of ours.
_MAX_TOKEN = 512


def page_token(study_id: str, last: int) -> str:
    """The token of the page after trial `last` of `study_id`."""
    content = json.dumps({"study": study_id, "after": last}, separators=(",", ":"))
    return base64.urlsafe_b64encode(content.encode()).decode().rstrip("=")


def read_page_token(token: str, study_id: str) -> int:
    """The trial number a page starts after (-1 for no token).

    Raises:
        InvalidArgument: on `page_token`, for a token this service did not write, or one
            written for another study.
    """
    if not token:
        return -1
    try:
        if len(token) > _MAX_TOKEN:
            raise ValueError("too long")
        padded = token + "=" * (-len(token) % 4)
        content = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = content["after"]
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ValueError("no trial number")
        if content["study"] != study_id:
            raise InvalidArgument("is a token of another study's trials", field="page_token")
    except InvalidArgument:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            "is not a token of a previous ListTrials answer", field="page_token"
        ) from None
    return after
