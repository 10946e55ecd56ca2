from django.db import DatabaseError

from embeddings.models import EmbeddingModel


def active_model_context(request):
    """The active model for every page (its name in the header), or none while the database is away."""
    try:
        return {"active_model": EmbeddingModel.active()}
    except DatabaseError:
        return {"active_model": None}
