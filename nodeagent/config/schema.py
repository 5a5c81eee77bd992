"""A small declarative field walker: every kind's schema is built from these validators, so that
type errors, required fields, unknown fields and unsupported fields are reported uniformly, each
by its path ("spec.http[0].corsPolicy is not supported").

A validator is `f(walker, path, value) -> None`; it records FieldErrors on the walker. `obj`
checks a mapping's keys against its field table; its `checks` (cross-field rules) run only when
the object's own fields had no error, so they may trust the types. YAML nulls count as absent.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.config.duration import DurationError, parse_duration
from nodeagent.config.errors import FieldError
from nodeagent.config.regex import check_regex


class Walker:
    """Collects the errors of one document."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def unsupported(self, path: str, why: str = "") -> None:
        self.errors.append(FieldError(path, "is not supported" + (f" ({why})" if why else "")))

    def required(self, path: str) -> None:
        self.errors.append(FieldError(path, "Required value"))

    def mark(self) -> int:
        return len(self.errors)

    def clean_since(self, mark: int) -> bool:
        return len(self.errors) == mark


Validator = Callable[[Walker, str, Any], None]
Check = Callable[[Walker, str, Any], None]


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A field Istio has and the mesh does not implement."""

    why: str = ""


def obj(
    fields: Mapping[str, Validator | Unsupported],
    *,
    required: Iterable[str] = (),
    one_of: Sequence[Sequence[str]] = (),
    checks: Sequence[Check] = (),
    min_fields: int = 0,
) -> Validator:
    required = tuple(required)

    def validate(w: Walker, path: str, value: Any) -> None:
        if not isinstance(value, dict):
            w.error(path, f"must be an object, not {type_name(value)}")
            return
        start = w.mark()
        for key, item in value.items():
            if not isinstance(key, str):
                w.error(path, f"key {key!r} must be a string")
                continue
            sub = child(path, key)
            spec = fields.get(key)
            if spec is None:
                w.error(sub, "unknown field")
            elif isinstance(spec, Unsupported):
                w.unsupported(sub, spec.why)
            elif item is not None:
                spec(w, sub, item)
        for name in required:
            if value.get(name) is None:
                w.required(child(path, name))
        for group in one_of:
            present = [k for k in group if value.get(k) is not None]
            if len(present) > 1:
                w.error(
                    path, f"only one of {', '.join(group)} may be set (got {', '.join(present)})"
                )
        present_count = sum(1 for v in value.values() if v is not None)
        if present_count < min_fields:
            w.error(path, f"must not be empty (set at least {min_fields} field)")
        if w.clean_since(start):
            for check in checks:
                check(w, path, value)

    return validate


def list_of(item: Validator, *, min_items: int = 0, max_items: int = 10_000) -> Validator:
    def validate(w: Walker, path: str, value: Any) -> None:
        if not isinstance(value, list):
            w.error(path, f"must be a list, not {type_name(value)}")
            return
        if len(value) < min_items:
            w.error(path, f"must have at least {min_items} item{'s' if min_items > 1 else ''}")
        if len(value) > max_items:
            w.error(path, f"has {len(value)} items, over the limit of {max_items}")
            return
        for i, v in enumerate(value):
            sub = f"{path}[{i}]"
            if v is None:
                w.error(sub, "must not be null")
            else:
                item(w, sub, v)

    return validate


def map_of(
    value_validator: Validator,
    *,
    key: Callable[[str], str | None] | None = None,
    min_items: int = 0,
    max_items: int = 10_000,
) -> Validator:
    """A mapping with free-form string keys; `key(k)` returns a problem or None."""

    def validate(w: Walker, path: str, value: Any) -> None:
        if not isinstance(value, dict):
            w.error(path, f"must be an object, not {type_name(value)}")
            return
        if len(value) < min_items:
            w.error(path, f"must have at least {min_items} entr{'ies' if min_items > 1 else 'y'}")
        if len(value) > max_items:
            w.error(path, f"has {len(value)} entries, over the limit of {max_items}")
            return
        for k, v in value.items():
            sub = f"{path}[{k}]"
            if not isinstance(k, str):
                w.error(sub, f"key must be a string, not {type_name(k)}")
                continue
            if key is not None:
                problem = key(k)
                if problem:
                    w.error(sub, problem)
                    continue
            if v is None:
                w.error(sub, "must not be null")
            else:
                value_validator(w, sub, v)

    return validate


def string(
    *,
    min_len: int = 0,
    max_len: int = 4096,
    check: Callable[[str], str | None] | None = None,
) -> Validator:
    def validate(w: Walker, path: str, value: Any) -> None:
        if not isinstance(value, str):
            w.error(path, f"must be a string, not {type_name(value)}")
            return
        if len(value) < min_len:
            w.error(path, "must not be empty" if min_len == 1 else f"shorter than {min_len}")
            return
        if len(value) > max_len:
            w.error(path, f"is {len(value)} characters, over the limit of {max_len}")
            return
        if check is not None:
            problem = check(value)
            if problem:
                w.error(path, problem)

    return validate


def integer(*, minimum: int | None = None, maximum: int | None = None, what: str = "") -> Validator:
    def validate(w: Walker, path: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            w.error(path, f"must be an integer, not {type_name(value)}")
            return
        _range(w, path, value, minimum, maximum, what)

    return validate


def number(
    *, minimum: float | None = None, maximum: float | None = None, what: str = ""
) -> Validator:
    def validate(w: Walker, path: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            w.error(path, f"must be a number, not {type_name(value)}")
            return
        _range(w, path, value, minimum, maximum, what)

    return validate


def _range(
    w: Walker, path: str, value: float, minimum: float | None, maximum: float | None, what: str
) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if what:
            w.error(path, f"Invalid value: {value}: {what}")
        elif minimum is not None and maximum is not None:
            w.error(path, f"Invalid value: {value}: must be between {minimum} and {maximum}")
        elif minimum is not None:
            w.error(path, f"Invalid value: {value}: must be at least {minimum}")
        else:
            w.error(path, f"Invalid value: {value}: must be at most {maximum}")


def port_number(w: Walker, path: str, value: Any) -> None:
    integer(minimum=1, maximum=65535, what="port must be between 1-65535")(w, path, value)


def boolean(w: Walker, path: str, value: Any) -> None:
    if not isinstance(value, bool):
        w.error(path, f"must be true or false, not {type_name(value)}")


def enum(values: Iterable[str], *, unsupported: Iterable[str] = ()) -> Validator:
    allowed = tuple(values)
    not_ours = frozenset(unsupported)

    def validate(w: Walker, path: str, value: Any) -> None:
        if isinstance(value, str) and value in not_ours:
            w.error(path, f'value "{value}" is not supported by this mesh')
            return
        if not isinstance(value, str) or value not in allowed:
            shown = f'"{value}"' if isinstance(value, str) else repr(value)
            w.error(
                path,
                f"Unsupported value: {shown}: supported values: "
                + ", ".join(f'"{v}"' for v in allowed),
            )

    return validate


def duration(*, minimum_ms: int = 1, allow_zero: bool = False) -> Validator:
    """Istio's ValidateDuration: at least 1ms (unless zero is meaningful), millisecond precision."""

    def validate(w: Walker, path: str, value: Any) -> None:
        try:
            ns = parse_duration(value)
        except DurationError as exc:
            w.error(path, str(exc))
            return
        if ns == 0 and allow_zero:
            return
        if ns < minimum_ms * 1_000_000:
            w.error(path, f"Invalid value: {value!r}: duration must be at least {minimum_ms}ms")
        elif ns % 1_000_000:
            w.error(path, f"Invalid value: {value!r}: only durations to ms precision are supported")

    return validate


