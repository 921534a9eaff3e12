"""A command's options kept in a TOML file (`build --config build.toml`): each key is an option's
long name without the dashes (`parity-data = "../shared/data/dl19"`), checked with the option's
own click type, so a file admits exactly what the command line admits. The values become the
command's defaults (click's `default_map`), so options given on the command line override them.
`--print-config` writes the resolved options back in the same form."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from resrank_export.errors import InputDataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomllib joined the standard library in 3.11; tomli is the same parser
    import tomli as tomllib

CONFIG_OPTIONS = ("config", "print_config", "precision_tables")  # the options that handle the file itself
# A command with this (hidden) parameter takes tables too: `[int4_awq]` holds that precision's knobs.
TABLES_PARAM = "precision_tables"


def option_key(param: click.Parameter) -> str:
    """`--parity-data` -> "parity-data" (the key of that option in a config file)."""
    return next(opt for opt in param.opts if opt.startswith("--"))[2:]


def _file_options(command: click.Command) -> dict[str, click.Option]:
    return {option_key(p): p for p in command.params if isinstance(p, click.Option) and p.name not in CONFIG_OPTIONS}


def read_config_file(ctx: click.Context, path: Path) -> dict[str, Any]:
    """{parameter name: converted value} of the TOML file at `path` for ctx's command; relative
    paths in the file are relative to the file's folder. InputDataError names the file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputDataError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(f"{path}: cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputDataError(f"{path}: not valid TOML ({exc})") from None
    options = _file_options(ctx.command)
    values: dict[str, Any] = {}
    tables = _table_names(ctx.command)
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in tables:
                raise InputDataError(f"{path}: table {key!r} is not one this command takes; "
                                     + (f"expected one of {', '.join(f'[{t}]' for t in tables)}" if tables else
                                        "the file takes one value per option (e.g. parity-queries = 3)"))
            values.setdefault(TABLES_PARAM, {"source": str(path), "tables": {}})["tables"][key] = value
            continue
        param = options.get(key)
        if param is None:
            raise InputDataError(f"{path}: unknown key {key!r}; expected option names of "
                                 f"'{ctx.command_path}' without dashes: {', '.join(sorted(options))}")
        if param.multiple and not isinstance(value, list):
            raise InputDataError(f"{path}: key {key!r} takes a list, e.g. {key} = [\"a\", \"b\"]")
        if not param.multiple and isinstance(value, list):
            raise InputDataError(f"{path}: key {key!r} takes one value, not a list")
        if param.is_flag and not param.secondary_opts and value is not True and value is not False:
            raise InputDataError(f"{path}: key {key!r} is a flag; expected true or false")
        _check_toml_type(path, key, param, value)
        try:
            converted = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise InputDataError(f"{path}: key {key!r}: {exc.message}") from None
        values[param.name] = _relative_to(path.parent, converted) if isinstance(param.type, click.Path) else converted
    return values


def _table_names(command: click.Command) -> tuple[str, ...]:
    """The precisions with knobs of their own (precision table rows with a config table), if the
    command takes tables."""
    from resrank_export.precision import TABLE

    if not any(p.name == TABLES_PARAM for p in command.params):
        return ()
    return tuple(row.name for row in TABLE if row.recipe == "weight_only")


def render_table(name: str, values: dict[str, Any]) -> str:
    """A `[name]` TOML table of `values` (what --print-config appends for the chosen precision)."""
    import tomli_w

    return tomli_w.dumps({name: values})


# The TOML type each click type takes; anything else (paths, choices, text) takes a string. Without
# this, click's int() would make 2.7 a 2 and true a 1, which the command line refuses.
_TOML_TYPES = ((click.types.BoolParamType, (bool,), "true or false"),
               (click.types.IntParamType, (int,), "an integer"),
               (click.types.FloatParamType, (int, float), "a number"))


def _check_toml_type(path: Path, key: str, param: click.Parameter, value: Any) -> None:
    expected, words = next(((types, words) for kind, types, words in _TOML_TYPES if isinstance(param.type, kind)),
                           ((str,), "a string"))
    for item in value if param.multiple else [value]:
        if not isinstance(item, expected) or (isinstance(item, bool) and bool not in expected):
            raise InputDataError(f"{path}: key {key!r} takes {words}{' in each item' if param.multiple else ''}, "
                                 f"got {item!r}")


def _relative_to(folder: Path, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_relative_to(folder, v) for v in value)
    return value if value is None or Path(value).is_absolute() else folder / value


def load_config_callback(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """Eager `--config` callback: the file's values become the command's defaults."""
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **read_config_file(ctx, value)}
    return value


def render_config(ctx: click.Context) -> str:
    """The command's resolved options as a config file (unset options as comments). Paths are
    written absolute, so the file reads the same from any folder."""
    import tomli_w

    lines = [f"# {ctx.command_path} options (load with --config FILE; options on the command line override)"]
    for key, param in _file_options(ctx.command).items():
        value = ctx.params[param.name]
        if isinstance(param.type, click.Path) and value is not None:
            value = [str(Path(v).absolute()) for v in value] if param.multiple else str(Path(value).absolute())
        elif isinstance(value, tuple):
            value = list(value)
        lines.append(f"# {key} = (unset)" if value is None else tomli_w.dumps({key: value}).rstrip())
    return "\n".join(lines) + "\n"
