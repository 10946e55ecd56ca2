from django.urls import path

from . import views

urlpatterns = [
    path("<int:pk>/", views.detail, name="benchmark-detail"),
    path("plots/<slug:dataset>.png", views.recall_plot, name="benchmark-plot"),
]
