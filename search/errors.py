"""What a refused search or upload answers: the status and reason for each error the
search services raise. The API's error handler (``portal.errors``) and the pages use it."""

from django.core.exceptions import ObjectDoesNotExist

from embeddings.core.siglip import ModelNotAvailable
from embeddings.services import NoActiveModel
from search.cursors import InvalidCursor
from search.validation import InvalidUpload


class InvalidQuery(ValueError):
    """A query (its text, filters, threshold or size) the caller must fix; the message says how."""


REFUSED = (InvalidQuery, InvalidUpload, InvalidCursor, ObjectDoesNotExist, NoActiveModel, ModelNotAvailable)


def refusal(exc: Exception) -> tuple[int, str] | None:
    """(HTTP status, reason) for an error of the search services; None for any other."""
    if isinstance(exc, (InvalidQuery, InvalidUpload, InvalidCursor)):
        return 400, str(exc)
    if isinstance(exc, ObjectDoesNotExist):
        return 404, str(exc) or "Not found."
    if isinstance(exc, (NoActiveModel, ModelNotAvailable)):
        return 503, str(exc)
    return None
