"""Regexes in configuration: the RE2 syntax that Python's `re` also reads the same way.

Istio (Envoy) matches with RE2, which has no backtracking features; the mesh matches with
Python's `re`. A pattern is accepted only when both engines would agree on it: lookarounds,
backreferences, atomic groups, possessive quantifiers, conditionals and recursion are rejected
(RE2 has none of them), as are RE2-only escapes Python reads differently (\\z, \\pN, \\C, \\Q…\\E)
and repeat counts over RE2's limit of 1000. Istio matches the whole string: use `re.fullmatch`.
"""

from __future__ import annotations

import re

MAX_LEN = 1024
MAX_REPEAT = 1000
_ALLOWED_FLAGS = set("ims-")


def check_regex(pattern: str) -> str | None:
    """None if `pattern` is acceptable, else a message saying what is wrong and where."""
    if len(pattern) > MAX_LEN:
        return f"regex is {len(pattern)} characters, over the {MAX_LEN} limit"
    problem = _scan(pattern)
    if problem is not None:
        return f"regex {pattern!r}: {problem}"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"regex {pattern!r} does not compile: {exc}"
    return None


def _scan(p: str) -> str | None:
    i = 0
    in_class = False
    n = len(p)
    while i < n:
        c = p[i]
        if c == "\\":
            if i + 1 >= n:
                return "trailing backslash"
            e = p[i + 1]
            if e.isdigit() and e != "0" and not in_class:
                return f"backreference \\{e} at offset {i} is not supported (RE2)"
            if e in "kg":
                return f"backreference \\{e} at offset {i} is not supported (RE2)"
            if e in "zZpPCQE":
                return f"escape \\{e} at offset {i} is not supported"
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
            i += 1
            continue
        if c == "[":
            in_class = True
            i += 1
            # a ']' (or '^]') right after '[' is a literal
            if i < n and p[i] == "^":
                i += 1
            if i < n and p[i] == "]":
                i += 1
            continue
        if c == "(" and p.startswith("(?", i):
            rest = p[i + 2 : i + 4]
            if rest.startswith(("=", "!", "<=", "<!")):
                return f"lookaround at offset {i} is not supported (RE2)"
            if rest.startswith(">"):
                return f"atomic group at offset {i} is not supported (RE2)"
            if rest.startswith("("):
                return f"conditional group at offset {i} is not supported (RE2)"
            if rest.startswith(("P=", "P>", "R", "&")) or (rest[:1].isdigit()):
                return f"backreference/recursion at offset {i} is not supported (RE2)"
            if rest.startswith("#"):
                return f"comment group at offset {i} is not supported (RE2)"
            if not rest.startswith(("P<", ":", "<")):
                # inline flags: (?ims) or (?i:...)
                j = i + 2
                while j < n and p[j] not in ":)":
                    if p[j] not in _ALLOWED_FLAGS:
                        return f"flag {p[j]!r} at offset {j} is not supported (only i, m, s)"
                    j += 1
            i += 2
            continue
        if c in "*+?}" and i + 1 < n and p[i + 1] == "+":
            return f"possessive quantifier at offset {i} is not supported (RE2)"
        if c == "{":
            m = re.match(r"\{(\d*)(?:,(\d*))?\}", p[i:])
            if m is not None:
                for num in m.groups():
                    if num and int(num) > MAX_REPEAT:
                        return (
                            f"repeat count {num} at offset {i} is over RE2's limit of {MAX_REPEAT}"
                        )
                i += m.end()
                if i < n and p[i] == "+":
                    return f"possessive quantifier at offset {i - 1} is not supported (RE2)"
                continue
        i += 1
    return None
