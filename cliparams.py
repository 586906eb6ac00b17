"""The command line's shared vocabulary: ``--out`` for what a command writes, a positional
``RUN_DIR`` for the run folder it reads, ``-v`` before or after the command, and the older
spellings of these kept as hidden aliases so that existing scripts run unchanged."""

from __future__ import annotations

import copy
import logging
import os

import click


def configure_logging(verbose: bool) -> None:
    """Log levels for ``-v`` (everything, with tracebacks) or without it (warnings only)."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # Beam logs import-time notes about optional cloud clients on the root logger; they are
    # noise unless asked for.
    logging.getLogger().setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("groundforge").setLevel(logging.INFO if verbose else logging.WARNING)
    # A failing step logs its traceback at every retry; the error itself is reported once.
    logging.getLogger("apache_beam").setLevel(logging.INFO if verbose else logging.CRITICAL)
    if not verbose:
        # Model loading bars from every worker would bury the progress display; the env var
        # reaches worker processes too.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


VERBOSE_HELP = (
    "Show every log (Beam's; for crawl, each URL not stored) and full tracebacks. "
    "The same before or after the command."
)


def _verbose(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    # ctx.meta is shared by the group and its commands: `groundforge run ... -v` is
    # `groundforge -v run ...`.
    if value and not ctx.meta.get("verbose"):
        ctx.meta["verbose"] = True
        configure_logging(True)


class AliasOption(click.Option):
    """An option whose older names (``aliases``) still parse but are left out of ``--help``
    and of error messages."""

    def __init__(self, *args, aliases: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.aliases = set(aliases)

    def _shown(self) -> click.Option:
        shown = copy.copy(self)
        shown.opts = [o for o in self.opts if o not in self.aliases]
        return shown

    def get_help_record(self, ctx):
        return click.Option.get_help_record(self._shown(), ctx)

    def get_error_hint(self, ctx):
        return click.Option.get_error_hint(self._shown(), ctx)


def aliased_option(*names: str, aliases: tuple[str, ...] = (), **kwargs):
    """``click.option`` with hidden older ``aliases``; the last of ``names`` may be the
    parameter's name, as in ``click.option``."""
    flags = [n for n in names if n.startswith("-")]
    dest = [n for n in names if not n.startswith("-")]
    return click.option(*flags, *aliases, *dest, cls=AliasOption, aliases=aliases, **kwargs)


class _RunDirAlias(click.Option):
    """A hidden option (``--data X``) that gives the value of the ``RUN_DIR`` argument."""

    def __init__(self, *args, target: str, **kwargs):
        super().__init__(*args, hidden=True, **kwargs)
        self.target = target


class _RunDir(click.Argument):
    """The positional ``RUN_DIR``; ``needed`` says that it, or its alias option, must be given."""

    def __init__(self, *args, needed: bool, **kwargs):
        super().__init__(*args, required=False, **kwargs)
        self.needed = needed


def run_dir_argument(name: str, *old_flags: str, required: bool = True, type=None):
    """A positional ``RUN_DIR`` argument called ``name``, and the flags that gave it before
    (``--data``), hidden; giving both is an error."""
    type = type or click.Path(exists=True, file_okay=False)
    metavar = "RUN_DIR" if required else "[RUN_DIR]"

    def decorate(func):
        if old_flags:
            func = click.option(
                *old_flags, f"{name}__alias", cls=_RunDirAlias, target=name, type=type
            )(func)
        return click.argument(name, cls=_RunDir, needed=required, metavar=metavar, type=type)(func)

    return decorate


class Command(click.Command):
    """A command that takes ``-v/--verbose`` after its name too and merges ``RUN_DIR``'s
    hidden alias options into it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["-v", "--verbose"],
                is_flag=True,
                expose_value=False,
                callback=_verbose,
                help=VERBOSE_HELP,
            )
        )

    def invoke(self, ctx: click.Context):
        for param in self.params:
            if isinstance(param, _RunDirAlias):
                value = ctx.params.pop(param.name)
                if value is None:
                    continue
                if ctx.params.get(param.target) is not None:
                    raise click.UsageError(
                        f"give RUN_DIR once: {ctx.params[param.target]} and {param.opts[0]} "
                        f"{value}",
                        ctx,
                    )
                ctx.params[param.target] = value
        for param in self.params:
            if isinstance(param, _RunDir) and param.needed and ctx.params.get(param.name) is None:
                raise click.MissingParameter(ctx=ctx, param=param)
        return super().invoke(ctx)
