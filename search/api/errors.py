"""Every API error is JSON with a reason: {"detail": "..."}; never a 500 for bad input."""

from django.core.exceptions import ObjectDoesNotExist
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from embeddings.services import ModelNotAvailable, NoActiveModel
from search.ingest import InvalidUpload
from search.queries import InvalidQuery


def exception_handler(exc, context):
    if isinstance(exc, (InvalidQuery, InvalidUpload)):
        return Response({"detail": str(exc)}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, ObjectDoesNotExist):
        return Response({"detail": str(exc) or "Not found."}, status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, (NoActiveModel, ModelNotAvailable)):
        return Response({"detail": str(exc)}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
    return drf_exception_handler(exc, context)
