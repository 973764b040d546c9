"""Command-line entry points: thin click shells over the library functions.

Exit codes: 0 success, 1 a conversion/verification problem, 2 a usage problem (130 interrupted, 141 the
reader of stdout went away). Errors are one line on stderr; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys

import click

from converter.version import __version__
from converter.vocabulary import CONVENTIONS, REFERENCE_KINDS
from converter.zoo_catalog import MODELS as ZOO_MODELS

BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, the status of a program the signal ends


def report_errors(command):
    """Turn the project's errors (and anything unexpected) into one line and an exit code; add the options
    every command has (`--debug`, `--version`)."""

    @functools.wraps(command)
    def wrapper(*args, debug: bool = False, **kwargs):
        from converter.errors import USER_ERRORS, command_line_message
        from converter.vocabulary import FRAMEWORK_LOGS_ENV

        if debug:  # TensorFlow's own logs too, read when it is imported
            os.environ[FRAMEWORK_LOGS_ENV] = "1"
        if "debug" in inspect.signature(command).parameters:  # a command that shows more itself
            kwargs["debug"] = debug
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as error:
            if debug:
                for line in getattr(error, "detail", ()):  # what a one-line summary left out
                    click.echo(f"detail: {line}", err=True)
                raise
            click.echo(f"error: {command_line_message(error)}", err=True)
            sys.exit(getattr(error, "exit_code", 1))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as programs killed by SIGPIPE do
            _silence_stdout()
            sys.exit(BROKEN_PIPE_EXIT)
        except Exception as error:  # a bug: still one line, with the way to see more
            if debug:
                raise
            click.echo(f"internal error: {type(error).__name__}: {error} (rerun with --debug)", err=True)
            sys.exit(1)
        finally:
            if debug:
                os.environ.pop(FRAMEWORK_LOGS_ENV, None)

    with_debug = click.option(
        "--debug",
        is_flag=True,
        help="Show the full traceback on errors, each download source's failure, and TensorFlow's own logs.",
    )(wrapper)
    return click.version_option(__version__, "--version", message="%(prog)s %(version)s")(with_debug)


def _progress_line(text: str) -> None:
    """Say on a terminal what a long step is doing (never into a pipe or a log)."""
    if sys.stderr.isatty():
        click.echo(text, err=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit cannot raise a second BrokenPipeError."""
    try:
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (a test runner's buffer): nothing will flush it
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--checkpoint",
    "source",
    type=click.Path(path_type=str),
    default=None,
    help="The model to convert, in any supported format: a TF checkpoint prefix, a SavedModel or TF Hub module "
    "folder, a Keras file (.h5, .keras, .weights.h5, .weights.json) or a .tflite; or a folder or archive (.tgz, "
    ".tar.gz, .tar) holding one, such as a zoo download. Without it, the zoo download named by "
    "--model/--depth/--size is fetched (and cached).",
)
@click.option(
    "--output",
    type=click.Path(path_type=str),
    default=None,
    help="Output folder (default: the variant's name, e.g. mobilenet_v2_1.0_224); with --all, the parent "
    "folder (default: the current folder).",
)
@click.option(
    "--model",
    type=click.Choice(ZOO_MODELS),
    default=None,
    help="Zoo family to download: mobilenet_v2 (ImageNet, the default) or deeplabv3 (PASCAL VOC).",
)
@click.option(
    "--format",
    "source_format",
    default=None,
    metavar="NAME",
    help="Read --checkpoint (or the download) as this format instead of recognising it (tf-checkpoint, "
    "saved-model, tf-hub-module, keras, tflite); in a folder or archive holding several, it picks one.",
)
@click.option(
    "--source",
    "zoo_source",
    default=None,
    metavar="NAME",
    help="Download from this source only (official, tfhub, tflite-hosted, coral); default: each in turn until one "
    "works.",
)
@click.option("--trainval", is_flag=True, help="deeplabv3 only: the checkpoint trained on train + val.")
@click.option(
    "--quantized",
    is_flag=True,
    help="The quantized form of the model: its integer TFLite export, converted to the emulated-integer folder "
    "(mobilenet_v2 1.0/224, deeplabv3 1.0 and 0.5); with --format tf-checkpoint, the quantization-aware "
    "checkpoint where the download holds one. With --all: the quantized models instead of the float ones.",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=str),
    default=None,
    help="Download cache (default: $MOBILENET_CONVERT_CACHE, else ~/.cache/mobilenet-convert).",
)
@click.option(
    "--mirror",
    default=None,
    metavar="BASE",
    help="Fetch BASE/<tarball> instead of the official URL: http(s)://..., file://... or a folder "
    "(default: $MOBILENET_CONVERT_MIRROR).",
)
@click.option(
    "--all",
    "whole_zoo",
    is_flag=True,
    help="Convert the whole float zoo (narrowed by --model/--depth/--size/--trainval; --quantized: the quantized "
    "models) into --output.",
)
@click.option("--jobs", type=click.IntRange(min=1), default=1, help="With --all: conversions run at once.")
@click.option(
    "--push-to-hub",
    default=None,
    metavar="REPO",
    help="Upload the output folder to this Hugging Face repository (needs huggingface_hub and a login).",
)
@click.option(
    "--depth",
    type=float,
    default=None,
    help="Depth multiplier: picks the zoo checkpoint to download, or is checked against --checkpoint.",
)
@click.option(
    "--size",
    type=click.IntRange(min=32),
    default=None,
    help="Input size for the config (picks the zoo download, or is checked against the source's input shape and "
    "zoo file name; default: what the source says, else 224, DeepLab 513).",
)
@click.option(
    "--weights",
    type=click.Choice(CONVENTIONS),
    default=None,
    help="raw | ema (trainable from EMA shadows) | ema-all. Default: ema where shadows exist.",
)
@click.option(
    "--output-stride",
    type=click.Choice(["8", "16"]),
    default=None,
    help="DeepLab only: output stride of the converted model (default: the source's own where its graph fixes "
    "one, as a .tflite does; else 8, as the zoo's frozen graphs).",
)
@click.option("--drop-background", is_flag=True, help="Write a 1000-class head without the background class.")
@click.option(
    "--add-background",
    is_flag=True,
    help="Give a 1000-class head (Keras') a background class at index 0 that never wins (1001 classes).",
)
@click.option(
    "--backbone-only",
    is_flag=True,
    help="Convert the backbone alone (a MobileNetV2Model folder); the classification head is set aside.",
)
@click.option(
    "--avg-pool",
    type=click.Choice(["global", "fixed7x7"]),
    default="global",
    help="Classifier pooling: global (as transformers), or slim's fixed 7x7 window (a logits map on large inputs).",
)
@click.option("--allow-non-finite", is_flag=True, help="Convert even if weights hold NaN or Inf.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder (atomically).")
@click.option(
    "--verify",
    is_flag=True,
    help="After converting, prove parity against the original TF graph (needs the [verify] extra); "
    "exit 1 if it does not hold.",
)
@click.option(
    "--report-dir",
    type=click.Path(path_type=str),
    default=None,
    help="With --verify: where the parity reports go (default: <output>/parity).",
)
@click.option(
    "--onnx",
    "write_onnx",
    is_flag=True,
    help="Also write model.onnx into the output folder (config size, dynamic batch; needs onnx, onnxscript).",
)
@report_errors
def convert_main(
    source,
    output,
    model,
    source_format,
    zoo_source,
    trainval,
    quantized,
    cache_dir,
    mirror,
    whole_zoo,
    jobs,
    push_to_hub,
    depth,
    size,
    weights,
    output_stride,
    drop_background,
    add_background,
    backbone_only,
    avg_pool,
    allow_non_finite,
    force,
    verify,
    report_dir,
    write_onnx,
    debug=False,
):
    """Convert a TensorFlow MobileNetV2 (checkpoint, SavedModel, Keras or TFLite) to a PyTorch / transformers
    folder.

    Without --checkpoint, downloads (and caches) the zoo tarball named by --model, --depth and --size;
    with --all, converts the whole zoo.
    """
    from converter.pipeline.convert import ConversionOptions, convert_checkpoint

    options = ConversionOptions(
        format=source_format,
        depth=depth,
        size=size,
        weights=weights,
        output_stride=int(output_stride) if output_stride else None,
        drop_background=drop_background,
        add_background=add_background,
        backbone_only=backbone_only,
        avg_pool=avg_pool,
        allow_non_finite=allow_non_finite,
        force=force,
    )
    zoo_options = dict(
        model=model, trainval=trainval, quantized=quantized, cache_dir=cache_dir, mirror=mirror, source=zoo_source
    )
    if source_format and whole_zoo:
        from converter.errors import UsageError

        raise UsageError("--format picks the format of one download; leave it out with --all")
    _check_zoo_flags(source, whole_zoo, jobs, push_to_hub, zoo_options)
    _check_verify_flags(verify, report_dir, whole_zoo)
    if write_onnx:
        _check_onnx_ready(whole_zoo)
    if push_to_hub:
        from converter.app.hub import check_hub_ready

        check_hub_ready()  # before any download or conversion
    if whole_zoo:
        sys.exit(_convert_whole_zoo(output, jobs, zoo_options, options, verify, debug))
    if source is None:
        from converter.app.batch import convert_entry
        from converter.zoo.table import lookup

        model = model or "mobilenet_v2"
        entry = lookup(model, depth, size if model == "mobilenet_v2" else None, trainval, quantized)
        summary = convert_entry(entry, output, options, cache_dir=cache_dir, mirror=mirror, source=zoo_source)
        if verify:
            from converter.zoo.download import fetch

            source = fetch(entry, cache_dir=cache_dir, mirror=mirror, progress=False, source=zoo_source).path
    else:
        summary = convert_checkpoint(source, output, options)
    click.echo(
        f"converted {summary.variant.name} ({summary.weights} weights, {summary.mapped} tensors mapped, "
        f"{summary.ignored} ignored by rule) -> {summary.output} in {summary.seconds:.2f} s"
    )
    for note in summary.notes:  # also in conversion.json and the model card
        click.echo(f"note: {note}", err=True)
    if write_onnx:
        from pathlib import Path

        from converter.app.onnx_export import export_onnx
        from converter.output import layout

        _progress_line("exporting to ONNX (a minute or so) ...")
        click.echo(f"ONNX export -> {export_onnx(summary.output, Path(summary.output, layout.ONNX))}")
    if verify and not _report_parity(source, summary.output, report_dir):
        sys.exit(1)  # before any upload
    if push_to_hub:
        from converter.app.hub import push_folder

        click.echo(f"uploaded {summary.output} -> {push_folder(summary.output, push_to_hub)}")


