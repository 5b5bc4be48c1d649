"""Prefect's temporary server, started by the command itself.

Without a Prefect server (no PREFECT_API_URL in the environment or the active profile), a flow
runs against a temporary one: a uvicorn subprocess serving Prefect's API on a local port, with
the database under PREFECT_HOME, stopped when the command exits. Prefect starts it when the flow
first needs a client, and to do so imports its whole server API into the calling process (3.4 s
of CPU on this project's 2-core machine, holding the GIL while preflight imports torch). The
command starts the same subprocess itself, before preflight, without importing the server's
modules, and once it answers points Prefect in this process at it (the API URL of Prefect's
process-wide settings, the way Prefect's own test harness points a process at the server it
started). Prefect's own start then never runs. Flow-run heartbeats are off for it: they let a
lasting server notice a run whose process died, and this one dies with the process. So is the
UI URL: the server serves no UI, and Prefect then prints no "View at" link to it.

If the server does not come up, the command stops it and leaves the start to Prefect, which
tries again and reports why. The server is stopped at exit (SIGTERM, then SIGKILL after 5 s),
after Prefect's log and event workers, registered later, have sent what they hold; a command
stopped by a signal stops it with the rest of its child processes (pipelines/stop.py), and on
Linux a command killed outright (kill -9) takes it along too: the server gets SIGTERM when its
parent dies (PR_SET_PDEATHSIG), where Prefect's own would be left running.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

# What Prefect's own temporary server runs with: no UI, the ephemeral mode's reduced services.
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
_PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind its port
# On Linux the server runs uvicorn after asking for SIGTERM when its parent dies, even by
# SIGKILL (prctl PR_SET_PDEATHSIG = 1), and exits if the parent died before that.
_STOPPED_WITH_PARENT = (
    "import ctypes, os, runpy, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(1)\n"
    "sys.argv = ['uvicorn', *sys.argv[2:]]\n"
    "runpy.run_module('uvicorn', run_name='__main__', alter_sys=True)\n")


class TemporaryServer:
    """One uvicorn process serving Prefect's API on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._prior_settings = None
        self._launch()
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> None:
        import prefect
        from prefect.settings import get_current_settings

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = {**os.environ, **_SERVER_ENV,
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        uvicorn = ["--app-dir", str(prefect.__module_path__.parent), "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                   str(self.port), "--log-level", "error", "--lifespan", "on"]
        start = (["-c", _STOPPED_WITH_PARENT, str(os.getpid())] if sys.platform == "linux"
                 else ["-m", "uvicorn"])
        self.process = subprocess.Popen([sys.executable, *start, *uvicorn], env=env)

    def wait(self, timeout: float) -> bool:
        """True once the server answers its health check; False if it exits or `timeout`
        seconds pass first (a port taken meanwhile is replaced by another, twice at most)."""
        deadline = time.monotonic() + timeout
        relaunches = 2
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status == _PORT_IN_USE and relaunches:
                relaunches -= 1
                self._launch()
            elif status is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def use(self) -> bool:
        """Wait for the server and point Prefect in this process at it; True when it does.
        False (the server stopped) when it did not come up in Prefect's start-up timeout."""
        import prefect.context
        from prefect.logging import get_logger
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            PREFECT_UI_URL,
        )

        if not self.wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()):
            self.stop()
            return False
        get_logger().info(f"Started a temporary Prefect server on {self.api_url} (no UI, "
                          "stopped at exit); for a lasting one with the UI: make ui, then set "
                          "PREFECT_API_URL")
        # Flow-run heartbeats let a lasting server notice a run whose process died; this one
        # dies with the process, and the heartbeat thread held every flow's end for up to 1 s.
        # No UI URL: this server serves no UI, so Prefect prints no "View at" link to it.
        updates = {PREFECT_API_URL: self.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                   PREFECT_UI_URL: ""}
        current = prefect.context.get_settings_context()
        self._prior_settings = prefect.context.GLOBAL_SETTINGS_CONTEXT
        prefect.context.GLOBAL_SETTINGS_CONTEXT = prefect.context.SettingsContext(
            profile=current.profile, settings=current.settings.copy_with_update(updates=updates))
        return True

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 5 s) and give Prefect its settings back."""
        global _current
        if self._prior_settings is not None:
            import prefect.context

            prefect.context.GLOBAL_SETTINGS_CONTEXT = self._prior_settings
            self._prior_settings = None
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if _current is self:
            _current = None


_current: TemporaryServer | None = None


def start() -> TemporaryServer | None:
    """Start the temporary server when this process would need one (no Prefect server
    configured, Prefect's temporary servers allowed); None otherwise."""
    global _current
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    _current = TemporaryServer()
    return _current


def current_url() -> str | None:
    """The API URL of the temporary server this process uses, if any."""
    return _current.api_url if _current is not None and _current.process is not None else None
