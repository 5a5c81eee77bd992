"""Install, read back and remove a `RuleSet` with python-iptables, in the calling thread's netns.

Every function here works on the network namespace the calling thread is in: call them through
`Netns.run` (nodeagent.inpod does). They block (libiptc round trips, a few ms).

python-iptables drives the *legacy* iptables backend (libiptc, `iptables-legacy-save` shows the
result), while the Debian `iptables` command defaults to nf_tables. Inside a pod netns that is
fine: both backends' hooks run, our chains only ever live in the legacy tables, and nothing
else in the pod edits them.

All-or-nothing: every table is edited on a private libiptc handle (`autocommit` off) and
committed once; the first commit replaces that table atomically in the kernel. If a later
table's commit fails, what the earlier commits installed is removed again, so a pod is never
left half-captured (and the caller's error says so). Applying is idempotent and repairs: owned
chains are flushed and refilled, jumps are deduplicated, stale `MESH_` chains are dropped.

python-iptables is not thread-safe (a process-wide table cache, libxtables globals, and it
swaps the process's fd 1 to read an extension's save output), so one lock serialises all use;
we also bypass its `Table` cache, whose handles would otherwise leak between namespaces.

For rules outside a pod's `RuleSet` (the node's probe SNAT chain, `node_rules.py`), the same
machinery is public as "edit one table atomically, read it back": `edit_table(name)` yields a
`TableEdit` on a private handle and commits it once on a clean exit (nothing on error), and
`read_table(name, chains)` returns the named chains' live rules as iptables-save tokens.
"""

from __future__ import annotations

import ipaddress
import shlex
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from typing import Any

from nodeagent.contract import CHAIN_PREFIX
from nodeagent.inpod.errors import RedirectionError
from nodeagent.inpod.libiptc import iptc
from nodeagent.inpod.rules import TABLES, Rule, RuleSet

_lock = threading.Lock()
_ADDR_FLAGS = {"-s": "src", "-d": "dst", "-i": "in_interface", "-o": "out_interface",
               "-p": "protocol"}  # fmt: skip


class _Table(iptc.Table):  # type: ignore[misc]
    """A libiptc handle of our own: iptc.Table() returns a process-wide cached object, whose
    handle was opened in whatever netns the first caller was in."""

    def __new__(cls, name: str) -> _Table:
        obj: _Table = object.__new__(cls)
        obj._init(name, False)  # opens the handle in the calling thread's netns
        return obj

    def create_rule(self, entry: Any = None, chain: Any = None) -> _Rule:
        return _Rule(self, entry, chain)


class _Rule(iptc.Rule):  # type: ignore[misc]
    """A rule that resolves jump targets (`-j MESH_X`) against our handle: the stock Rule asks
    the cached global tables, which neither see our uncommitted chains nor this netns."""

    def __init__(self, table: _Table, entry: Any = None, chain: Any = None) -> None:
        self._own_table = table  # before super(): decoding `entry` resolves its target
        super().__init__(entry, chain)

    @property
    def tables(self) -> list[_Table]:
        return [self._own_table]


def _iptc_error(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _make_rule(table: _Table, spec: Sequence[str]) -> Any:
    """An iptc rule from iptables-save tokens (the subset build_rules produces)."""
    rule = _Rule(table)
    current: Any = None
    negate = False
    i = 0
    while i < len(spec):
        tok = spec[i]
        if tok == "!":
            negate = True
            i += 1
        elif tok in _ADDR_FLAGS:
            setattr(rule, _ADDR_FLAGS[tok], ("!" if negate else "") + spec[i + 1])
            negate = False
            i += 2
        elif tok == "-m":
            current = rule.create_match(spec[i + 1])
            i += 2
        elif tok == "-j":
            current = rule.create_target(spec[i + 1])
            i += 2
        elif tok.startswith("--") and current is not None:
            j = i + 1
            while j < len(spec) and spec[j] != "!" and not spec[j].startswith("-"):
                j += 1
            values = list(spec[i + 1 : j])
            if negate:
                current.set_parameter(tok[2:], ["!", *values])
            elif values:
                current.set_parameter(tok[2:], values)
            else:
                current.set_parameter(tok[2:])
            negate = False
            i = j
        else:
            raise ValueError(f"cannot translate {tok!r} in rule {' '.join(spec)!r}")
    return rule


def _addr_tokens(flag: str, value: str) -> list[str]:
    neg = value.startswith("!")
    value = value.lstrip("!")
    addr, _, mask = value.partition("/")
    if addr == "0.0.0.0" and mask in ("0.0.0.0", "0") and not neg:
        return []
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask or '32'}").prefixlen
    return [*(["!"] if neg else []), flag, f"{addr}/{prefix}"]


def _saved(ext: Any, ip: Any) -> list[str]:
    buf = ext._get_saved_buf(ip)  # the extension's own `save` text, as iptables-save prints it
    if not buf:
        return []
    return shlex.split(buf.decode() if isinstance(buf, bytes) else buf)


