"""Look at datasets, and write any of them out as LLaVA-style JSON + PNGs.

    python -m spider.data list
    python -m spider.data show builtin:counting --n 5
    python -m spider.data export builtin:counting DIR [--split test] [--limit N] [--force]

``export`` shows the format a user's own dataset must have: ``DIR/data.json`` plus
``DIR/images/*.png``, loadable again with ``--data DIR/data.json``.
"""

from __future__ import annotations

import argparse

from spider.data import builtin_names, cells, load_dataset, write_llava_json
from spider.errors import CliParser, UserError, cli_main, positive_int


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="python -m spider.data", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="list the built-in datasets and their 2x2 evaluation cells")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", help="builtin:NAME, builtin:NAME:CELL, or a LLaVA-style JSON file")
        p.add_argument("--split", default="train", choices=["train", "test"],
                       help="which split of a built-in dataset (default: train)")  # fmt: skip
        p.add_argument("--seed", type=int, default=0,
                       help="seed of a built-in dataset (default: 0)")  # fmt: skip
        p.add_argument("--image-folder", default=None,
                       help="folder that a JSON file's image paths are relative to (LLaVA's "
                            "--image-folder; default: the JSON file's folder)")  # fmt: skip

    show = sub.add_parser("show", help="print a few examples")
    common(show)
    show.add_argument("--n", type=positive_int, default=5,
                      help="how many examples to print (default: 5)")  # fmt: skip

    export = sub.add_parser("export", help="write DIR/data.json and DIR/images/*.png")
    common(export)
    export.add_argument("dir", help="output folder (created if missing)")
    export.add_argument("--limit", type=positive_int, default=None,
                        help="write only the first N examples (default: the whole split)")  # fmt: skip
    export.add_argument("--force", action="store_true",
                        help="overwrite an existing DIR/data.json")  # fmt: skip
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for name in builtin_names():
            ds = load_dataset(f"builtin:{name}", "train")
            print(f"builtin:{name}  tasks={','.join(ds.tasks)}")
            for cell in cells(name):
                print(f"  builtin:{name}:{cell}")
        return
    if args.command == "show":
        ds = load_dataset(args.spec, args.split, args.seed, image_folder=args.image_folder)
        print(f"{ds.name} ({ds.split}): {len(ds)} examples, tasks {', '.join(ds.tasks)}")
        for i in range(min(args.n, len(ds))):
            ex = ds[i]
            sizes = ",".join(f"{im.size[0]}x{im.size[1]}" for im in ex.images) or "none"
            print(f"\n{ex.id}  task={ex.task} metric={ex.metric} image={sizes}")
            for turn in ex.turns:
                print(f"  human: {_one_line(turn.human)}")
                print(f"  gpt:   {turn.gpt}")
            if ex.references != [ex.answer]:
                print(f"  references: {ex.references}")
        return
    # export
    ds = load_dataset(args.spec, args.split, args.seed, size=args.limit,
                      image_folder=args.image_folder)
    try:
        path = write_llava_json(ds, args.dir, force=args.force)
    except OSError as err:
        raise UserError(f"could not write to {args.dir}: {err.strerror or err}.") from None
    print(f"wrote {len(ds)} examples to {path}")


if __name__ == "__main__":
    main()
