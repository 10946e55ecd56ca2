import json

from django.core.management.base import BaseCommand

from search import reconciler, tasks


class Command(BaseCommand):
    help = (
        "Re-queue assets stuck pending, check every vector index against Postgres and repair it, "
        "and remove files no row refers to (see search/reconciler.py)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--stuck-after", type=float, default=None, metavar="SECONDS",
                            help="re-queue assets pending for longer than this (default RECONCILE_STUCK_AFTER)")
        parser.add_argument("--no-files", action="store_true",
                            help="skip the scan for orphan and missing files")
        parser.add_argument("--dry-run", action="store_true", help="report only; change nothing")
        parser.add_argument("--json", action="store_true", dest="as_json", help="print the report as JSON")

    def handle(self, *args, stuck_after=None, no_files=False, dry_run=False, as_json=False, **options):
        report = reconciler.reconcile(stuck_after=stuck_after, files=not no_files, dry_run=dry_run)
        tasks.queue_requeued(report)
        if as_json:
            self.stdout.write(json.dumps(report.as_dict(), indent=2, default=str))
            return
        verb = "would re-queue" if dry_run else "re-queued"
        self.stdout.write(f"stuck assets: {report.stuck} ({verb} {len(report.requeued) if not dry_run else report.stuck})")
        for check in report.indices:
            state = "in step" if check.in_step and not check.repaired else (
                "repaired" if check.repaired and not check.error else "OUT OF STEP")
            self.stdout.write(
                f"index {check.model}/{check.modality}: {check.expected} in Postgres, {check.indexed} indexed, "
                f"{check.missing} missing, {check.extra} extra -> {state} (v{check.version or 0})"
                + (f" ({check.error})" if check.error else "")
            )
        if not no_files:
            self.stdout.write(f"orphan image files: {len(report.orphan_files)}; orphan index files: "
                              f"{len(report.orphan_index_files)}; assets without a file: {len(report.missing_files)}")
        for error in report.errors:
            self.stderr.write(error)
        self.stdout.write("all in step" if report.clean else f"done in {report.took_s:.1f}s")