def _render_rule(rule: Any) -> tuple[str, ...]:
    """The iptables-save tokens of a live rule (inverse of _make_rule)."""
    toks: list[str] = []
    toks += _addr_tokens("-s", rule.src)
    toks += _addr_tokens("-d", rule.dst)
    for flag, value in (("-i", rule.in_interface), ("-o", rule.out_interface)):
        if value:
            toks += ["!", flag, value[1:]] if value.startswith("!") else [flag, value]
    proto = rule.protocol
    if proto and proto not in ("ip", "all", "0"):
        toks += ["!", "-p", proto[1:]] if proto.startswith("!") else ["-p", proto]
    ip = rule.get_ip()
    for m in rule.matches:
        toks += ["-m", m.name, *_saved(m, ip)]
    target = rule.target
    if target is not None and target.name:
        toks += ["-g" if getattr(target, "goto", False) else "-j", target.name]
        toks += _saved(target, ip)
    return tuple(toks)


def _owned_chains(table: Any) -> list[str]:
    return [c.name for c in table.chains if c.name.startswith(CHAIN_PREFIX)]


def _jumps_to_owned(table: Any, chain: str) -> list[tuple[int, tuple[str, ...]]]:
    """(position, tokens) of the rules in built-in `chain` that jump to an owned chain."""
    out = []
    for pos, rule in enumerate(iptc.Chain(table, chain).rules):
        target = rule.target
        if target is not None and (target.name or "").startswith(CHAIN_PREFIX):
            out.append((pos, _render_rule(rule)))
    return out


def _delete_positions(table: Any, chain: str, positions: Sequence[int]) -> None:
    for pos in sorted(positions, reverse=True):  # from the end: earlier positions stay valid
        if table._iptc.iptc_delete_num_entry(chain.encode(), pos, table._handle) != 1:
            raise RedirectionError(f"delete rule {pos} of {table.name}/{chain}: {table.strerror()}")


def _builtins(table: Any) -> list[str]:
    return [c.name for c in table.chains if table.builtin_chain(c.name)]


def _stage_apply(table: Any, ruleset: RuleSet) -> None:
    """Edit one table's private handle to hold exactly `ruleset`'s part (not committed)."""
    name = table.name
    wanted = {c for t, c in ruleset.chains if t == name}
    wanted_jumps = [j for j in ruleset.jumps if j.table == name]
    missing_jumps: list[Rule] = []
    for builtin in _builtins(table):
        keep: set[tuple[str, ...]] = set()
        drop = []
        want_here = {j.spec for j in wanted_jumps if j.chain == builtin}
        for pos, toks in _jumps_to_owned(table, builtin):
            if toks in want_here and toks not in keep:
                keep.add(toks)
            else:
                drop.append(pos)  # a duplicate, or a jump to a chain we no longer own
        _delete_positions(table, builtin, drop)
        for j in wanted_jumps:
            if j.chain == builtin and j.spec not in keep:
                missing_jumps.append(j)
    existing = set(_owned_chains(table))
    for chain in sorted(existing - wanted):
        table.flush_entries(chain)
        table.delete_chain(chain)
    for chain in sorted(wanted):
        if chain in existing:
            table.flush_entries(chain)
        else:
            table.create_chain(chain)
        for rule in ruleset.chains[(name, chain)]:
            iptc.Chain(table, chain).append_rule(_make_rule(table, rule.spec))
    # Jumps last: their target chains must exist in the handle first.
    for j in missing_jumps:
        iptc.Chain(table, j.chain).append_rule(_make_rule(table, j.spec))


def _stage_remove(table: Any) -> None:
    for builtin in _builtins(table):
        _delete_positions(table, builtin, [pos for pos, _ in _jumps_to_owned(table, builtin)])
    for chain in _owned_chains(table):
        table.flush_entries(chain)
        table.delete_chain(chain)


def _open_tables(names: Sequence[str], where: str) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    try:
        for name in names:
            tables[name] = _Table(name)
    except Exception as e:
        _close(tables)
        raise RedirectionError(
            f"open iptables table {name} in netns {where}: {_iptc_error(e)}"
        ) from None
    return tables


def _close(tables: dict[str, Any]) -> None:
    for t in tables.values():
        t.close()  # autocommit is off: this frees the handle, it commits nothing


def _remove_locked(where: str) -> None:
    tables = _open_tables(TABLES, where)
    try:
        for name in TABLES:
            try:
                _stage_remove(tables[name])
                tables[name].commit()
            except Exception as e:
                raise RedirectionError(
                    f"remove iptables rules in netns {where}: {name}: {_iptc_error(e)}"
                ) from None
    finally:
        _close(tables)


