"""Netns: open/identify, run in a namespace and come back, sockets that live in the pod."""

from __future__ import annotations

import errno
import os
import socket
import threading

import pytest
import trio
from inpod_net import POD_IP, Pair, ip

from nodeagent.contract import MESH_MARK
from nodeagent.inpod import Netns, NetnsError
from nodeagent.inpod.sockopt import IP_BIND_ADDRESS_NO_PORT, IP_TRANSPARENT


def _thread_netns() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return (st.st_dev, st.st_ino)


def test_open_missing_path_names_it() -> None:
    with pytest.raises(NetnsError) as info:
        Netns.open("/run/netns/inpod-does-not-exist")
    assert (
        str(info.value) == "enter netns /run/netns/inpod-does-not-exist: No such file or directory"
    )
    assert info.value.errno == errno.ENOENT


def test_open_rejects_a_file_that_is_not_a_netns(tmp_path: object) -> None:
    with pytest.raises(NetnsError, match="not a network namespace"):
        Netns.open("/proc/self/ns/uts")


@pytest.mark.root
def test_run_enters_and_restores(pair: Pair) -> None:
    home = _thread_netns()
    inside = pair.pod.run(_thread_netns)
    assert inside == pair.pod.identity != home
    assert _thread_netns() == home
    # An exception inside still restores.
    with pytest.raises(ZeroDivisionError):
        pair.pod.run(lambda: 1 // 0)
    assert _thread_netns() == home


@pytest.mark.root
async def test_arun_leaves_worker_threads_home(pair: Pair) -> None:
    home = _thread_netns()
    assert await pair.pod.arun(_thread_netns) == pair.pod.identity
    # trio reuses its worker threads: the next job must not find itself in the pod.
    seen = [await trio.to_thread.run_sync(_thread_netns) for _ in range(3)]
    assert seen == [home] * 3


@pytest.mark.root
def test_identity_detects_recreated_path(pair: Pair) -> None:
    path = f"/run/netns/{pair.pod_name}"
    again = Netns.open(path)
    try:
        assert again == pair.pod
        assert again.path_matches()
        assert pair.pod != pair.peer
    finally:
        again.close()
    name = f"inpod-t{os.getpid()}-recreated"
    ip("netns", "add", name)
    try:
        ns = Netns.open(f"/run/netns/{name}")
        with ns:
            ip("netns", "del", name)
            assert not ns.path_matches()
            ip("netns", "add", name)
            assert not ns.path_matches()  # same path, another namespace
            assert Netns.open(f"/run/netns/{name}") != ns
            # The handle keeps the old namespace usable.
            assert ns.run(_thread_netns) == ns.identity
    finally:
        ip("netns", "del", name)


@pytest.mark.root
def test_from_fd(pair: Pair) -> None:
    fd = os.open(f"/run/netns/{pair.pod_name}", os.O_RDONLY)
    try:
        with Netns.from_fd(fd, name="cni-xyz") as ns:
            assert ns == pair.pod
            assert ns.name == "cni-xyz"
        os.fstat(fd)  # the caller's fd is still open
    finally:
        os.close(fd)


@pytest.mark.root
def test_socket_lives_in_the_pod_with_mark(pair: Pair) -> None:
    s = pair.pod.socket(transparent=True)
    try:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == MESH_MARK
        assert s.getsockopt(socket.SOL_IP, IP_TRANSPARENT) == 1
        assert s.getsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT) == 1
        assert not s.getblocking()
        s.bind((POD_IP, 0))  # only the pod owns this address
    finally:
        s.close()
    plain = pair.pod.socket(mark=0)
    with plain:
        assert plain.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
        assert plain.getsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT) == 0
    # The same bind from the test's own namespace fails: the address is not there.
    with socket.socket() as here, pytest.raises(OSError, match="assign requested address") as info:
        here.bind((POD_IP, 0))
    assert info.value.errno == errno.EADDRNOTAVAIL


@pytest.mark.root
def test_socket_is_thread_safe(pair: Pair) -> None:
    home = _thread_netns()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(200):
                with pair.pod.socket() as s:
                    s.bind((POD_IP, 0))
                assert _thread_netns() == home
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []


@pytest.mark.root
def test_closed_handle_is_an_error(pair: Pair) -> None:
    ns = Netns.open(f"/run/netns/{pair.pod_name}")
    ns.close()
    assert ns.closed
    with pytest.raises(NetnsError, match="handle is closed"):
        ns.socket()
