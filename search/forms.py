from django import forms
from django.conf import settings


def _min_score_field():
    return forms.FloatField(min_value=0, max_value=1, required=False, label="Minimum match probability",
                            widget=forms.NumberInput(attrs={"step": "0.05", "placeholder": "0–1"}))


class TextSearchForm(forms.Form):
    q = forms.CharField(label="Describe the image", strip=True,
                        widget=forms.TextInput(attrs={"placeholder": "a man riding a surfboard", "autofocus": True}))
    k = forms.IntegerField(min_value=1, max_value=settings.SEARCH_MAX_K, initial=12, required=False)
    min_score = _min_score_field()
    cursor = forms.CharField(required=False, widget=forms.HiddenInput)  # the page after a result page

    def __init__(self, *args, demo: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if demo:  # the demo model knows coloured shapes, not surfers
            self.fields["q"].widget.attrs["placeholder"] = "a small red circle"


class ImageSearchForm(forms.Form):
    image = forms.FileField(label="Search with a photo",
                            widget=forms.ClearableFileInput(attrs={"accept": "image/*"}))
    k = forms.IntegerField(min_value=1, max_value=settings.SEARCH_MAX_K, initial=12, required=False)
    min_score = _min_score_field()
