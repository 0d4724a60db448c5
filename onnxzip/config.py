"""What the stage configs share: enums for methods and modes, the ignored-scope type, one
declaration of each option, and errors that name a config field.

Each option is a dataclass field declared once with ``option(default, help, ...)``: its
type, default, choices (from its enum) and help live there, and the command line's option
groups are generated from them (``onnxzip.cli.options.add_config_options``), so a default or a
list of choices is written in one place. A config's ``validate()`` raises ``ConfigError``,
which names the field (``calibration``); the command line names the flag that set it
(``--calibration``) instead.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import typing
from dataclasses import dataclass, field

from onnxzip.errors import InputError


class Choice(str, enum.Enum):
    """A string enum whose members compare, print and serialise as their values, so a config
    field may be given either (``mode="dynamic"`` or ``mode=Mode.DYNAMIC``)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


class Switch(Choice):
    """A step that is on, off, or decided on the samples (auto)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Calibration(Choice):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class Mode(Choice):
    """static: calibrated QDQ; dynamic: int8 MatMul weights, activations quantized at run
    time; weight-only: block-wise int4/int8 MatMul weights, float activations."""

    STATIC = "static"
    DYNAMIC = "dynamic"
    WEIGHT_ONLY = "weight-only"


class ActivationType(Choice):
    UINT8 = "uint8"
    INT8 = "int8"


class Preset(Choice):
    AUTO = "auto"
    TRANSFORMER = "transformer"
    DEFAULT = "default"


class WeightFormat(Choice):
    AUTO = "auto"
    QDQ = "qdq"
    NBITS = "nbits"


class WeightMethod(Choice):
    RTN = "rtn"
    MSE = "mse"
    GPTQ = "gptq"


class Criterion(Choice):
    """Channel importance: from the weights (l1, l2, bn) or from gradients (the rest)."""

    L1 = "l1"
    L2 = "l2"
    BN = "bn"
    TAYLOR = "taylor"
    FISHER = "fisher"
    GRAD_STABILITY = "grad-stability"


class Scope(Choice):
    GLOBAL = "global"
    LOCAL = "local"


class ConfigError(InputError):
    """An option's value is unusable. The message names the config field; ``named(flag)`` gives
    the same message naming the command-line flag that set it."""

    def __init__(self, field_name: str, text: str):
        self.field, self.text = field_name, text
        super().__init__(text.format(name=field_name))

    def named(self, name: str) -> str:
        return self.text.format(name=name)


@dataclass(frozen=True)
class IgnoredScope:
    """Nodes a stage leaves alone: by name (or onnxzip's node key), by op type, or by a regular
    expression the whole name matches (NNCF's ``IgnoredScope``)."""

    names: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()

    @classmethod
    def of(cls, value) -> IgnoredScope:
        """A scope from what a config field may hold: a scope, or names and op types mixed (an
        item matches a node whose name, key or op type it is)."""
        if isinstance(value, IgnoredScope):
            return value
        if isinstance(value, str):
            value = (value,)
        items = tuple(value or ())
        return cls(names=items, types=items)

    def __bool__(self) -> bool:
        return bool(self.names or self.types or self.patterns)

    def with_names(self, *names: str) -> IgnoredScope:
        return dataclasses.replace(self, names=self.names + tuple(names))

    def with_types(self, *types: str) -> IgnoredScope:
        return dataclasses.replace(self, types=self.types + tuple(types))

    def matches_name(self, name: str | None) -> bool:
        if not name:
            return False
        return name in self.names or any(re.fullmatch(p, name) for p in self.patterns)

    def matches(self, node) -> bool:
        """Whether an ``onnx_ir`` node is in the scope."""
        if not self:
            return False
        from onnxzip.ir.ops import node_key

        return (
            node.op_type in self.types
            or self.matches_name(node.name)
            or node_key(node) in self.names
        )

    def validate(self, field_name: str = "exclude") -> None:
        for p in self.patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ConfigError(
                    field_name, f"{{name}}: pattern {p!r} is not a regular expression: {exc}"
                ) from None


def option(default=None, help: str = "", **cli):
    """A config field with its command-line declaration: ``help`` (the default is appended),
    and optionally ``flag`` (default ``--field-name``), ``negate`` (a flag that sets a True
    default to False), ``metavar``, ``choices`` (for ints), ``type`` (argparse converter),
    ``cli=False`` (library only)."""
    meta = {"help": help, **cli}
    if isinstance(default, IgnoredScope):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def hints(cls) -> dict[str, object]:
    """A config class's resolved field annotations (resolved once: configs are made anew by
    ``dataclasses.replace`` for every candidate a guard builds)."""
    return typing.get_type_hints(cls)


def enum_of(tp) -> type[Choice] | None:
    """The Choice enum a field's annotation names (``Mode``, ``Mode | None``), else None."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and issubclass(t, Choice):
            return t
    return None


def coerce(config) -> None:
    """Turns strings given for enum fields into members and name/type lists into scopes, in
    place; a string that is no member stays for ``check`` to report."""
    for name, tp in hints(type(config)).items():
        value = getattr(config, name, None)
        kind = enum_of(tp)
        if kind is not None and isinstance(value, str) and not isinstance(value, kind):
            if value in kind.values():
                object.__setattr__(config, name, kind(value))
        elif tp is IgnoredScope and not isinstance(value, IgnoredScope):
            object.__setattr__(config, name, IgnoredScope.of(value))


def check(config) -> None:
    """Raises ConfigError for the first enum field holding a value that is no member."""
    for name, tp in hints(type(config)).items():
        value = getattr(config, name, None)
        kind = enum_of(tp)
        if kind is not None and value is not None and not isinstance(value, kind):
            raise ConfigError(name, "{name} must be " + one_of(kind.values()) + f", got {value!r}")
        if isinstance(value, IgnoredScope):
            value.validate(name)


def one_of(values) -> str:
    values = [str(v) for v in values]
    return (
        ("one of " + ", ".join(values[:-1]) + " or " + values[-1]) if len(values) > 1 else values[0]
    )