def _check_zoo_flags(source, whole_zoo, jobs, push_to_hub, zoo_options) -> None:
    from converter.errors import UsageError

    if source is not None:
        if whole_zoo:
            raise UsageError(
                "--all converts the whole zoo and --checkpoint one local checkpoint: pass only one of them"
            )
        given = [f"--{name.replace('_', '-')}" for name, value in zoo_options.items() if value]
        if given:
            choose, them = ("chooses", "it") if len(given) == 1 else ("choose", "them")
            raise UsageError(
                f"{' and '.join(given)} {choose} what is downloaded from the zoo, but --checkpoint downloads "
                f"nothing: leave {them} out"
            )
    if whole_zoo and push_to_hub:
        raise UsageError("--push-to-hub uploads one folder; convert with --all, then upload folders one by one")
    if jobs != 1 and not whole_zoo:
        raise UsageError("--jobs applies to --all")
    if zoo_options["trainval"] and zoo_options["model"] == "mobilenet_v2":
        raise UsageError("--trainval selects a DeepLab checkpoint; use it with --model deeplabv3")


def _check_onnx_ready(whole_zoo: bool) -> None:
    """--onnx: fail before converting when it cannot be honoured."""
    import importlib.util

    from converter.errors import UsageError

    if whole_zoo:
        raise UsageError("--onnx exports one converted folder; leave it out with --all")
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"--onnx needs {' and '.join(missing)}: pip install onnx onnxscript")


