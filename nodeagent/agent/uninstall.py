"""`nodeagent uninstall`: stop the agent, then remove every rule it ever installed on this node.

A running agent re-creates what it owns (its lease, registrations, the node's probe SNAT chain),
so removing things under it is undone within a second. Uninstall therefore holds the run dir's
uninstall lock (a starting agent refuses to run, a running one that loses its lease stops instead
of registering again), stops the agent named by the run dir's pid file (SIGTERM, then waits for
its exit, bounded; if it does not exit, nothing is removed and the pid is named), and only then
reads the enrollment records the agent persisted, removes each pod's redirection (a pod whose
netns is gone took its rules with it), removes the node's probe SNAT chain (nodeagent.inpod.
node_rules, in the netns uninstall runs in: the node's, like the agent), unregisters the
workloads, then the node's record (in that order: other agents apply a workload deletion at
once only while the node record lives), revokes the lease and deletes the records.

Stopping rather than refusing: uninstall's whole job is the order "stop the writer, then remove
what it wrote"; refusing would leave every operator and script to get that order right by hand.
"""

from __future__ import annotations

from pathlib import Path

import trio

from nodeagent.agent import pidfile
from nodeagent.agent.state import AgentState
from nodeagent.inpod import InpodError, Netns, aremove_redirection
from nodeagent.inpod.node_rules import aremove_probe_rules
from nodeagent.log import get_logger
from nodeagent.store import keys, open_store
from nodeagent.store.base import StoreError

log = get_logger("agent.uninstall")


async def uninstall(*, node: str, store_url: str, run_dir: Path, stop_timeout: float = 30.0) -> int:
    try:
        lock = pidfile.take_uninstall_lock(run_dir)
    except pidfile.RunDirBusy as exc:
        log.error("uninstall.busy", error=str(exc))
        return 1
    try:
        if not await _stop_agent(run_dir, stop_timeout):
            return 1
        return await _remove_all(node, store_url, run_dir / "enrolled.msgpack")
    finally:
        lock.release()


async def _stop_agent(run_dir: Path, wait: float) -> bool:
    """True once no agent runs in `run_dir` (stopping the one that does)."""
    pid = pidfile.running_agent(run_dir)
    if pid is None:
        return True
    if pid <= 0:
        log.error(
            "uninstall.agent_unknown",
            pid_file=str(run_dir / pidfile.PID_FILE),
            error="an agent holds the pid file but its pid is unreadable; stop it first",
        )
        return False
    log.info("uninstall.stopping_agent", pid=pid)
    if not await trio.to_thread.run_sync(pidfile.stop_and_wait, pid, wait):
        log.error("uninstall.agent_still_running", pid=pid, waited=wait, removed="nothing")
        return False
    log.info("uninstall.agent_stopped", pid=pid)
    return True


async def _remove_all(node: str, store_url: str, state_file: Path) -> int:
    state = AgentState.load(state_file)
    uids = list(state.pods)
    failures = 0
    for record in list(state.pods.values()):
        try:
            netns = Netns.open(record.netns)
        except InpodError:
            log.info("uninstall.netns_gone", pod=record.key)
        else:
            try:
                if netns.identity == record.netns_id:
                    await aremove_redirection(netns)
                    log.info("uninstall.rules_removed", pod=record.key)
            except InpodError as exc:
                failures += 1
                log.error("uninstall.failed", pod=record.key, error=str(exc))
                continue
            finally:
                netns.close()
        state.pods.pop(record.uid)
    try:
        removed = await aremove_probe_rules()
        log.info("uninstall.probe_snat_removed" if removed else "uninstall.probe_snat_absent")
    except InpodError as exc:
        failures += 1
        log.error("uninstall.probe_snat_failed", error=str(exc))
    try:
        store = await open_store(store_url)
        try:
            for uid in uids:
                await store.delete(keys.workload(node, uid))
            await store.delete(keys.node(node))
            if state.lease:
                await store.revoke_lease(state.lease)
        finally:
            await store.aclose()
    except StoreError as exc:
        log.warning("uninstall.store_unreachable", error=str(exc), note="leases will expire")
    return _finish(state, failures)


def _finish(state: AgentState, failures: int) -> int:
    """Keep the records of pods that could not be cleaned (so a retry finds them)."""
    if failures:
        state.save()
        return 1
    state.path.unlink(missing_ok=True)
    return 0
