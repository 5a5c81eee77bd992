"""`nodeagent uninstall`: remove every rule the agent ever installed on this node.

Reads the enrollment records the agent persisted, removes each pod's redirection (a pod whose
netns is gone took its rules with it), removes the node's probe SNAT chain (nodeagent.inpod.
node_rules, in the netns uninstall runs in: the node's, like the agent), unregisters the
workloads and deletes the records.
"""

from __future__ import annotations

from pathlib import Path

from nodeagent.agent.state import AgentState
from nodeagent.inpod import InpodError, Netns, aremove_redirection
from nodeagent.inpod.node_rules import aremove_probe_rules
from nodeagent.log import get_logger
from nodeagent.store import keys, open_store
from nodeagent.store.base import StoreError

log = get_logger("agent.uninstall")


async def uninstall(*, node: str, store_url: str, state_file: Path) -> int:
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
