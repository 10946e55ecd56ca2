from django.contrib import admin, messages

from search.tasks import rebuild_indices

from embeddings.models import EmbeddingModel


@admin.register(EmbeddingModel)
class EmbeddingModelAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "source", "dimension", "image_size", "is_active", "created"]
    readonly_fields = ["dimension", "image_size", "created"]
    actions = ["activate", "rebuild"]

    @admin.action(description="Make active (one model at a time)")
    def activate(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Choose exactly one model.", messages.ERROR)
            return
        queryset.get().activate()
        self.message_user(request, "Activated. Assets without vectors for it need embedding: "
                                   "run `manage.py embed_missing`.")

    @admin.action(description="Rebuild its indices from stored vectors")
    def rebuild(self, request, queryset):
        for model in queryset:
            rebuild_indices.delay(model.pk)
        self.message_user(request, "Rebuild queued.")
