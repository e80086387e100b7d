"""Command-line flags and config files, both generated from the schema in `hpalign.config`.

Every schema field is one flat flag `--<field>` (plus its `FLAG_ALIASES`), so the `swift rlhf`
command lines of the seed document parse unchanged. Values come from three layers, later wins:
the field defaults, `--config FILE`, then the flags actually typed on the command line (argparse
runs with `argument_default=SUPPRESS`, so a flag that was not given leaves no trace and cannot
overwrite a file value with its default).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from hpalign.config import FLAG_ALIASES, SECTIONS, Config, load_config_file

EPILOG = """\
config file:
  --config run.toml|run.yaml|run.json holds the same keys, flat ({beta: 0.1}) or nested by
  section ({algorithm: {beta: 0.1}}); flags typed on the command line override it. Sections:
  %(sections)s.

values:
  booleans take true/false/1/0/yes/no, and a bare --flag means true; list flags take one or more
  values (--dataset a.jsonl b.parquet); flags whose default is None also accept none/null.

several GPUs (the swift document's DDP style):
  NPROC_PER_NODE=N [MASTER_PORT=29500] [CUDA_VISIBLE_DEVICES=0,1,...] hpalign rlhf <flags>
  re-launches itself as `deepspeed --num_gpus N --master_port PORT launch/train.py <flags>`
  (--include localhost:<ids> instead of --num_gpus when CUDA_VISIBLE_DEVICES is set).
  Or run `deepspeed launch/train.py <flags>` yourself, e.g. on SLURM.
"""

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")
_NONE = ("none", "null")


@dataclass(frozen=True)
class FieldSpec:
    """One schema field as the parser sees it: `base` is str, int, float or bool."""

    section: str
    name: str
    base: type
    optional: bool
    is_list: bool
    default: Any
    help: str


def _field_type(tp: Any) -> tuple[type, bool, bool]:
    """(base type, optional?, list?) of an annotation such as `float | None` or `list[str]`."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        assert len(args) == 1, f"unsupported annotation {tp}"
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], optional, True
    assert tp in (str, int, float, bool), f"unsupported annotation {tp}"
    return tp, optional, False


def _default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


@functools.cache
def field_specs() -> dict[str, FieldSpec]:
    """Every schema field by name (names are unique across sections; checked here)."""
    specs: dict[str, FieldSpec] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            assert f.name not in specs, f"field {f.name} appears in two sections"
            base, optional, is_list = _field_type(hints[f.name])
            specs[f.name] = FieldSpec(section, f.name, base, optional, is_list, _default(f), f.metadata["help"])
    clashes = set(FLAG_ALIASES) & set(specs)
    assert not clashes, f"aliases shadow fields: {clashes}"
    return specs


# ---------------------------------------------------------------------------------------------
# argparse
# ---------------------------------------------------------------------------------------------

def parse_bool(text: str) -> bool:
    """`true/false/1/0/yes/no/on/off` (any case) -> bool."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (or 1/0, yes/no), got {text!r}")


def _converter(spec: FieldSpec) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if spec.optional and text.strip().lower() in _NONE:
            return None
        if spec.base is bool:
            return parse_bool(text)
        try:
            return spec.base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {spec.base.__name__}, got {text!r}") from None

    convert.__name__ = spec.base.__name__
    return convert


def _help_text(spec: FieldSpec) -> str:
    if spec.default is None and "default" in spec.help:
        return spec.help.replace("%", "%%")
    shown = " ".join(spec.default) if spec.is_list else spec.default
    return f"{spec.help} [default: {shown}]".replace("%", "%%")


def _add_flag(group: argparse._ArgumentGroup, spec: FieldSpec, aliases: Sequence[str]) -> None:
    kwargs: dict[str, Any] = {"dest": spec.name, "type": _converter(spec), "help": _help_text(spec)}
    if spec.is_list:
        kwargs.update(nargs="+", metavar=spec.base.__name__.upper())
    elif spec.base is bool:
        kwargs.update(nargs="?", const=True, metavar="BOOL")
    else:
        kwargs.update(metavar=spec.base.__name__.upper())
    group.add_argument(f"--{spec.name}", *(f"--{a}" for a in aliases), **kwargs)


def build_parser(prog: str = "hpalign rlhf") -> argparse.ArgumentParser:
    """The parser of `hpalign rlhf` and `launch/train.py`: one flag per schema field, grouped by section."""
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [--config FILE] [--<flag> VALUE ...]   (--help lists every flag)",
        description="Preference alignment (DPO, KTO, CPO, ORPO, SimPO, RM, PPO, SFT) on DeepSpeed.",
        epilog=EPILOG % {"sections": ", ".join(SECTIONS)}, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="A .toml, .yaml/.yml or .json file of settings; "
                        "flags on the command line override it.")
    aliases_of: dict[str, list[str]] = {}
    for alias, name in FLAG_ALIASES.items():
        aliases_of.setdefault(name, []).append(alias)
    groups = {section: parser.add_argument_group(section) for section in SECTIONS}
    for spec in field_specs().values():
        _add_flag(groups[spec.section], spec, aliases_of.get(spec.name, []))
    return parser


def _all_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _unknown_message(extras: list[str], known: list[str]) -> str:
    problems = []
    for token in extras:
        if not token.startswith("-"):
            continue
        flag = token.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see --help for the valid flags"
        problems.append(f"unknown flag {flag}{hint}")
    if not problems:
        problems.append(f"unexpected value(s): {' '.join(extras)} (a flag needs a -- name)")
    return "\n".join(problems)


def parse_flags(argv: Sequence[str], *, prog: str = "hpalign rlhf") -> tuple[dict[str, Any], str | None]:
    """Flags actually given in `argv` -> ({field: value}, config file or None).

    An unknown flag exits with status 2 (as argparse does) and suggests the closest valid flag.
    """
    parser = build_parser(prog)
    namespace, extras = parser.parse_known_args(list(argv))
    if extras:
        parser.error(_unknown_message(extras, _all_flags(parser)))
    values = vars(namespace)
    return values, values.pop("config", None)


def strip_local_rank(argv: Sequence[str]) -> tuple[list[str], int | None]:
    """Remove the `--local_rank=N` / `--local_rank N` the deepspeed launcher appends; return (argv, N)."""
    out: list[str] = []
    rank: str | None = None
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        name, eq, value = tokens[i].partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                if i + 1 >= len(tokens):
                    raise ValueError(f"{name} needs a value (the launcher passes {name}=N).")
                value = tokens[i + 1]
                i += 1
            rank = value
        else:
            out.append(tokens[i])
        i += 1
    if rank is not None and not rank.lstrip("-").isdigit():
        raise ValueError(f"--local_rank must be an integer, got {rank!r}.")
    return out, None if rank is None else int(rank)


# ---------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------

def _type_name(spec: FieldSpec) -> str:
    base = spec.base.__name__
    name = f"a list of {base}" if spec.is_list else f"{'an' if base == 'int' else 'a'} {base}"
    return f"{name} or null" if spec.optional else name


def coerce_file_value(spec: FieldSpec, value: Any, *, key: str, source: str) -> Any:
    """Check a config-file value against its field's type; ints are accepted for floats."""
    if spec.optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
        return None
    if spec.is_list and isinstance(value, str):
        value = [value]
    items = value if spec.is_list and isinstance(value, list) else [value]
    ok = (spec.is_list == isinstance(value, list)) and all(_scalar_ok(spec.base, v) for v in items)
    if not ok:
        raise ValueError(f"{source}: key {key!r} must be {_type_name(spec)}, got {value!r} "
                         f"({type(value).__name__}).")
    if spec.base is float:
        return [float(v) for v in items] if spec.is_list else float(value)
    return list(value) if spec.is_list else value


