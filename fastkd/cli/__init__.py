"""Command line: `python -m fastkd info | bench | cache | demo`, one module per subcommand; each
has HELP, add_arguments(parser) and run(args) -> exit status."""
import argparse
import importlib
import sys

COMMANDS = ("info", "bench", "cache", "demo")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastkd", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"fastkd.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(fn=module.run)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
