"""TLS contexts: the public listener's (swapped on reload) and the clients' for https targets.

The listener is bound once with one context. Its SNI callback, which runs on every new
handshake (with or without a server name), moves the connection to the context built from the
latest load, so after a reload new connections get the new certificate and open ones keep
theirs. Contexts are built off the event loop: loading a chain reads files.

https targets are verified against the system's CAs (aiohttp's default verified context,
made once at import), or against the service's `ca_file` only; `verify: false` turns the
check off and is warned about on every load (gateway.validate).
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from pathlib import Path
from typing import Final

from gateway.config.model import ListenerTls, ServiceTls


def server_context(tls: ListenerTls) -> ssl.SSLContext:
    """A server context for the listener (reads the files: not on the event loop)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


class ServerTls:
    """The listener's context and the current certificate's context it hands connections."""

    def __init__(self, tls: ListenerTls) -> None:
        """Loads the files: build it with asyncio.to_thread."""
        self.context = server_context(tls)  # what the listener is bound with
        self._current = self.context
        self.context.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject, _name: str | None, bound: ssl.SSLContext) -> None:
        current = self._current
        if current is not bound:
            connection.context = current  # this handshake goes on with the new certificate

    async def reload(self, tls: ListenerTls) -> None:
        """Re-read the certificate and key; raises (and keeps the old) when they do not load."""
        self._current = await asyncio.to_thread(server_context, tls)


def client_ssl(tls: ServiceTls) -> ssl.SSLContext | bool:
    """The `ssl` argument of a service's connector: True is aiohttp's verified default."""
    if not tls.verify:
        return False
    if tls.ca_pem:
        return ssl.create_default_context(cadata=tls.ca_pem)  # only these CAs; no file read
    return True


def file_problem(path: str) -> str | None:
    """Why a certificate, key or CA file cannot be read, or None. Never quotes the path."""
    if not os.path.isfile(path):
        return "no such file"
    if not os.access(path, os.R_OK):
        return "the file is not readable by the gateway"
    return None


def listener_problem(tls: ListenerTls) -> str | None:
    """Why the certificate and key do not make a server context, or None."""
    try:
        server_context(tls)
    except ssl.SSLError:
        return "the certificate and key do not load: not PEM, or the key does not match"
    except OSError as exc:
        return f"the certificate and key do not load: {exc.strerror or 'unreadable'}"
    return None


_PEM_CERTIFICATE: Final = re.compile(
    r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----"
)


def read_ca(path: str) -> str:
    """The PEM certificates of a CA file, without anything around them (reads the file)."""
    return "\n".join(_PEM_CERTIFICATE.findall(Path(path).read_text(errors="replace")))


def ca_problem(path: str) -> str | None:
    """Why a CA file holds no usable certificate, or None."""
    try:
        pem = read_ca(path)
        if pem:
            ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, OSError):
        pem = ""
    return None if pem else "holds no PEM CA certificate"
