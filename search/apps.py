from django.apps import AppConfig
from django.conf import settings


def milvus_server(alias: str) -> dict | None:
    """The Milvus server of the milvus backend's connection ``alias`` (only "default":
    ``settings.MILVUS_URI``); None when none is configured."""
    if alias != "default" or not settings.MILVUS_URI:
        return None
    return {"uri": settings.MILVUS_URI, "token": settings.MILVUS_TOKEN}


class SearchConfig(AppConfig):
    name = "search"

    def ready(self):
        # Project wiring, in one place: the pure index backends and the serving cache get
        # what they need from Django and Celery here, so neither imports them.
        from search import index_sync, serving, tasks
        from search.core.vector_index import milvus, pgvector

        pgvector.set_connection_provider(index_sync.database_connection)
        milvus.set_server_provider(milvus_server)
        serving.loaded_indices.on_unusable = lambda model: tasks.schedule_index_sync(model.pk)
