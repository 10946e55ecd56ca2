from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from embeddings.services import NoActiveModel
from evaluation import datasets, services, tasks
from evaluation.forms import BenchmarkRunAdminForm
from evaluation.models import BenchmarkRun


@admin.register(BenchmarkRun)
class BenchmarkRunAdmin(admin.ModelAdmin):
    list_display = ["id", "created", "kind", "dataset", "split", "gallery_images", "model_name",
                    "status", "progress", "t2i_r1", "i2t_r1", "page"]
    list_filter = ["status", "kind", "dataset", "model_name"]
    search_fields = ["dataset", "dataset_path", "collection", "model_name", "error"]
    actions = ["run_again"]

    @admin.display(description="T→I R@1")
    def t2i_r1(self, obj):
        value = (obj.text_to_image or {}).get("recall@1")
        return "—" if value is None else f"{100 * value:.1f}"

    @admin.display(description="I→T R@1")
    def i2t_r1(self, obj):
        value = (obj.image_to_text or {}).get("recall@1")
        return "—" if value is None else f"{100 * value:.1f}"

    @admin.display(description="page")
    def page(self, obj):
        return format_html('<a href="{}">details</a>', reverse("benchmark-detail", args=[obj.pk]))

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = BenchmarkRunAdminForm
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["dataset", "path", "split", "limit", "collection", "model"]
        return [f.name for f in BenchmarkRun._meta.fields if f.name != "id"]

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.get_fields(request, obj)

    def has_change_permission(self, request, obj=None):
        # Runs are records: viewable, deletable, not editable.
        return obj is None and super().has_change_permission(request, obj)

    def save_model(self, request, obj, form, change):
        if change:
            return
        prepared = form.prepared
        prepared.requested_by = request.user
        for field in BenchmarkRun._meta.concrete_fields:
            setattr(obj, field.attname, getattr(prepared, field.attname))
        tasks.queue_benchmark(obj)
        messages.info(request, "The benchmark is queued; follow it on the benchmarks page.")

    def save_related(self, request, form, formsets, change):
        pass

    @admin.action(description="Run again with the same dataset and parameters (active model)")
    def run_again(self, request, queryset):
        queued = 0
        for run in queryset:
            try:
                tasks.queue_benchmark(services.rerun_of(run, user=request.user))
                queued += 1
            except (datasets.DatasetError, NoActiveModel) as exc:
                self.message_user(request, f"Run {run.pk}: {exc}", messages.ERROR)
        if queued:
            self.message_user(request, f"{queued} benchmark run(s) queued.")
