"""``dpsnake check-config CONFIG [--out results/config.json]``: validate a config before any work.

Prints one line naming the key or file that is wrong (exit 2), or writes the resolved config.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("config", help="config file (YAML or JSON), e.g. config/config.yaml")
    parser.add_argument("--out", default=None, help="write the resolved config (defaults filled) as JSON here")
    parser.add_argument("--base", default=".", help="folder that relative paths in the config start from")


def run(args) -> int:
    from dpsnake.workflow import config as C

    cfg = C.load(args.config, args.base)
    if args.out:
        C.write_if_changed(cfg, args.out)
    n = len(cfg["systems"])
    print(
        f"dpsnake check-config: {args.config} is valid ({n} system{'s' * (n != 1)}, "
        f"{len(cfg['explore']['stages'])} exploration stage(s), type_map {cfg['type_map']})"
    )
    return 0
