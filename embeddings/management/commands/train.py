"""Train or fine-tune SigLIP with the sigmoid loss, then register the checkpoint as an embedding model."""

import json

from django.core.management.base import BaseCommand, CommandError

from embeddings import services


class Command(BaseCommand):
    help = ("Fine-tune a SigLIP checkpoint (or train one from scratch) on a Karpathy-format data set "
            "and register the result as an embedding model.")

    def add_arguments(self, parser):
        parser.add_argument("--data", required=True, help="Karpathy split JSON (Flickr30k, COCO or the generated set)")
        parser.add_argument("--out", required=True, help="checkpoint directory to write")
        parser.add_argument("--image-root", help="image folder (default: next to the JSON)")
        start = parser.add_mutually_exclusive_group(required=True)
        start.add_argument("--init", help="checkpoint to fine-tune: hub id or local directory")
        start.add_argument("--from-scratch", action="store_true", help="build a small SigLIP from a config")
        parser.add_argument("--model-json", help="SigLIP config overrides for --from-scratch, as JSON")
        parser.add_argument("--epochs", type=float, default=5)
        parser.add_argument("--batch-size", type=int, default=64)
        parser.add_argument("--lr", type=float, default=1e-5)
        parser.add_argument("--freeze-vision", action="store_true")
        parser.add_argument("--freeze-text", action="store_true")
        parser.add_argument("--resume", action="store_true", help="continue from the training state in --out")
        parser.add_argument("--name", help="name of the registered model (default: the output directory)")
        parser.add_argument("--activate", action="store_true", help="make it the active model")

    def handle(self, *args, **o):
        options = {
            "data": o["data"], "out_dir": o["out"], "image_root": o["image_root"], "init": o["init"],
            "epochs": o["epochs"], "batch_size": o["batch_size"], "lr": o["lr"],
            "freeze_vision": o["freeze_vision"], "freeze_text": o["freeze_text"], "resume": o["resume"],
        }
        if o["model_json"]:
            try:
                options["model"] = json.loads(o["model_json"])
            except json.JSONDecodeError as exc:
                raise CommandError(f"--model-json is not valid JSON: {exc}") from exc
        try:
            model, result = services.train_and_register(options, name=o["name"], activate=o["activate"])
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Saved {result.checkpoint_dir}; registered as {model.name}"
                          f"{' (active)' if model.is_active else ''}.")
        if result.final_metrics:
            for direction, metrics in result.final_metrics.items():
                summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("recall"))
                self.stdout.write(f"  {direction}: {summary}")
