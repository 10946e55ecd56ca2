from django import forms
from django.conf import settings


class TextSearchForm(forms.Form):
    q = forms.CharField(label="Describe the image", strip=True,
                        widget=forms.TextInput(attrs={"placeholder": "a man riding a surfboard", "autofocus": True}))
    k = forms.IntegerField(min_value=1, max_value=settings.SEARCH_MAX_K, initial=12, required=False)


class ImageSearchForm(forms.Form):
    image = forms.FileField(label="Search with a photo",
                            widget=forms.ClearableFileInput(attrs={"accept": "image/*"}))
    k = forms.IntegerField(min_value=1, max_value=settings.SEARCH_MAX_K, initial=12, required=False)
