from django.db import DatabaseError

from embeddings.models import EmbeddingModel


def active_model(request):
    try:
        return {"active_model": EmbeddingModel.active()}
    except DatabaseError:
        return {"active_model": None}
