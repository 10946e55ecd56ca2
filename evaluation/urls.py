from django.urls import path

from evaluation import views

urlpatterns = [
    path("<int:pk>/", views.detail, name="benchmark-detail"),
    path("<int:pk>/calibration.png", views.calibration_plot, name="benchmark-calibration"),
    path("plots/<slug:dataset>.png", views.recall_plot, name="benchmark-plot"),
    path("metrics/", views.metrics_doc, name="benchmark-metrics"),
]
