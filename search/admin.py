"""The admin: curators upload (one image or many), edit captions, delete, set who sees each
collection; staff manage embedding models."""

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Count, OuterRef, Subquery
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.utils.html import format_html

from embeddings.models import EmbeddingModel
from search import archives, curation, tasks, validation
from search.api.access import UploadThrottle, check_throttles
from search.locking import lock_assets
from search.models import Caption, Collection, ImageAsset, IndexBuild, normalise_text


class CaptionFormSet(forms.BaseInlineFormSet):
    def clean(self):
        super().clean()
        seen = set()
        if self.instance.pk:
            kept = {f.instance.pk for f in self.forms if f.instance.pk}
            seen = set(Caption.objects.filter(asset=self.instance).exclude(pk__in=kept)
                       .values_list("normalized_text", flat=True))
        for form in self.forms:
            if not form.cleaned_data or form.cleaned_data.get("DELETE"):
                continue
            key = normalise_text(form.cleaned_data.get("text", ""))
            if key in seen:
                form.add_error("text", "The same caption is given twice.")
            seen.add(key)


class CaptionInline(admin.TabularInline):
    model = Caption
    formset = CaptionFormSet
    fields = ["text"]
    extra = 3


class ImageAssetAddForm(forms.ModelForm):
    """The add form takes the image through the same checks as every upload."""

    image = forms.FileField(help_text="JPEG, PNG, GIF, WebP, BMP or TIFF.")

    class Meta:
        model = ImageAsset
        fields = ["collection"]

    def clean_image(self):
        upload = self.cleaned_data["image"]
        try:
            data = validation.read_upload(upload)
            self.image_info = validation.inspect_image(data)
        except validation.InvalidUpload as exc:
            raise ValidationError(str(exc)) from exc
        self.image_bytes, self.image_name = data, upload.name
        return upload


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        if isinstance(data, (list, tuple)):
            return [super(MultipleFileField, self).clean(d, initial) for d in data]
        return [super().clean(data, initial)] if data else []


class BulkUploadForm(forms.Form):
    images = MultipleFileField(required=False, label="Image files")
    archive = forms.FileField(required=False, label="…or a zip of images",
                              help_text="May hold captions.json ({\"a.jpg\": [\"…\"]}) or captions.tsv (file<TAB>caption).")
    captions = forms.FileField(required=False, label="Captions file",
                               help_text="captions.json or captions.tsv for the image files above.")
    collection = forms.CharField(required=False, max_length=100)

    def clean(self):
        data = super().clean()
        if not data.get("images") and not data.get("archive"):
            raise ValidationError("Choose image files or a zip archive.")
        return data


