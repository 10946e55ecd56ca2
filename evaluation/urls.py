from django.urls import path

from evaluation import views

urlpatterns = [
    path("<int:pk>/", views.detail, name="benchmark-detail"),
    path("plots/<slug:dataset>.png", views.recall_plot, name="benchmark-plot"),
]
