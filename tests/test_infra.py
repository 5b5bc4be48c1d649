"""infra/: accelerate configs accelerate accepts, a compose file that validates and has no default
secrets, work-pool templates that render, a training image that installs the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SECRETS = ("POSTGRES_PASSWORD", "PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_AUTH_ADMIN_PASSWORD",
           "MLFLOW_FLASK_SERVER_SECRET_KEY")

# ------------------------------------------------------------------------ accelerate configs

EXPECTED = {  # file: (distributed type, launcher flag set by the file)
    "single_gpu.yaml": ("NO", None),
    "multi_gpu_ddp.yaml": ("MULTI_GPU", "multi_gpu"),
    "fsdp.yaml": ("FSDP", "use_fsdp"),
    "deepspeed_zero2.yaml": ("DEEPSPEED", "use_deepspeed"),
    "deepspeed_zero3.yaml": ("DEEPSPEED", "use_deepspeed"),
}


def test_there_is_one_config_per_engine():
    assert sorted(p.name for p in (INFRA / "accelerate").glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_launch_accepts_the_config(name):
    """accelerate's own loader and launch-argument validation (what `accelerate launch
    --config_file` runs before starting anything) take the file and pick the right engine."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = str(INFRA / "accelerate" / name)
    kind, flag = EXPECTED[name]
    config = load_config_from_file(path)
    assert config.distributed_type.name == kind
    assert config.mixed_precision == "bf16" and config.use_cpu is False
    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", path, "train.py"]))
    for launcher_flag in ("multi_gpu", "use_fsdp", "use_deepspeed"):
        assert bool(getattr(args, launcher_flag)) == (launcher_flag == flag), launcher_flag
    assert args.num_processes == config.num_processes


def test_sharding_configs_gather_weights_for_saving_and_never_accumulate():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(INFRA / "accelerate" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"]
    for stage in (2, 3):
        ds = load_config_from_file(
            str(INFRA / "accelerate" / f"deepspeed_zero{stage}.yaml")).deepspeed_config
        assert ds["zero_stage"] == stage
        assert ds["gradient_accumulation_steps"] == 1  # posttrain.training.prepare insists
        assert ds["zero3_init_flag"] is False
    zero3 = load_config_from_file(str(INFRA / "accelerate" / "deepspeed_zero3.yaml"))
    assert zero3.deepspeed_config["zero3_save_16bit_model"] is True


# ---------------------------------------------------------------------------- docker compose


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


COMPOSE = _compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="neither `docker compose` nor `docker-compose` is installed (.ci/run installs "
    "Debian's docker-compose when it runs as root)",
)


def _compose_config(env: dict[str, str], *files: str, tmp_path: Path):
    empty = tmp_path / "empty.env"  # keep a developer's infra/.env out of the test
    empty.write_text("")
    args = [*COMPOSE, "--env-file", str(empty), "-p", "posttrain"]
    for f in files or ("docker-compose.yml",):
        args += ["-f", str(INFRA / f)]
    return subprocess.run([*args, "config"], capture_output=True, text=True, cwd=INFRA,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env},
                          timeout=120, check=False)


def _secrets() -> dict[str, str]:
    return {
        "POSTGRES_PASSWORD": "pg-0123456789abcdef",
        "PREFECT_SERVER_API_AUTH_STRING": "admin:prefect-0123456789",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "mlflow-0123456789abcdef",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-0123456789abcdef",
    }


@needs_compose
def test_compose_file_validates_with_its_secrets_set(tmp_path):
    done = _compose_config(_secrets(), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    for service in ("postgres", "prefect-server", "prefect-worker", "mlflow"):
        assert f"{service}:" in done.stdout
    entry = (INFRA / "docker" / "mlflow-entrypoint.sh").read_text()  # the MLflow command
    assert "--app-name basic-auth" in entry and "--serve-artifacts" in entry
    assert "postgresql://posttrain:pg-0123456789abcdef@postgres:5432/mlflow" in done.stdout
    assert "PREFECT_SERVER_API_AUTH_STRING: admin:prefect-0123456789" in done.stdout
    gpu = _compose_config(_secrets(), "docker-compose.yml", "docker-compose.gpu.yml",
                          tmp_path=tmp_path)
    assert gpu.returncode == 0, gpu.stderr
    assert "nvidia" in gpu.stdout


@needs_compose
@pytest.mark.parametrize("missing", SECRETS)
def test_compose_refuses_to_run_without_each_secret(tmp_path, missing):
    """No secret has a default: unset (or empty), `config` fails and names the variable."""
    for value in (None, ""):
        env = _secrets()
        if value is None:
            del env[missing]
        else:
            env[missing] = value
        done = _compose_config(env, tmp_path=tmp_path)
        assert done.returncode != 0
        assert missing in done.stderr + done.stdout


def test_every_use_of_a_secret_in_the_compose_file_is_required():
    text = (INFRA / "docker-compose.yml").read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, name
        assert all(u.startswith(":?") for u in uses), (name, uses)


def test_mlflow_entrypoint_refuses_to_start_without_an_admin_password(tmp_path):
    env = {"PATH": os.environ["PATH"], "MLFLOW_BACKEND_STORE_URI": "postgresql://x",
           "MLFLOW_AUTH_DATABASE_URI": "postgresql://y", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
           "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini")}
    done = subprocess.run(["sh", str(INFRA / "docker" / "mlflow-entrypoint.sh")], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in done.stderr
    assert not (tmp_path / "auth.ini").exists()


# ---------------------------------------------------------------------------- training image


def test_dockerfile_builds_on_cuda_and_installs_the_project():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+", text, re.MULTILINE)
    assert "download.pytorch.org/whl/cu" in text
    assert re.search(r"pip install -e \.", text)
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    for line in text.splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert f"!{src.rstrip('/')}" in [i.rstrip("/") for i in ignore], src


# ------------------------------------------------------------------------------- work pools


def _placeholders(node) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_placeholders(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_placeholders(v) for v in node)) if node else set()
    if isinstance(node, str):
        return set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", node))
    return set()


@pytest.mark.parametrize("name", ["docker-gpu-job-template.json",
                                  "kubernetes-gpu-job-template.json"])
def test_job_templates_render_with_their_defaults(name):
    from prefect.utilities.templating import apply_values

    template = json.loads((INFRA / "workpools" / name).read_text())
    variables = template["variables"]["properties"]
    assert _placeholders(template["job_configuration"]) <= set(variables)
    defaults = {k: v["default"] for k, v in variables.items() if "default" in v}
    rendered = apply_values(template["job_configuration"], defaults)
    assert rendered is not None
    if name.startswith("kubernetes"):
        pod = rendered["job_manifest"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "artifacts", "mountPath": "/opt/posttrain/artifacts"} in \
            container["volumeMounts"]
        assert container["image"] == "posttrain:cuda"
    else:
        create = rendered["container_create_kwargs"]
        assert create["device_requests"][0]["capabilities"] == [["gpu"]]
        assert "posttrain_artifacts:/opt/posttrain/artifacts" in rendered["volumes"]


@pytest.mark.parametrize("kind,template", [("process", None),
                                           ("docker", "docker-gpu-job-template.json"),
                                           ("kubernetes", "kubernetes-gpu-job-template.json")])
def test_workpool_script_creates_each_kind(tmp_path, kind, template):
    fake = tmp_path / "prefect"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n')
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(INFRA / "workpools" / "create.sh"), kind],
                          env={**os.environ, "PREFECT": str(fake)}, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["work-pool", "create", "posttrain"]
    assert args[args.index("--type") + 1] == kind
    if template:
        assert Path(args[args.index("--base-job-template") + 1]).name == template
    bad = subprocess.run(["bash", str(INFRA / "workpools" / "create.sh"), "slurm"],
                         env={**os.environ, "PREFECT": str(fake)}, capture_output=True,
                         text=True, timeout=30, check=False)
    assert bad.returncode != 0 and "process, docker or kubernetes" in bad.stderr


# ------------------------------------------------------------------------------ make ui

# A stand-in for `prefect server start` / `mlflow ui`: answers every GET with 200 on --port after
# FAKE_DELAY seconds, having written the PREFECT_UI_API_URL it was given; FAKE_FAIL: exits 1.
FAKE_SERVER = """#!/usr/bin/env bash
exec "{python}" - "$@" <<'PY'
import http.server, os, sys, time
args = sys.argv[1:]
if os.environ.get("FAKE_FAIL") == os.path.basename(os.environ["FAKE_NAME"]):
    print("[Errno 98] address already in use"); sys.exit(1)
with open(os.environ["FAKE_NAME"] + ".env", "w") as f:
    f.write(os.environ.get("PREFECT_UI_API_URL", ""))
time.sleep(float(os.environ.get("FAKE_DELAY", "0")))
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"OK")
http.server.HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), Ok).serve_forever()
PY
"""


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ui_env(tmp_path: Path, venv: Path, prefect_port: int, mlflow_port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return env | {"VENV": str(venv), "POSTTRAIN_UI_STATE": str(tmp_path / "state"),
                  "PREFECT_UI_PORT": str(prefect_port), "MLFLOW_UI_PORT": str(mlflow_port),
                  "PREFECT_HOME": str(tmp_path / "prefect"),
                  "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def _ui(command: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INFRA / "ui.sh"), command], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _fake_venv(tmp_path: Path) -> Path:
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("prefect", "mlflow"):
        script = venv / "bin" / name
        script.write_text(FAKE_SERVER.replace("{python}", sys.executable).replace(
            'os.environ["FAKE_NAME"]', repr(str(tmp_path / name))))
        script.chmod(0o755)
    return venv


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_make_ui_reports_ready_only_once_both_servers_answer_on_its_ports(tmp_path):
    """Non-default ports; the servers take 2 s to answer. The script returns (and says ready,
    with the URLs) only when both health endpoints answer, and the Prefect server was given
    PREFECT_UI_API_URL for its own port (unset, its UI calls :4200)."""
    prefect_port, mlflow_port = _free_ports(2)
    env = _ui_env(tmp_path, _fake_venv(tmp_path), prefect_port, mlflow_port)
    env["FAKE_DELAY"] = "2"
    try:
        started = _ui("start", env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert _answers(f"http://127.0.0.1:{prefect_port}/api/health")
        assert _answers(f"http://127.0.0.1:{mlflow_port}/health")
        assert started.stdout.startswith("ready")
        assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in started.stdout
        assert f"MLflow UI:  http://127.0.0.1:{mlflow_port}" in started.stdout
        assert (tmp_path / "prefect.env").read_text() == f"http://127.0.0.1:{prefect_port}/api"
    finally:
        stopped = _ui("stop", env)
    assert "stopped prefect" in stopped.stdout and "stopped mlflow" in stopped.stdout


def test_make_ui_fails_with_the_log_when_a_server_does_not_start(tmp_path):
    """MLflow exits at once (its port taken): no 'ready', exit 1, the reason from its log."""
    prefect_port, mlflow_port = _free_ports(2)
    env = _ui_env(tmp_path, _fake_venv(tmp_path), prefect_port, mlflow_port)
    env["FAKE_FAIL"] = "mlflow"
    try:
        started = _ui("start", env)
    finally:
        _ui("stop", env)
    assert started.returncode == 1 and "ready" not in started.stdout
    assert "mlflow did not start" in started.stderr
    assert "address already in use" in started.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_make_ui_starts_the_real_servers_on_free_ports(tmp_path):
    """`prefect server start` and `mlflow ui` on free ports: ready means both health endpoints
    answer, and the Prefect UI's settings point it at this server's API."""
    import sys
    import urllib.request

    prefect_port, mlflow_port = _free_ports(2)
    env = _ui_env(tmp_path, Path(sys.executable).parent.parent, prefect_port, mlflow_port)
    env["UI_TIMEOUT"] = "240"
    try:
        started = _ui("start", env, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        assert _answers(f"http://127.0.0.1:{prefect_port}/api/health")
        assert _answers(f"http://127.0.0.1:{mlflow_port}/health")
        with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/ui-settings") as r:
            assert json.load(r)["api_url"] == f"http://127.0.0.1:{prefect_port}/api"
    finally:
        _ui("stop", env)