@admin.register(ImageAsset)
class ImageAssetAdmin(admin.ModelAdmin):
    list_display = ["id", "thumbnail", "original_name", "collection", "status", "width", "height", "created"]
    list_filter = ["status", "collection", "format"]
    search_fields = ["original_name", "captions__text", "sha256"]
    readonly_fields = ["thumbnail", "sha256", "width", "height", "format", "status", "error", "uploaded_by", "created"]
    inlines = [CaptionInline]
    editable_fields = ["collection"]
    actions = ["reembed"]
    change_list_template = "admin/search/imageasset/change_list.html"

    @admin.display(description="image")
    def thumbnail(self, obj):
        return format_html('<img src="{}" style="height:48px">', obj.file.url) if obj.file else ""

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ImageAssetAddForm
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["image", "collection"]
        return ["thumbnail", "collection", "sha256", "width", "height", "format", "status", "error", "uploaded_by", "created"]

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.readonly_fields

    def save_model(self, request, obj, form, change):
        if change:
            # The asset row first, as every writer does (search/locking.py); saving a row
            # deleted meanwhile would insert it again, without its file.
            if not lock_assets([obj.pk]):
                raise ImageAsset.DoesNotExist(f"{obj} was deleted while it was being edited; nothing was saved.")
            # Only what the form edits: the rest of the row (status, error) was read before the
            # lock and may have changed since (the worker marks it embedded, say).
            changed = [f for f in form.changed_data if f in self.editable_fields]
            if "collection" in changed:
                curation.ensure_collection(obj.collection)
            if changed:
                # ``updated`` too: update_fields would leave the auto_now field unsaved.
                obj.save(update_fields=[*changed, "updated"])
            return None
        result = curation.ingest_image(form.image_bytes, [], original_name=form.image_name,
                                     user=request.user, collection=form.cleaned_data.get("collection", ""))
        # Embedding is queued once the inline captions are saved too (save_formset).
        # The admin keeps using `obj`: make it the stored row.
        for field in ImageAsset._meta.concrete_fields:
            setattr(obj, field.attname, getattr(result.asset, field.attname))
        obj._state = result.asset._state
        if not result.created:
            messages.info(request, "This image was already in the collection; its captions were added to it.")

    def save_formset(self, request, form, formset, change):
        if change:
            self._save_caption_changes(form.instance, formset)
            return
        texts = [f.cleaned_data["text"] for f in formset.forms
                 if f.cleaned_data and not f.cleaned_data.get("DELETE") and f.cleaned_data.get("text")]
        result = curation.add_captions(form.instance, texts, created=True)
        tasks.queue_follow_ups(result)
        # What the admin's history message reads.
        formset.new_objects, formset.changed_objects, formset.deleted_objects = result.new_captions, [], []

    def _save_caption_changes(self, asset, formset):
        """The inline's additions, edits and removals, through the same service (and lock) as
        every other writer of captions."""
        add, edit, remove = [], {}, []
        for caption_form in formset.forms:
            data = getattr(caption_form, "cleaned_data", None) or {}
            caption = caption_form.instance
            if caption.pk is None:
                if data.get("text") and not data.get("DELETE"):
                    add.append(data["text"])
            elif data.get("DELETE"):
                remove.append(caption.pk)
            elif caption_form.has_changed() and data.get("text"):
                edit[caption.pk] = data["text"]
        changes = curation.update_captions(asset, add=add, edit=edit, remove=remove)
        tasks.queue_follow_ups(changes)
        # What the admin's history message reads.
        formset.new_objects, formset.deleted_objects = changes.added, changes.removed
        formset.changed_objects = [(caption, ["text"]) for caption in changes.edited]

    def delete_model(self, request, obj):
        self.delete_queryset(request, ImageAsset.objects.filter(pk=obj.pk))

    def delete_queryset(self, request, queryset):
        if curation.delete_assets(queryset):
            tasks.schedule_index_syncs()

    @admin.action(description="Embed again (missing vectors only)")
    def reembed(self, request, queryset):
        tasks.queue_embedding(*queryset.values_list("pk", flat=True))

    def get_urls(self):
        return [
            path("bulk-upload/", self.admin_site.admin_view(self.bulk_upload), name="search_imageasset_bulk"),
        ] + super().get_urls()

    def bulk_upload(self, request):
        if not self.has_add_permission(request):
            return redirect("admin:index")
        if request.method == "POST":
            wait = check_throttles(request, [UploadThrottle])
            if wait is not None:
                messages.error(request, f"Too many uploads; try again in {int(wait) + 1} seconds.")
                return redirect(reverse("admin:search_imageasset_bulk"))
        form = BulkUploadForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            try:
                # Read one at a time by ingest_many, never all at once.
                files = [(f.name, f) for f in form.cleaned_data["images"]]
                captions = {}
                if form.cleaned_data.get("archive"):
                    archived, captions = archives.files_from_zip(
                        validation.read_upload(form.cleaned_data["archive"], limit=settings.UPLOAD_MAX_ARCHIVE_BYTES))
                    files += archived
                if form.cleaned_data.get("captions"):
                    upload = form.cleaned_data["captions"]
                    captions.update(archives.captions_from_file(upload.name, validation.read_upload(upload)))
                result = curation.ingest_many(files, captions, user=request.user,
                                            collection=form.cleaned_data.get("collection") or "")
                tasks.queue_follow_ups(result)
            except validation.InvalidUpload as exc:
                form.add_error(None, str(exc))
            else:
                if result.errors and not (result.created or result.existing):
                    for error in result.errors:  # nothing landed: show the form again with the reasons
                        form.add_error(None, error)
            if not form.errors:
                messages.success(request, f"{len(result.created)} images added, {len(result.existing)} already present.")
                for error in result.errors:
                    messages.error(request, error)
                return redirect(reverse("admin:search_imageasset_changelist"))
        context = {**self.admin_site.each_context(request), "form": form, "title": "Bulk upload images",
                   "opts": self.model._meta, "max_files": settings.UPLOAD_MAX_FILES}
        return render(request, "admin/search/imageasset/bulk_upload.html", context,
                      status=400 if request.method == "POST" else 200)

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            response = super().changeform_view(request, object_id, form_url, extra_context)
        except ImageAsset.DoesNotExist as exc:  # deleted by someone else meanwhile; nothing was kept
            messages.error(request, str(exc))
            return redirect(reverse("admin:search_imageasset_changelist"))
        except validation.InvalidUpload as exc:  # a caption another writer added meanwhile, say
            messages.error(request, f"Nothing was saved: {exc}")
            return redirect(request.path)
        if request.method == "POST" and response.status_code == 200:
            response.status_code = 400  # the form came back with its errors: the input was refused
        return response


@admin.register(Collection)
class CollectionAdmin(admin.ModelAdmin):
    """Who may see each collection. The name is fixed once the row exists and a collection
    that still has pictures cannot be deleted: either would leave its pictures without a row,
    and a picture without a row is public."""

    list_display = ["__str__", "visibility", "pictures", "created"]
    list_editable = ["visibility"]
    list_filter = ["visibility"]
    search_fields = ["name", "description"]

    def get_queryset(self, request):
        pictures = (ImageAsset.objects.filter(collection=OuterRef("name")).order_by()
                    .values("collection").annotate(n=Count("pk")).values("n"))
        return super().get_queryset(request).annotate(n_pictures=Subquery(pictures))

    @admin.display(description="pictures", ordering="n_pictures")
    def pictures(self, obj):
        return obj.n_pictures or 0

    def get_readonly_fields(self, request, obj=None):
        return ["name", "created"] if obj is not None else ["created"]

    def has_delete_permission(self, request, obj=None):
        if obj is not None and ImageAsset.objects.filter(collection=obj.name).exists():
            return False
        return super().has_delete_permission(request, obj)

    def delete_queryset(self, request, queryset):
        # The bulk action too: only the rows whose collection has no picture left.
        used = ImageAsset.objects.filter(collection__in=queryset.values("name")).values("collection")
        kept = queryset.filter(name__in=used).count()
        queryset.exclude(name__in=used).delete()
        if kept:
            self.message_user(request, f"{kept} collections still have pictures and were kept.", messages.WARNING)


@admin.register(IndexBuild)
class IndexBuildAdmin(admin.ModelAdmin):
    list_display = ["model", "modality", "version", "backend", "vector_count", "status", "created"]
    list_filter = ["modality", "status", "backend"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


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
            tasks.rebuild_indices_task.delay(model.pk)
        self.message_user(request, "Rebuild queued.")
