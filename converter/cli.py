"""Command-line entry points: thin click shells over the library functions.

Exit codes: 0 success, 1 a conversion/verification problem, 2 a usage problem. Errors are one line on
stderr; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys

import click

WEIGHT_CONVENTIONS = ("ema", "raw", "ema-all")


def report_errors(command):
    """Turn the project's errors (and anything unexpected) into one line and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, debug: bool = False, **kwargs):
        from .errors import USER_ERRORS

        try:
            return command(*args, **kwargs)
        except USER_ERRORS as error:
            if debug:
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(getattr(error, "exit_code", 1))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as error:  # a bug: still one line, with the way to see more
            if debug:
                raise
            click.echo(f"internal error: {type(error).__name__}: {error} (rerun with --debug)", err=True)
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--checkpoint",
    "source",
    type=click.Path(path_type=str),
    required=True,
    help="Checkpoint prefix, a folder holding one checkpoint, or the zoo .tgz as downloaded.",
)
@click.option(
    "--output",
    type=click.Path(path_type=str),
    default=None,
    help="Output folder (default: the variant's name, e.g. mobilenet_v2_1.0_224).",
)
@click.option("--depth", type=float, default=None, help="Expected depth multiplier (checked).")
@click.option(
    "--size",
    type=click.IntRange(min=32),
    default=None,
    help="Input size for the config (checked against the zoo name; default 224, DeepLab 513).",
)
@click.option(
    "--weights",
    type=click.Choice(WEIGHT_CONVENTIONS),
    default=None,
    help="raw | ema (trainable from EMA shadows) | ema-all. Default: ema where shadows exist.",
)
@click.option(
    "--output-stride",
    type=click.Choice(["8", "16"]),
    default=None,
    help="DeepLab only: output stride of the converted model (default 8).",
)
@click.option("--drop-background", is_flag=True, help="Write a 1000-class head without the background class.")
@click.option("--allow-non-finite", is_flag=True, help="Convert even if weights hold NaN or Inf.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder (atomically).")
@report_errors
def convert_main(source, output, depth, size, weights, output_stride, drop_background, allow_non_finite, force):
    """Convert an original TensorFlow MobileNetV2 checkpoint to a PyTorch / transformers folder."""
    from .convert import convert_checkpoint

    summary = convert_checkpoint(
        source,
        output,
        depth=depth,
        size=size,
        weights=weights,
        output_stride=int(output_stride) if output_stride else None,
        drop_background=drop_background,
        allow_non_finite=allow_non_finite,
        force=force,
    )
    click.echo(
        f"converted {summary.variant.name} ({summary.weights} weights, {summary.mapped} tensors mapped, "
        f"{summary.ignored} ignored by rule) -> {summary.output} in {summary.seconds:.2f} s"
    )
