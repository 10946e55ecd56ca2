from django import forms
from django.core.exceptions import ValidationError

from embeddings.models import EmbeddingModel
from embeddings.services import NoActiveModel
from evaluation import datasets, services
from evaluation.models import BenchmarkRun

DATASET_CHOICES = [("auto", "detect from the file")] + [(k, datasets.KIND_LABELS[k]) for k in datasets.KINDS]


class PreparesRun:
    """``clean`` prepares the benchmark run from the form's parameters (``self.prepared``),
    or names the field a refusal belongs to."""

    user = None

    def prepare(self, data: dict, **extra) -> dict:
        if self.errors:
            return data
        try:
            self.prepared = services.prepare_run(
                dataset=data["dataset"], path=data["path"], split=data.get("split") or "",
                limit=data.get("limit"), model=data.get("model"), **extra,
            )
        except datasets.DatasetError as exc:
            raise ValidationError({"path": str(exc)}) from exc
        except NoActiveModel as exc:
            raise ValidationError({"model": str(exc)}) from exc
        return data


class LaunchFields(PreparesRun, forms.Form):
    """The parameters of a retrieval benchmark; ``clean`` prepares the run."""

    dataset = forms.ChoiceField(choices=DATASET_CHOICES, initial="auto")
    path = forms.CharField(
        max_length=500, label="Dataset path on the server",
        help_text="The JSON file (dataset_flickr30k.json, dataset_coco.json, captions_val2017.json, "
                  "dataset_synthetic.json) or the folder holding it.",
        widget=forms.TextInput(attrs={"size": 60, "placeholder": "/data/flickr30k/dataset_flickr30k.json"}),
    )
    split = forms.CharField(max_length=30, required=False, help_text="Blank: test (or the COCO file's own split).")
    limit = forms.IntegerField(min_value=1, required=False, help_text="Only the first N images of the split.")
    model = forms.ModelChoiceField(queryset=EmbeddingModel.objects.all(), required=False,
                                   empty_label="the active model")

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        self.prepared: BenchmarkRun | None = None

    def clean(self):
        return self.prepare(super().clean(), user=self.user)


class BenchmarkForm(LaunchFields):
    """The launch form of the benchmarks page."""


class BenchmarkRunAdminForm(PreparesRun, forms.ModelForm):
    """The admin's add form: the launch parameters; the run is queued when saved."""

    dataset = LaunchFields.base_fields["dataset"]
    path = LaunchFields.base_fields["path"]
    split = LaunchFields.base_fields["split"]
    limit = LaunchFields.base_fields["limit"]
    model = LaunchFields.base_fields["model"]

    class Meta:
        model = BenchmarkRun
        fields = ["dataset", "path", "split", "limit", "collection", "model"]

    def clean(self):
        data = super().clean()
        return self.prepare(data, collection=data.get("collection") or "")
