"""The arguments that name a dataset split, shared by the commands that read one."""

from evaluation import datasets


def add_dataset_arguments(parser, *, split_help: str) -> None:
    """``path``, ``--kind``, ``--split``, ``--limit`` and ``--collection``."""
    parser.add_argument("path", help="the dataset JSON file, or the folder holding it")
    parser.add_argument("--kind", default="auto", choices=["auto", *datasets.KINDS],
                        help="dataset layout (default: detect from the file)")
    parser.add_argument("--split", default="", help=split_help)
    parser.add_argument("--limit", type=int, help="only the first N images of the split")
    parser.add_argument("--collection", default="", help="collection name (default: <kind>-<split>)")