def _convert_whole_zoo(output, jobs, zoo_options, options, verify=False, debug=False) -> int:
    """--all: convert every matching zoo entry and print the summary table (with --debug, each failure's
    detail: every download source's); returns the exit code."""
    from pathlib import Path

    from converter.app.batch import convert_all, summary_table
    from converter.errors import UsageError
    from converter.zoo.table import select

    trainval = zoo_options["trainval"]
    model = zoo_options["model"] or ("deeplabv3" if trainval else None)
    entries = select(model, options.depth, options.size, True if trainval else None, zoo_options["quantized"])
    if not entries:
        raise UsageError("no zoo model matches --model/--depth/--size/--trainval/--quantized")
    results = convert_all(
        entries,
        Path(output or "."),
        options,
        jobs=jobs,
        verify=_zoo_verifier(verify),
        cache_dir=zoo_options["cache_dir"],
        mirror=zoo_options["mirror"],
        source=zoo_options["source"],
    )
    click.echo(summary_table(results, details=debug))
    return 1 if any(result.failed for result in results) else 0


def _zoo_verifier(verify: bool = False):
    """What --all runs on each converted folder after converting it (None: nothing)."""
    if not verify:
        return None

    def verifier(folder, tarball):
        from converter.verify import check_parity

        return check_parity(tarball, folder)

    return verifier


