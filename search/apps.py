from django.apps import AppConfig


class SearchConfig(AppConfig):
    name = "search"

    def ready(self):
        # Project wiring, in one place: the pure index backends and the serving cache get
        # what they need from Django and Celery here, so neither imports them.
        from search import index_sync, serving, tasks
        from search.core.vector_index import pgvector

        pgvector.set_connection_provider(index_sync.database_connection)
        serving.loaded_indices.on_unusable = lambda model: tasks.schedule_index_sync(model.pk)
