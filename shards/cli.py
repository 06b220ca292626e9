"""`robustmim shards build|verify|summary`."""

from __future__ import annotations

import argparse

from robustmim.config_help import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    build = actions.add_parser("build", help="write shards from Fashion-MNIST or an ImageNet-style tree")
    add_config_arguments(build, "configs/shards/*.yaml", "out_dir=data/shards workers=8")
    verify = actions.add_parser("verify", help="recheck a shard directory against its manifest")
    verify.add_argument("dir")
    verify.add_argument("--sample", type=float, default=1.0, metavar="FRACTION",
                        help="decode this seeded fraction of the images (default: all)")
    verify.add_argument("--seed", type=int, default=0, help="selects the decoded sample")
    verify.add_argument("--workers", type=int, default=0, help="processes (0: every core)")
    verify.add_argument("--no-record", action="store_true", help="do not record the outcome in the manifest")
    summary = actions.add_parser("summary", help="print a shard directory's manifest summary")
    summary.add_argument("dir")


def run(args: argparse.Namespace) -> int:
    from robustmim.config import load_config
    from robustmim.errors import UserError
    from robustmim.shards.manifest import load_manifest, summary_text

    if args.action == "build":
        from robustmim.shards.build import build_shards
        from robustmim.shards.config import ShardsConfig

        if args.print_config:
            from robustmim.config_help import describe_config

            print(describe_config(ShardsConfig, args.config, args.overrides), end="")
            return 0
        cfg = load_config(ShardsConfig, args.config, args.overrides)
        manifest = build_shards(cfg)
        print(summary_text(manifest, cfg.out_dir))
        return 0
    if args.action == "verify":
        from robustmim.shards.verify import verify_dir

        if not 0.0 < args.sample <= 1.0:
            raise UserError(f"--sample must be in (0, 1], got {args.sample}")
        problems, notes = verify_dir(args.dir, args.sample, args.seed, args.workers, not args.no_record)
        for note in notes:
            print(f"note: {note}")
        for problem in problems:
            print(f"BAD {problem}")
        shards = {p.shard for p in problems}
        print(f"verify {args.dir}: " + (f"{len(problems)} problem(s) in {len(shards)} shard(s)" if problems else "ok"))
        return 1 if problems else 0
    print(summary_text(load_manifest(args.dir), args.dir))
    return 0
