"""The `kvpred` command's entry point: kvpred.cli.main, with the start-up (importing torch and transformers, seconds)
under the same Ctrl+C handling as the command itself."""
import sys


def main() -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("kvpred: interrupted", file=sys.stderr)
        return 130  # as kvpred.cli.main
    return cli_main()
