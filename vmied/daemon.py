"""``vmied serve``: the long-running service (EC2 API, tasks, metrics) under systemd or by hand.

Start: read the configuration (a bad file stops the start, naming the key), make sure there is an
access key (first start: generate one and write it as the ``vmied`` AWS profile), start the task
service, bind every ``server.listen`` address (or take systemd's sockets), then tell systemd
READY=1 and answer ``/readyz`` with 200.

Routes beside the EC2 endpoint (``POST /`` and signed ``GET /?Action=...``): ``/metrics``
(Prometheus), ``/healthz`` (the process answers), ``/readyz`` (ready for work: 503 while starting or
stopping), ``GET /`` without an Action (the status page for a browser), ``/status.json``.

Signals: SIGTERM/SIGINT -> STOPPING=1, /readyz 503, the service stops taking tasks and lets
running parts finish within ``server.grace_period`` (checkpointing the rest), exit 0. SIGHUP ->
reload the configuration (credentials, policies, limits, log level); a bad file keeps the old
configuration and says why in the log.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import secrets
import signal
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import __version__, metrics, systemd
from .api.app import make_ec2_app, reconfigure_ec2_app
from .config import Config, Credential, load_config, render, split_address
from .errors import StorageError, UsageError, VmiedError
from .log import setup_logging
from .tasks.service import Service

log = logging.getLogger("vmied.daemon")

PROFILE = "vmied"
CREDENTIALS_NAME = "credentials.toml"
#: Extra time, beyond the grace period, for closing connections and the database.
SHUTDOWN_MARGIN = 10.0


# --- first-start credentials ------------------------------------------------------------------------

def generated_credential(config: Config) -> Credential:
    """The daemon's own access key, made on the first start and kept in ``<state>/credentials.toml``."""
    path = os.path.join(config.state.directory, CREDENTIALS_NAME)
    try:
        with open(path, "rb") as file:
            kept = tomllib.load(file)
        return Credential(access_key_id=str(kept["access_key_id"]),
                          secret_access_key=str(kept["secret_access_key"]),
                          account_id=config.server.account_id)
    except FileNotFoundError:
        pass
    except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        raise UsageError(f"{path}: cannot read the generated credentials ({exc}); remove the file to "
                         "generate new ones") from None
    # AWS's shapes: 20 upper-case characters starting AKIA, a 40-character secret.
    access_key_id = "AKIA" + base64.b32encode(secrets.token_bytes(10)).decode()[:16]
    secret = base64.b64encode(secrets.token_bytes(30)).decode()
    write_private(path, f'access_key_id = "{access_key_id}"\nsecret_access_key = "{secret}"\n')
    log.info("generated an access key on first start", extra={"access_key_id": access_key_id, "file": path})
    return Credential(access_key_id=access_key_id, secret_access_key=secret, account_id=config.server.account_id)


def write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, replacing it in one step."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def replace_ini_section(text: str, header: str, body: dict[str, str]) -> str:
    """``text`` (an AWS shared file) with section ``[header]`` replaced by ``body``; the rest untouched."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            skipping = stripped[1:-1].strip() == header
        if not skipping:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    section = [f"[{header}]", *(f"{key} = {value}" for key, value in body.items())]
    return "\n".join([*kept, *([""] if kept else []), *section]) + "\n"


def update_shared_file(path: str, header: str, body: dict[str, str]) -> bool:
    """Put section ``header`` into the AWS file ``path``; False if it already said exactly that."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        text = ""
    updated = replace_ini_section(text, header, body)
    if updated == text:
        return False
    write_private(path, updated)
    return True


