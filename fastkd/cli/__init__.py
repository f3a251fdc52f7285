"""fastkd's command line: `python -m fastkd COMMAND`, one module here per command (each has HELP,
add_arguments(parser) and run(args) -> exit status)."""
import argparse
import importlib
import importlib.util
import sys

COMMANDS = ("info", "bench", "cache", "demo", "study")  # each a module here: HELP, add_arguments(parser), run(args)


class UsageError(Exception):
    """A mistake on the command line, named by its flag: one line and exit status 2, as argparse's own."""


def check_temperature_flag(value) -> float:
    """--temperature as the losses check it (fastkd._options.check_temperature), or a UsageError naming the flag."""
    from .._options import check_temperature

    try:
        return check_temperature(value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--{e}") from None


def requires(command: str, needs) -> None:
    """The optional packages a command needs -- (module, extra) pairs -- checked before any work, so a
    missing one is one line naming it and its extra, not a traceback minutes in."""
    missing = [(module, extra) for module, extra in needs if importlib.util.find_spec(module) is None]
    if missing:
        extras = sorted({extra for _, extra in missing})
        raise UsageError(f"{command} needs {', '.join(m for m, _ in missing)}, not installed here: "
                         f"pip install 'fastkd[{','.join(extras)}]'")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastkd", description="fastkd: fused knowledge-distillation losses for large-vocabulary "
        "language models -- the tools around them.",
        epilog="`python -m fastkd COMMAND --help` lists a command's options.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND", title="commands")
    subparsers, modules = {}, {}
    for name in COMMANDS:
        module = importlib.import_module(f"fastkd.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(fn=module.run)
        subparsers[name], modules[name] = p, module
    args = parser.parse_args(argv)
    try:
        requires(args.cmd, getattr(modules[args.cmd], "REQUIRES", ()))
        return args.fn(args)
    except UsageError as e:
        subparsers[args.cmd].error(str(e))  # prints the usage line and the error, exits 2


if __name__ == "__main__":
    sys.exit(main())