def apply_rules(ruleset: RuleSet, *, where: str = "current") -> None:
    """Make the live owned chains and jumps exactly `ruleset`: all tables or none."""
    with _lock:
        tables = _open_tables(TABLES, where)
        committed: list[str] = []
        try:
            for name in TABLES:
                try:
                    _stage_apply(tables[name], ruleset)
                except Exception as e:
                    raise RedirectionError(
                        f"apply iptables rules in netns {where}: {name}: {_iptc_error(e)}"
                    ) from None
            for name in TABLES:
                try:
                    tables[name].commit()
                except Exception as e:
                    raise RedirectionError(
                        f"apply iptables rules in netns {where}: commit {name}: "
                        f"{_iptc_error(e)}" + (" (rolled back)" if committed else "")
                    ) from None
                committed.append(name)
        except RedirectionError:
            if committed:
                _close(tables)
                tables = {}
                _remove_locked(where)
            raise
        finally:
            _close(tables)


def remove_rules(*, where: str = "current") -> None:
    """Delete every jump to a `MESH_` chain and every `MESH_` chain; no-op when absent."""
    with _lock:
        _remove_locked(where)


def read_back(*, where: str = "current") -> RuleSet:
    """The live owned chains (with their rules) and the jumps to them, as plain data."""
    with _lock:
        tables = _open_tables(TABLES, where)
        try:
            chains: dict[tuple[str, str], tuple[Rule, ...]] = {}
            jumps: list[Rule] = []
            for name in TABLES:
                t = tables[name]
                for builtin in _builtins(t):
                    jumps += [Rule(name, builtin, toks) for _, toks in _jumps_to_owned(t, builtin)]
                for chain in _owned_chains(t):
                    chains[(name, chain)] = tuple(
                        Rule(name, chain, _render_rule(r)) for r in iptc.Chain(t, chain).rules
                    )
            return RuleSet(chains=chains, jumps=tuple(jumps))
        except Exception as e:
            raise RedirectionError(
                f"read iptables rules in netns {where}: {_iptc_error(e)}"
            ) from None
        finally:
            _close(tables)


class TableEdit:
    """An uncommitted edit of one table on a private libiptc handle (see `edit_table`). Rules
    are iptables-save tokens, as `RuleSet` holds them; positions count from 0."""

    def __init__(self, table: _Table) -> None:
        self._table = table

    def has_chain(self, chain: str) -> bool:
        return any(c.name == chain for c in self._table.chains)

    def rules(self, chain: str) -> list[tuple[str, ...]]:
        return [_render_rule(r) for r in iptc.Chain(self._table, chain).rules]

    def jump_positions(self, chain: str, target: str) -> list[int]:
        """Positions of the rules in `chain` that jump (or go) to `target`."""
        return [
            pos
            for pos, rule in enumerate(iptc.Chain(self._table, chain).rules)
            if rule.target is not None and rule.target.name == target
        ]

    def create_or_flush_chain(self, chain: str) -> None:
        if self.has_chain(chain):
            self._table.flush_entries(chain)
        else:
            self._table.create_chain(chain)

    def delete_chain(self, chain: str) -> None:
        self._table.flush_entries(chain)
        self._table.delete_chain(chain)

    def append_rule(self, chain: str, spec: Sequence[str]) -> None:
        iptc.Chain(self._table, chain).append_rule(_make_rule(self._table, spec))

    def insert_rule(self, chain: str, spec: Sequence[str]) -> None:
        """Insert as the first rule of `chain`."""
        iptc.Chain(self._table, chain).insert_rule(_make_rule(self._table, spec))

    def delete_rules(self, chain: str, positions: Iterable[int]) -> None:
        _delete_positions(self._table, chain, list(positions))


@contextmanager
def _table_handle(name: str, *, what: str, where: str, commit: bool) -> Iterator[TableEdit]:
    with _lock:
        try:
            table = _Table(name)
        except Exception as e:
            raise RedirectionError(
                f"{what}: open iptables table {name} in netns {where}: {_iptc_error(e)}"
            ) from None
        try:
            yield TableEdit(table)
            if commit:
                table.commit()
        except RedirectionError:
            raise
        except Exception as e:
            raise RedirectionError(f"{what} in netns {where}: {_iptc_error(e)}") from None
        finally:
            table.close()  # autocommit is off: this frees the handle, it commits nothing


def edit_table(name: str, *, what: str, where: str = "current") -> ContextManager[TableEdit]:
    """Edit table `name` in the calling thread's netns; one atomic commit when the block ends
    without an error, nothing applied otherwise. Holds the module's lock throughout. Any failure
    is a RedirectionError `"{what} in netns {where}: …"`."""
    return _table_handle(name, what=what, where=where, commit=True)


def read_table(name: str, *, what: str, where: str = "current") -> ContextManager[TableEdit]:
    """Read table `name` (the same view as `edit_table`, never committed)."""
    return _table_handle(name, what=what, where=where, commit=False)