def endpoint_url(config: Config) -> str:
    """The URL a client on this machine uses to reach the first listen address."""
    host, port = split_address(config.server.listen[0])
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def with_credentials(config: Config) -> Config:
    """``config`` itself if it names access keys, else with the generated key (written as a profile)."""
    if config.credentials:
        return config
    credential = generated_credential(config)
    wrote = update_shared_file(config.credentials_file, PROFILE, {
        "aws_access_key_id": credential.access_key_id, "aws_secret_access_key": credential.secret_access_key})
    wrote |= update_shared_file(config.aws_config_file, f"profile {PROFILE}", {
        "region": config.server.region, "endpoint_url": endpoint_url(config)})
    if wrote:
        log.info("wrote the AWS profile", extra={"profile": PROFILE, "credentials_file": config.credentials_file,
                                                   "config_file": config.aws_config_file})
    return dataclasses.replace(config, credentials=[credential])


# --- the daemon -------------------------------------------------------------------------------------

class Daemon:
    def __init__(self, config_path: str | None, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.service: Service | None = None
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None
        self.ready = False
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.addresses: list[str] = []
        self._reloading: asyncio.Task[None] | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        systemd.notify("STATUS=starting")
        self.config = await asyncio.to_thread(self.prepare_state, self.config)
        self.service = await systemd.extending_start(
            Service.start(self.config), "starting: cleaning up after the last run (store, interrupted tasks)")
        try:
            await self.listen()
            self.ready = not self.stopping.is_set()  # a SIGTERM during the start: straight to the stop
            metrics.READY.set(int(self.ready))
            status = f"serving on {', '.join(self.addresses)}"
            if self.ready:
                systemd.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
                log.info("ready", extra={"listen": self.addresses, "version": __version__})
            watchdog = asyncio.create_task(self.watchdog())
            await self.stopping.wait()
            watchdog.cancel()
        finally:
            await self.shutdown()
        return 0

    @staticmethod
    def prepare_state(config: Config) -> Config:
        """The state directory made and the access key in place (generated and written on first start)."""
        try:
            os.makedirs(config.state.directory, mode=0o700, exist_ok=True)
            return with_credentials(config)
        except OSError as exc:
            raise StorageError(f"{exc.filename or config.state.directory}: {exc.strerror or exc}",
                               reason="state.io") from None

    def application(self) -> web.Application:
        app = make_ec2_app(self.config, self.service, status_page=self.status_page)
        # Outermost, so the operator's routes never reach the EC2 endpoint (which serves any path).
        app.middlewares.insert(0, self.ops_routes)
        return app

    async def listen(self) -> None:
        self.app = self.application()
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await self.runner.setup()
        inherited = systemd.listen_sockets()
        sites: list[web.BaseSite] = []
        if inherited:
            sites = [web.SockSite(self.runner, sock) for sock in inherited]
        else:
            for address in self.config.server.listen:
                host, port = split_address(address)
                sites.append(web.TCPSite(self.runner, host, port, reuse_address=True))
        for site in sites:
            try:
                await site.start()
            except OSError as exc:
                raise UsageError(f"cannot listen on {site.name}: {exc.strerror or exc}") from None
        self.addresses = [address for sock in self.runner.addresses if (address := format_address(sock))]

    async def watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        while interval:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def shutdown(self) -> None:
        grace = self.config.server.grace_period
        self.ready = False
        metrics.READY.set(0)
        systemd.notify("STOPPING=1", "STATUS=stopping: letting running tasks finish")
        log.info("stopping", extra={"grace_period": grace})
        if self._reloading:
            await asyncio.gather(self._reloading, return_exceptions=True)
        if self.service is not None:
            try:
                await asyncio.wait_for(self.service.stop(grace), grace + SHUTDOWN_MARGIN)
            except TimeoutError:
                log.error("the service did not stop within the grace period", extra={"grace_period": grace})
        if self.runner is not None:
            await self.runner.cleanup()
        log.info("stopped")

    # --- SIGHUP ---

    def request_reload(self) -> None:
        if self._reloading and not self._reloading.done():
            log.info("reload already in progress")
            return
        self._reloading = asyncio.create_task(self.reload())

    async def reload(self) -> None:
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            fresh = await asyncio.to_thread(load_config, self.config_path)
            fresh = await asyncio.to_thread(self.prepare_state, fresh)
            listen_changed = fresh.server.listen != self.config.server.listen
            if self.app is not None:
                reconfigure_ec2_app(self.app, fresh)  # refuses (changing nothing) a policy it cannot evaluate
            setup_logging(fresh.log)
            if self.service is not None:
                await self.service.reload(fresh)
        except VmiedError as exc:
            metrics.CONFIG_RELOADS.labels("failed").inc()
            log.error("reload refused; keeping the running configuration",
                      extra={"error": exc.message, "reason": exc.reason})
            return
        finally:
            systemd.notify("READY=1")
        self.config = fresh
        metrics.CONFIG_RELOADS.labels("ok").inc()
        if listen_changed:
            log.warning("server.listen changes need a restart", extra={"listen": fresh.server.listen})
        log.info("configuration reloaded", extra={"files": list(fresh.sources), "log_level": fresh.log.level})

    # --- operator routes ---

    @web.middleware
    async def ops_routes(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        route = OPS_ROUTES.get((request.method, request.path))
        if route is not None:
            response = await route(self, request)
            # Scrapes and probes come every few seconds: at debug, not at info.
            log.debug("%s %s %d", request.method, request.path, response.status,
                      extra={"path": request.path, "status": response.status, "remote": request.remote})
            return response
        return await handler(request)

    async def metrics_route(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready and not self.stopping.is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "stopping" if self.stopping.is_set() else "starting"}, status=503)

    async def status_json(self, request: web.Request) -> web.Response:
        return web.json_response(await self.status())

    async def status_page(self, request: web.Request) -> web.StreamResponse:
        from .status import render_page
        return web.Response(text=render_page(await self.status()), content_type="text/html")

    async def status(self) -> dict[str, Any]:
        """What the status page shows: the daemon, task counts, running tasks and recent failures."""
        tasks: dict[str, Any] = {"running": [], "failed": []}
        if self.service is not None:
            tasks = await self.service.status_summary()
        return {
            "version": __version__, "ready": self.ready, "uptime_seconds": round(time.time() - self.started, 1),
            "listen": self.addresses, "region": self.config.server.region,
            "counts": task_counts(), **tasks,
        }


OPS_ROUTES: dict[tuple[str, str], Callable[[Daemon, web.Request], Awaitable[web.StreamResponse]]] = {
    ("GET", "/metrics"): Daemon.metrics_route,
    ("GET", "/healthz"): Daemon.healthz,
    ("HEAD", "/healthz"): Daemon.healthz,
    ("GET", "/readyz"): Daemon.readyz,
    ("HEAD", "/readyz"): Daemon.readyz,
    ("GET", "/status.json"): Daemon.status_json,
}


def task_counts() -> dict[str, dict[str, int]]:
    """Tasks by kind and state, as the metrics hold them (so the page and Prometheus agree)."""
    counts: dict[str, dict[str, int]] = {}
    for family in metrics.TASKS.collect():
        for sample in family.samples:
            counts.setdefault(sample.labels["kind"], {})[sample.labels["state"]] = int(sample.value)
    return counts


def format_address(sock: Any) -> str:
    if isinstance(sock, tuple) and len(sock) >= 2:
        host, port = sock[0], sock[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sock) if sock else ""


# --- entry points -----------------------------------------------------------------------------------

async def serve(config_path: str | None) -> int:
    """Run the daemon until SIGTERM; a refused start raises VmiedError (the CLI prints it, exit 2 or 4)."""
    try:
        config = load_config(config_path)
        setup_logging(config.log)
        return await Daemon(config_path, config).run()
    except VmiedError as exc:
        systemd.notify(f"STATUS=cannot start: {exc.message}")
        raise


def show_config(config_path: str | None) -> int:
    config = load_config(config_path)
    sys.stdout.write(render(config, mask_secrets=True))
    return 0