def regex(w: Walker, path: str, value: Any) -> None:
    if not isinstance(value, str):
        w.error(path, f"must be a string, not {type_name(value)}")
        return
    problem = check_regex(value)
    if problem:
        w.error(path, problem)


def ip_or_cidr(value: str) -> str | None:
    try:
        if "/" in value:
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        return f"Invalid value: {value!r}: not an IP address or CIDR block"
    return None


def ipv4(value: str) -> str | None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return f"Invalid value: {value!r}: not an IPv4 address"
    return None


def unique(field_name: str, what: str = "Duplicate value") -> Check:
    """A list check: `field_name` of the items must not repeat."""

    def check(w: Walker, path: str, value: Any) -> None:
        seen: set[Any] = set()
        for i, item in enumerate(value):
            if isinstance(item, dict) and item.get(field_name) is not None:
                v = item[field_name]
                if v in seen:
                    w.error(f"{path}[{i}].{field_name}", f'{what}: "{v}"')
                seen.add(v)

    return check


def with_checks(base: Validator, *checks: Check) -> Validator:
    """Run `checks` after `base` when `base` reported nothing."""

    def validate(w: Walker, path: str, value: Any) -> None:
        start = w.mark()
        base(w, path, value)
        if w.clean_since(start):
            for c in checks:
                c(w, path, value)

    return validate
