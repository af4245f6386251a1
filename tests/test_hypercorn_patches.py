"""The patches refimpl makes to hypercorn, and the checks that keep them honest.

``refimpl/hypercorn_patches.py`` replaces three hypercorn classes process-wide
(the write fast path; the watchdog's WebSocket and HTTP/1.1 streams), and the
listener class hypercorn's trio worker builds (the batched accept); and
``refimpl/hypercorn_h2.py``, which it installs, two more (HTTP/2 flow control).  Overriding methods a library
does not promise to keep is safe only while the code under the overrides is
the code they were written against, so:

* :func:`test_hypercorn_is_what_the_patches_were_written_for` compares the
  installed hypercorn's method fingerprints with ``WRITTEN_FOR``: it is *the*
  test that fails when hypercorn changes, and its message says what to re-read;
* ``install()`` refuses to run when hypercorn no longer creates the classes it
  swaps, warns (and still installs) when a fingerprint differs, and is
  idempotent and reversible.

Every test that installs puts hypercorn's module attributes back afterwards
(``monkeypatch``), so no other test sees a state it did not ask for.
"""

from __future__ import annotations

import inspect
import logging

import hypercorn.protocol as hypercorn_protocol
import hypercorn.protocol.h2 as hypercorn_h2_module
import hypercorn.protocol.h11 as hypercorn_h11
import hypercorn.trio.run as hypercorn_run
import pytest
import trio
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import TCPServer

from refimpl import hypercorn_h2, hypercorn_patches
from refimpl.hypercorn_contain import ContainedTCPServer
from refimpl.hypercorn_patches import WRITTEN_FOR, FastTCPServer, WatchedWSStream


@pytest.fixture(autouse=True)
def restore_hypercorn(monkeypatch):
    """Whatever a test installs, hypercorn's classes are put back after it."""
    monkeypatch.setattr(hypercorn_run, "TCPServer", hypercorn_run.TCPServer)
    monkeypatch.setattr(hypercorn_h11, "WSStream", hypercorn_h11.WSStream)
    monkeypatch.setattr(hypercorn_h11, "HTTPStream", hypercorn_h11.HTTPStream)
    monkeypatch.setattr(hypercorn_run, "trio", hypercorn_run.trio)
    monkeypatch.setattr(hypercorn_protocol, "H2Protocol", hypercorn_protocol.H2Protocol)
    monkeypatch.setattr(hypercorn_h2_module, "StreamBuffer", hypercorn_h2_module.StreamBuffer)


def test_hypercorn_is_what_the_patches_were_written_for():
    found = hypercorn_patches.fingerprints()
    changed = [name for name in WRITTEN_FOR if found.get(name) != WRITTEN_FOR[name]]
    files = {
        "TCPServer": inspect.getsourcefile(TCPServer),
        "WSStream": inspect.getsourcefile(WSStream),
        "HTTPStream": inspect.getsourcefile(HTTPStream),
        "H11Protocol": inspect.getsourcefile(hypercorn_h11),
        "StreamBuffer": inspect.getsourcefile(hypercorn_h2_module),
        "H2Protocol": inspect.getsourcefile(hypercorn_h2_module),
    }
    reread = [f"{name} ({files[name.partition('.')[0]]})" for name in changed if name != "version"]
    assert found == WRITTEN_FOR, (
        f"hypercorn changed under refimpl/hypercorn_patches.py (installed {found['version']}, "
        f"written for {WRITTEN_FOR['version']}; changed: {', '.join(changed)}).  Re-read "
        f"{', '.join(reread) or 'the methods in WRITTEN_FOR'} against FastTCPServer.protocol_send "
        "and the Watched* stream classes (the HTTP/2 methods against hypercorn_h2.py's classes) and the "
        "modules' docstrings' argument for why they are safe; fix the overrides if it no longer holds, "
        "then copy the new values of fingerprints() into WRITTEN_FOR (hypercorn_h2.WRITTEN_FOR for the "
        "HTTP/2 ones)."
    )


def test_fingerprints_are_of_the_stock_classes_not_ours():
    """After install(), hypercorn's module names point at our subclasses; the
    fingerprints must still be taken from hypercorn's own code."""
    hypercorn_patches.install(True)
    assert hypercorn_run.TCPServer is FastTCPServer and hypercorn_h11.WSStream is WatchedWSStream
    assert hypercorn_patches.fingerprints() == WRITTEN_FOR


def test_the_http2_patch_is_under_the_same_check():
    """hypercorn_h2.py's overrides are fingerprinted in WRITTEN_FOR, so the
    test above fails when one of those hypercorn methods changes too."""
    assert hypercorn_h2.WRITTEN_FOR.items() <= WRITTEN_FOR.items()
    assert hypercorn_h2.fingerprints().items() <= hypercorn_patches.fingerprints().items()
    hypercorn_patches.install(True)
    assert hypercorn_protocol.H2Protocol is hypercorn_h2.FlowH2Protocol
    assert hypercorn_h2_module.StreamBuffer is hypercorn_h2.FlowStreamBuffer
    assert hypercorn_h2.fingerprints() == hypercorn_h2.WRITTEN_FOR  # of hypercorn's classes, not ours


