import time

from django.core.management.base import BaseCommand, CommandError

from embeddings.models import EmbeddingModel
from embeddings.services import NoActiveModel
from evaluation import datasets, services, tasks
from evaluation.bench.reporting import retrieval_table
from evaluation.management.dataset_arguments import add_dataset_arguments
from evaluation.models import BenchmarkRun

POLL_SECONDS = 1.0
NO_WORKER_HINT_SECONDS = 30


class Command(BaseCommand):
    help = (
        "Run a retrieval benchmark (recall@K, mAP, ranks, latency, throughput) on a dataset split. "
        "Runs in this process by default; --queue hands it to a worker."
    )

    def add_arguments(self, parser):
        add_dataset_arguments(parser, split_help="split (default: test, or the COCO file's own)")
        parser.add_argument("--model", help="embedding model name or id (default: the active model)")
        parser.add_argument("--queue", action="store_true", help="queue the run for a worker instead")
        parser.add_argument("--wait", action="store_true", help="with --queue: follow the run until it ends")

    def handle(self, *args, **options):
        from tqdm import tqdm

        try:
            run = services.prepare_run(
                dataset=options["kind"], path=options["path"], split=options["split"], limit=options["limit"],
                collection=options["collection"], model=self._model(options["model"]),
            )
        except (datasets.DatasetError, NoActiveModel) as exc:
            raise CommandError(str(exc)) from exc

        if options["queue"]:
            tasks.queue_benchmark(run)
            self.stdout.write(f"Benchmark run {run.pk} queued ({run.dataset} {run.split}, model {run.model_name}).")
            if not options["wait"]:
                return
        else:
            run.save()
            self.stdout.write(f"Benchmark run {run.pk}: {run.dataset} {run.split}, model {run.model_name}.")

        with tqdm(total=100, unit="%", desc="benchmark", bar_format="{l_bar}{bar}| {n:.0f}% {postfix}") as bar:
            def show(percent, stage):
                bar.update(percent - bar.n)
                bar.set_postfix_str(stage[:60], refresh=True)

            if options["queue"]:
                self._follow(run.pk, show)
            else:
                try:
                    services.run_benchmark(run.pk, progress=show)
                except Exception:
                    pass  # stored on the run; reported below
        run.refresh_from_db()
        if run.status != BenchmarkRun.Status.SUCCEEDED:
            raise CommandError(f"Benchmark run {run.pk} {run.status}: {run.error}")
        self.stdout.write(retrieval_table(run))

    def _model(self, value):
        if not value:
            return None
        model = EmbeddingModel.objects.filter(name=value).first()
        if model is None and value.isdigit():
            model = EmbeddingModel.objects.filter(pk=int(value)).first()
        if model is None:
            raise CommandError(f"No embedding model named {value!r}.")
        return model

    def _follow(self, run_id, show):
        waited = time.monotonic()
        hinted = False
        while True:
            run = BenchmarkRun.objects.get(pk=run_id)
            show(run.progress, run.stage or run.status)
            if not run.is_active:
                return
            if run.status == BenchmarkRun.Status.QUEUED and not hinted and \
                    time.monotonic() - waited > NO_WORKER_HINT_SECONDS:
                self.stderr.write("Still queued: is a worker running? (Without one, run without --queue.)")
                hinted = True
            time.sleep(POLL_SECONDS)
