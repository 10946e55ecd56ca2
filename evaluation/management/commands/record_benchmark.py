"""Store a benchmark measured elsewhere in this portal's history.

    python manage.py record_benchmark results.json [more.json ...]

Takes the ``--output`` JSON of ``bench_queries`` or ``bench_ingest`` (run on a
GPU host, for instance, against its own database), or the JSON ``bench_index``
writes when the database refused its run, and adds it as a run of kind
``query-latency``, ``ingestion`` or ``index-scale``.
"""

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from evaluation.bench.records import record_file_figures


class Command(BaseCommand):
    help = "Add the JSON of bench_queries, bench_ingest or bench_index to the benchmark history."

    def add_arguments(self, parser):
        parser.add_argument("files", nargs="+")

    def handle(self, *args, files, **options):
        for name in files:
            path = Path(name)
            try:
                figures = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CommandError(f"{name}: cannot read it as JSON ({exc})") from exc
            try:
                run = record_file_figures(figures)
            except ValueError as exc:
                raise CommandError(f"{name}: {exc}") from exc
            self.stdout.write(f"{name}: stored as benchmark run #{run.pk} (kind {run.kind})")
