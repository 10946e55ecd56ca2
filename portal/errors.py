"""Every API error is JSON with a reason: {"detail": "..."}; never a 500 for bad input."""

from django.core.exceptions import (
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from portal.middleware import UNAVAILABLE, log_unavailable, unavailable_status
from search.errors import refusal


def exception_handler(exc, context):
    refused = refusal(exc)
    if refused is not None:
        return Response({"detail": refused[1]}, status=refused[0])
    if isinstance(exc, UNAVAILABLE):
        code, reason, wait = unavailable_status(exc)
        log_unavailable(context["request"], exc, code)
        return Response({"detail": reason}, status=code, headers={"Retry-After": str(wait)})
    if isinstance(exc, RequestDataTooBig):
        return Response({"detail": "The request body is larger than allowed."},
                        status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, (TooManyFilesSent, TooManyFieldsSent)):
        return Response({"detail": f"The request was refused: {exc}"}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, SuspiciousOperation):
        return Response({"detail": "The request was refused: it is malformed or not allowed."},
                        status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, UnicodeError):  # lone surrogates and the like, sent as JSON escapes
        return Response({"detail": "The request contains text that is not valid Unicode."},
                        status=status.HTTP_400_BAD_REQUEST)
    return drf_exception_handler(exc, context)
