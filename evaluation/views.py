from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, Max
from django.http import Http404, HttpResponse, HttpResponseForbidden
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_GET, require_http_methods
from markdown_it import MarkdownIt

from evaluation import datasets
from evaluation.core import plots
from evaluation.forms import BenchmarkForm
from evaluation.models import BenchmarkRun
from evaluation.tasks import queue_benchmark

HISTORY_ROWS = 200
REFRESH_SECONDS = 5


def _finished_retrieval_runs(dataset=None):
    runs = BenchmarkRun.objects.filter(kind=BenchmarkRun.Kind.RETRIEVAL, status=BenchmarkRun.Status.SUCCEEDED)
    return runs.filter(dataset=dataset) if dataset else runs


@require_http_methods(["GET", "POST"])
def history(request):
    """The run history, the recall plots, and (for staff) the launch form."""
    form = None
    status = 200
    if request.method == "POST":
        if not request.user.is_staff:
            return HttpResponseForbidden("Launching a benchmark needs a staff account.")
        form = BenchmarkForm(request.POST, user=request.user)
        if form.is_valid():
            run = queue_benchmark(form.prepared)
            return redirect("benchmark-detail", pk=run.pk)
        status = 400
    elif request.user.is_staff:
        form = BenchmarkForm(user=request.user)
    runs = list(BenchmarkRun.objects.all()[:HISTORY_ROWS])
    plotted = list(
        _finished_retrieval_runs().values_list("dataset", flat=True).order_by("dataset").distinct()
    )
    context = {
        "runs": runs,
        "form": form,
        "plot_datasets": plotted,
        "refresh": REFRESH_SECONDS if any(run.may_still_change for run in runs) else None,
        "published": plots.PUBLISHED_R1,
    }
    return render(request, "evaluation/history.html", context, status=status)


@require_GET
def detail(request, pk):
    run = get_object_or_404(BenchmarkRun.objects.select_related("model", "requested_by"), pk=pk)
    directions = [
        ("text → image", run.text_to_image, run.t2i_latency_p50_ms, run.t2i_latency_p95_ms),
        ("image → text", run.image_to_text, run.i2t_latency_p50_ms, run.i2t_latency_p95_ms),
    ]
    context = {
        "run": run,
        "directions": directions,
        "refresh": REFRESH_SECONDS if run.may_still_change else None,
        "published": plots.PUBLISHED_R1.get(run.dataset)
        if plots.comparable_to_published(run.dataset, run.split, run.gallery_images) else None,
    }
    return render(request, "evaluation/detail.html", context)


@require_GET
def recall_plot(request, dataset):
    """PNG of recall@1/5/10 over time for one dataset (cached until a run finishes)."""
    if dataset not in datasets.KINDS:
        raise Http404("Unknown dataset.")
    runs = _finished_retrieval_runs(dataset)
    state = runs.aggregate(n=Count("id"), last=Max("finished"), top=Max("id"))
    key = f"benchmark-plot:{dataset}:{state['n']}:{state['top']}:{state['last'] and state['last'].timestamp()}"
    png = cache.get(key)
    if png is None:
        png = plots.recall_history(dataset, list(runs.order_by("finished")))
        cache.set(key, png, timeout=24 * 3600)
    response = HttpResponse(png, content_type="image/png")
    response["Cache-Control"] = "max-age=60"
    return response


@require_GET
def calibration_plot(request, pk):
    """PNG reliability diagram of a run's match probabilities."""
    run = get_object_or_404(BenchmarkRun, pk=pk)
    calibration = (run.extra or {}).get("calibration")
    if not calibration:
        raise Http404("This run has no calibration measurement.")
    response = HttpResponse(plots.reliability_diagram(calibration), content_type="image/png")
    response["Cache-Control"] = "max-age=3600"
    return response


@require_GET
def metrics_doc(request):
    """docs/metrics.md as a page: what every number of a benchmark run means."""
    text = (Path(settings.BASE_DIR) / "docs" / "metrics.md").read_text()
    html = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return render(request, "evaluation/metrics.html", {"body": mark_safe(html)})
