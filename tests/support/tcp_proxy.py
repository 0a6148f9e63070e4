"""A TCP proxy that can freeze, for tests of what the operator does on dead connections.

``freeze()`` makes every connection open at that moment a black hole for good:
bytes are neither forwarded nor answered and the socket is never closed (a lost
NAT entry, a hung load balancer). Connections made while frozen are the same.
After ``thaw()``, new connections work again; the frozen ones stay dead, so only
timeouts get a client off them.
"""

from __future__ import annotations

import socket
import threading


class FreezableProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._frozen = threading.Event()
        self._lock = threading.Lock()
        self._dead: list[socket.socket] = []  # kept open, never read: the black hole
        self._live: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def freeze(self) -> None:
        with self._lock:
            self._frozen.set()
            for pair in self._live:
                self._dead.extend(pair)
            self._live.clear()

    def thaw(self) -> None:
        self._frozen.clear()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._dead + [s for pair in self._live for s in pair]:
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._frozen.is_set():
                    self._dead.append(client)
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                pair = (client, upstream)
                self._live.append(pair)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket,
              dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with self._lock:
                if pair not in self._live:
                    return  # frozen: what was read is dropped, nothing more moves
                if not data:
                    self._live.remove(pair)
                    for s in pair:
                        s.close()
                    return
            try:
                dst.sendall(data)
            except OSError:
                return
