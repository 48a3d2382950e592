"""Command line: a thin shell over the library. Bad input -> one line on stderr, exit status 2."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import QuantkitError


def _emit(result: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(result, indent=2) if as_json else text)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QuantkitError as e:
            click.echo(f"quantkit: error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
def cli() -> None:
    """Quantize Gemma 2 / Gemma 3 checkpoints (RTN, GPTQ), measure the drift, export GGUF or packed
    safetensors."""


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(model_dir: str, as_json: bool) -> None:
    """Architecture, config values, parameter count and size estimates of MODEL_DIR.

    Example: quantkit inspect ./gemma-2-9b
    """
    from .checkpoint import open_checkpoint
    from .summary import describe, format_summary

    d = describe(open_checkpoint(model_dir, require_tokenizer=False))
    _emit(d, as_json, format_summary(d))


def main() -> None:
    sys.exit(cli.main(prog_name="quantkit", standalone_mode=True))


if __name__ == "__main__":
    main()