class Impostor:
    """What a future hypercorn might have put where the patched class was."""


#: Where hypercorn looks up each class install() swaps: module, attribute.
SWAPPED = {
    "TCPServer": (hypercorn_run, "TCPServer"),
    "WSStream": (hypercorn_h11, "WSStream"),
    "HTTPStream": (hypercorn_h11, "HTTPStream"),
    "H2Protocol": (hypercorn_protocol, "H2Protocol"),
    "StreamBuffer": (hypercorn_h2_module, "StreamBuffer"),
}


@pytest.mark.parametrize("replaced", SWAPPED)
def test_install_refuses_when_hypercorn_creates_other_classes(monkeypatch, replaced):
    monkeypatch.setattr(*SWAPPED[replaced], Impostor)
    before = {name: getattr(*where) for name, where in SWAPPED.items()}
    with pytest.raises(RuntimeError, match="no longer creates the classes refimpl patches"):
        hypercorn_patches.install(True)
    # Nothing half-installed: neither name was touched.
    assert {name: getattr(*where) for name, where in SWAPPED.items()} == before


def test_install_warns_when_hypercorn_changed_and_still_installs(monkeypatch, caplog):
    changed = {**WRITTEN_FOR, "version": "0.19.0", "WSStream.handle": "0" * 16}
    monkeypatch.setattr(hypercorn_patches, "fingerprints", lambda: changed)
    with caplog.at_level(logging.WARNING, logger="refimpl"):
        assert hypercorn_patches.install(True)
    [record] = [r for r in caplog.records if r.name == "refimpl"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"refimpl's hypercorn patches were written for hypercorn {WRITTEN_FOR['version']}; this is 0.19.0, "
        "and the source of WSStream.handle changed: re-read hypercorn_patches.py and hypercorn_h2.py against it"
    )
    assert hypercorn_run.TCPServer is FastTCPServer and hypercorn_h11.WSStream is WatchedWSStream


def test_install_is_silent_when_hypercorn_is_unchanged(caplog):
    with caplog.at_level(logging.WARNING, logger="refimpl"):
        hypercorn_patches.install(True)
    assert [r for r in caplog.records if r.name == "refimpl"] == []


def test_install_is_explicit_idempotent_and_reversible(monkeypatch):
    assert hypercorn_patches.install(True) and hypercorn_patches.install(True)
    assert hypercorn_run.TCPServer is FastTCPServer and hypercorn_h11.WSStream is WatchedWSStream
    # Without the fast path, hypercorn's write path, still contained
    # (hypercorn_contain.py: one connection's failure never ends the server).
    assert not hypercorn_patches.install(False) and hypercorn_run.TCPServer is ContainedTCPServer
    # Without the fast path the watchdog stays: a route that puts no Watchdog
    # in its scope gets stock behaviour from it.
    assert hypercorn_h11.WSStream is WatchedWSStream
    monkeypatch.setenv("REFIMPL_FASTWRITE", "0")
    assert not hypercorn_patches.install() and hypercorn_run.TCPServer is ContainedTCPServer
    monkeypatch.setenv("REFIMPL_FASTWRITE", "1")
    assert hypercorn_patches.install() and hypercorn_run.TCPServer is FastTCPServer


# -- 3. accepting a burst ----------------------------------------------------
def test_install_gives_hypercorn_the_batched_listener(monkeypatch):
    monkeypatch.delenv("REFIMPL_BATCH_ACCEPT", raising=False)
    hypercorn_patches.install()
    assert hypercorn_run.trio.SocketListener is hypercorn_patches.BatchedListener
    assert hypercorn_run.trio.open_nursery is trio.open_nursery  # the rest is trio's
    monkeypatch.setenv("REFIMPL_BATCH_ACCEPT", "0")
    hypercorn_patches.install()
    assert hypercorn_run.trio is trio


async def test_one_wake_up_accepts_every_waiting_connection():
    """Ten clients already in the accept queue: the first accept waits (the
    trio way), and takes the nine others with it, so they are handed out
    without a trip through the scheduler each (lesson 13, "a burst")."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    listener = hypercorn_patches.BatchedListener(sock)
    clients = [await trio.open_tcp_stream(*sock.getsockname()) for _ in range(10)]
    try:
        first = await listener.accept()
        assert len(listener._waiting) == 9
        rest = [await listener.accept() for _ in range(9)]
        for i, client in enumerate(clients):  # each is a real, distinct connection
            await client.send_all(b"%d" % i)
        got = {(await s.receive_some(8)) for s in [first, *rest]}
        assert got == {b"%d" % i for i in range(10)}
        clients.append(await trio.open_tcp_stream(*sock.getsockname()))
        extra = await listener.accept()  # the queue was empty again: it waits
        await extra.aclose()
    finally:
        for stream in clients:
            await stream.aclose()
        await listener.aclose()