def _check_verify_flags(verify: bool, report_dir, whole_zoo: bool) -> None:
    from converter.errors import UsageError

    if report_dir is not None and not verify:
        raise UsageError("--report-dir applies to --verify")
    if report_dir is not None and whole_zoo:
        raise UsageError("--report-dir names one folder; with --all each model's reports go to <model>/parity")
    if verify:
        from converter.verify.references import import_tensorflow

        import_tensorflow()  # fail before downloading or converting anything when TensorFlow is missing


def _report_parity(checkpoint, model_dir, report_dir=None, **options) -> bool:
    """Verify, write the reports, print the verdict and where the reports are; True when parity holds."""
    from converter.verify import check_parity
    from converter.verify.report import verdict_line

    _progress_line("verifying: running the source's own runtime and the converted model ...")
    check = check_parity(checkpoint, model_dir, report_dir=report_dir, **options)
    click.echo(verdict_line(check.result).replace("**", "").replace("`", ""))
    names = ", ".join(path.name for path in check.written)
    click.echo(f"parity reports ({names}) -> {check.report_dir}")
    return check.result.passed


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--checkpoint",
    "source",
    type=click.Path(path_type=str),
    required=True,
    help="The source the model was converted from, in any supported format: a TF checkpoint prefix, a "
    "SavedModel or TF Hub module folder, a Keras file or a .tflite, or a folder or archive holding one. The "
    "reference is its own original: the checkpoint's .meta (or frozen) graph, the SavedModel's signature, the "
    "Keras model or the TFLite interpreter.",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=str),
    required=True,
    help="The converted model folder.",
)
@click.option(
    "--inputs",
    multiple=True,
    default=("random",),
    show_default=True,
    metavar="random|IMAGE",
    help="One or more (--inputs a.png b.png, or repeated). random: seeded images in [-1, 1] (a batch of 2 at "
    "the model size, one odd-sized, one non-square); IMAGE: a picture, preprocessed like MobileNetV2ImageProcessor.",
)
@click.option(
    "--size",
    type=click.IntRange(min=32),
    default=None,
    help="Size of the random batch (default: the model's image_size).",
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Override: absolute tolerance of the fixed rule atol + rtol x max|reference| (default: the tolerance "
    "calibrated per endpoint from the model's own float64 run; see the README).",
)
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=None,
    help="Override: relative tolerance of the fixed rule (with only one of --atol / --rtol, the other is 1e-4).",
)
@click.option(
    "--reference",
    "reference_kind",
    type=click.Choice(REFERENCE_KINDS),
    default="auto",
    show_default=True,
    help="The graph to compare against: auto takes the checkpoint's .meta, else its frozen graph (a builder "
    "graph is for the Python API, which is passed one).",
)
@click.option(
    "--report-dir",
    type=click.Path(path_type=str),
    default=None,
    help="Where parity.{json,md,xml,png} go (default: <model>/parity).",
)
@click.option(
    "--format",
    "source_format",
    default=None,
    metavar="NAME",
    help="Read --checkpoint as this format (default: as the conversion did, when it is the very file "
    "conversion.json records, else recognised).",
)
@click.argument("more_inputs", nargs=-1, type=click.Path(path_type=str), metavar="[IMAGE]...")
@report_errors
def verify_main(source, model_dir, inputs, size, atol, rtol, reference_kind, report_dir, source_format, more_inputs):
    """Prove a converted folder matches the original TensorFlow graph, endpoint by endpoint.

    Exit codes: 0 parity holds, 1 it does not (the first diverging endpoint and module are named), 2 the
    check cannot be made (TensorFlow missing, graph refused as unsafe, no reference).
    """
    inputs = _all_inputs(inputs, more_inputs)
    options = dict(inputs=inputs, size=size, atol=atol, rtol=rtol, reference_kind=reference_kind, format=source_format)
    ok = _report_parity(source, model_dir, report_dir, **options)
    sys.exit(0 if ok else 1)


def _all_inputs(inputs: tuple[str, ...], more: tuple[str, ...]) -> tuple[str, ...]:
    """`--inputs a.png b.png`: a click option takes one value, so the ones after it arrive as arguments.
    They are inputs too, in place of the default `random` when --inputs itself is not given."""
    if not more:
        return inputs
    source = click.get_current_context().get_parameter_source("inputs")
    return more if source is click.core.ParameterSource.DEFAULT else (*inputs, *more)
