from django.core.management.base import BaseCommand, CommandError

from evaluation import datasets
from evaluation.management.dataset_arguments import add_dataset_arguments
from search import tasks


class Command(BaseCommand):
    help = (
        "Import one split of an image-caption dataset (Flickr30k or MSCOCO Karpathy JSON, COCO caption "
        "annotations, the generated shapes set) as assets of a collection; embedding is queued."
    )

    def add_arguments(self, parser):
        add_dataset_arguments(parser, split_help="split to import (default: test, or the COCO file's own)")
        parser.add_argument("--images", help="image folder, when it is not where the layout expects it")
        parser.add_argument("--captions-per-image", type=int, default=datasets.CAPTIONS_PER_IMAGE,
                            help="keep at most this many captions per image (default 5; 0 keeps all)")
        parser.add_argument("--no-embed", action="store_true", help="do not queue embedding")

    def handle(self, *args, **options):
        from tqdm import tqdm

        try:
            dataset = datasets.load(
                options["kind"], options["path"], split=options["split"] or None, limit=options["limit"],
                image_root=options["images"], captions_per_image=options["captions_per_image"] or None,
            )
            self.stdout.write(f"{dataset.kind} {dataset.split}: {len(dataset.items)} images from {dataset.json_path}")
            with tqdm(total=len(dataset.items), desc="importing", unit="img") as bar:
                result = datasets.import_dataset(
                    dataset, options["collection"] or None, progress=lambda done, total: bar.update(done - bar.n),
                )
            if not options["no_embed"]:
                tasks.queue_follow_ups(result)
        except datasets.DatasetError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(self.style.SUCCESS(
            f"Collection {result.collection}: {result.created} images added, {result.existing} already present, "
            f"{result.new_captions} new captions."
            + ("" if options["no_embed"] or not (result.created or result.new_captions)
               else " Embedding is queued for the worker.")
        ))