def _scalar_ok(base: type, value: Any) -> bool:
    if base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def _unknown_key(key: str, source: str, candidates: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; run `hpalign rlhf --help` for the valid keys."
    return ValueError(f"{source}: unknown key {key!r}{hint}")


def _flatten(data: Mapping[str, Any], source: str) -> dict[str, tuple[str, Any]]:
    """{field: (key as written, value)} from a flat or section-nested mapping."""
    specs = field_specs()
    flat: dict[str, tuple[str, Any]] = {}

    def put(key: str, value: Any, allowed: Sequence[str]) -> None:
        name = FLAG_ALIASES.get(key, key)
        if name not in allowed:
            raise _unknown_key(key, source, allowed)
        if name in flat:
            raise ValueError(f"{source}: {name!r} is set twice ({flat[name][0]!r} and {key!r}); keep one.")
        flat[name] = (key, value)

    for key, value in data.items():
        if key in SECTIONS and isinstance(value, Mapping):
            section_fields = [n for n, s in specs.items() if s.section == key]
            for sub_key, sub_value in value.items():
                put(str(sub_key), sub_value, section_fields)
        else:
            put(str(key), value, [*specs, *SECTIONS])
    return flat


def values_from_file(path: str | Path) -> dict[str, Any]:
    """{field: value} from a config file, with keys and value types checked (ValueError names the file)."""
    source = str(path)
    flat = _flatten(load_config_file(path), source)
    specs = field_specs()
    return {name: coerce_file_value(specs[name], value, key=key, source=source)
            for name, (key, value) in flat.items()}


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------

def config_from_values(values: Mapping[str, Any]) -> Config:
    """A Config with `values` ({field: value}) over the schema defaults."""
    specs = field_specs()
    by_section: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in values.items():
        by_section[specs[name].section][name] = list(value) if isinstance(value, list) else value
    return Config(**{section: cls(**by_section[section]) for section, cls in SECTIONS.items()})


def _apply_forced(values: dict[str, Any], forced: Mapping[str, Any], prog: str) -> None:
    for name, value in forced.items():
        if name in values and values[name] != value:
            raise ValueError(f"`{prog}` runs with --{name} {value}; drop --{name} {values[name]} "
                             "(flag or config file) or use `hpalign rlhf`.")
        values[name] = value


def parse_config(argv: Sequence[str], *, prog: str = "hpalign rlhf",
                 forced: Mapping[str, Any] | None = None) -> Config:
    """argv (flags only, no subcommand) -> Config: defaults < `--config FILE` < flags given.

    `forced` fixes fields for a subcommand (`hpalign sft` forces rlhf_type=sft); a file or flag
    that sets one of them to something else is a ValueError. The result is not yet resolved:
    call `hpalign.config.resolve_defaults` and `validate` next.
    """
    cli_values, config_path = parse_flags(argv, prog=prog)
    values = values_from_file(config_path) if config_path else {}
    values.update(cli_values)
    _apply_forced(values, forced or {}, prog)
    cfg = config_from_values(values)
    cfg.user_set = frozenset(values) - frozenset(forced or {})
    return cfg
