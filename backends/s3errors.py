"""S3 errors as result codes, and as one line a user can read.

obstore raises after its own bounded retries; the text of its exceptions
carries the HTTP status, the S3 error document (``<Code>``) when the server
sent one (never for HEAD), and for network failures the kind of failure.
The mapping (docs/s3.md, "What each S3 answer does"):

=====================================================  ========================
S3 answer                                              result code
=====================================================  ========================
412 PreconditionFailed (If-Match: the ETag changed;    FILE_MODIFIED_EXTERNALLY
If-None-Match: * on a PUT: the object exists)
404 NoSuchKey (the object is gone)                     FILE_MODIFIED_EXTERNALLY
409 on a conditional PUT (ConditionalRequestConflict: FAILURE
another write raced it), OperationAborted,
404 NoSuchUpload (the upload was aborted meanwhile)
416 InvalidRange (the range starts past the end)       RANGE_BEYOND_EOF
404 NoSuchBucket                                       PERMANENT_FAILURE
InvalidAccessKeyId, SignatureDoesNotMatch, expired     PERMANENT_FAILURE
or invalid token, 401, wrong region / redirect
no connection: refused, DNS, connect timeout           PERMANENT_FAILURE
403 AccessDenied, any other 4xx (e.g. archived object) FILE_FAILURE
5xx, 429, SlowDown, RequestTimeout, timeouts, resets   FAILURE
=====================================================  ========================
"""

from __future__ import annotations

import re

from obstore.exceptions import AlreadyExistsError, PreconditionError

from cachefs.contract import RWResult

_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")
_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_REQUEST = re.compile(r"Error performing (\w+) (\S+?)(?: in [\d.]+\w+)?(?:,|\s-|$)")
_RETRIES = re.compile(r"after (\d+) retries")
_OS_MESSAGE = re.compile(r'message: "([^"]+)"')
# No connection could be made: refused, no route, DNS, or the connect timed out.
_CONNECT = re.compile(r"kind: Connect\b|ConnectError\(|dns error", re.I)
_TIMEOUT = re.compile(r"kind: Timeout\b|timed out|TimedOut", re.I)

# The storage as a whole refuses us: no retry helps until someone acts.
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "AllAccessDisabled",
        "RequestTimeTooSkewed",
    }
)
REGION_CODES = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed"})
STORAGE_CODES = CREDENTIAL_CODES | REGION_CODES | {"NoSuchBucket", "InvalidBucketName"}
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        # writes: another conditional write raced this one; the retry finds out who won
        "ConditionalRequestConflict",
        "OperationAborted",
        # the multipart upload is gone (aborted meanwhile): the retry starts another
        "NoSuchUpload",
    }
)


def http_status(e: BaseException) -> int | None:
    m = _STATUS.search(str(e))
    return int(m.group(1)) if m else None


def error_code(e: BaseException) -> str | None:
    """The ``<Code>`` of the S3 error document, if the server sent one."""
    m = _CODE.search(str(e))
    return m.group(1) if m else None


def result_for(e: BaseException) -> tuple[RWResult, str]:
    """The result code for a failed request, and its one-line reason."""
    status, code = http_status(e), error_code(e)
    conditional = isinstance(e, PreconditionError | AlreadyExistsError)
    if status == 412 or (conditional and code not in TRANSIENT_CODES and status != 409):
        rc = RWResult.FILE_MODIFIED_EXTERNALLY
    elif code in STORAGE_CODES or status in (301, 307, 401):
        rc = RWResult.PERMANENT_FAILURE
    elif (
        code in TRANSIENT_CODES
        or status == 429
        or (status is not None and status >= 500)
        or (conditional and status == 409)
    ):
        rc = RWResult.FAILURE
    elif status == 404 or (status is None and isinstance(e, FileNotFoundError)):
        rc = RWResult.FILE_MODIFIED_EXTERNALLY
    elif status == 416:
        rc = RWResult.RANGE_BEYOND_EOF
    elif status is not None and 400 <= status < 500:
        rc = RWResult.FILE_FAILURE
    elif status is None and _CONNECT.search(str(e)):
        rc = RWResult.PERMANENT_FAILURE
    else:
        rc = RWResult.FAILURE
    return rc, describe(e)


def describe(e: BaseException) -> str:
    """One line: the request, then the status and S3 code, or the network failure."""
    text = str(e)
    head = text.split("\n\nDebug source", 1)[0]
    request = _REQUEST.search(head)
    where = f"{request.group(1)} {request.group(2)}: " if request else ""
    status, code = http_status(e), error_code(e)
    if status is not None:
        message = _MESSAGE.search(text)
        out = f"HTTP {status}"
        if code:
            out += f" {code}"
        if message and message.group(1):
            out += f" ({message.group(1)})"
        return where + out
    retries = _RETRIES.search(head)
    after = f" after {retries.group(1)} retries" if retries else ""
    if _CONNECT.search(text):
        os_message = _OS_MESSAGE.search(text)
        if os_message:
            why = os_message.group(1)
        else:
            why = "connecting timed out" if _TIMEOUT.search(text) else "cannot connect"
        return f"{where}{why}{after}"
    if _TIMEOUT.search(text):
        return f"{where}timed out{after}"
    if request:
        detail = head.rsplit(" - ", 1)[-1].strip()
        return f"{where}{detail}{after}"
    first = " ".join(head.split())
    return first if len(first) <= 300 else first[:297] + "..."


def os_error(e: BaseException, what: str) -> OSError:
    """A one-line OSError for metadata calls: the engine logs it and serves
    what it has cached.  Never a PermissionError, even for a 403: the engine
    takes that as the source's final word (EACCES, nothing stale served),
    which is right for a file's mode, not for credentials that may expire."""
    _, reason = result_for(e)
    return OSError(f"{what}: {reason}")
