"""Shared fixtures: one MLflow store and (for flow tests) one Prefect server per test session."""

from __future__ import annotations

import os

import pytest

from posttrain.gc_tuning import tune_for_a_command

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread in every process the tests start too (`posttrain` commands, launched stages,
# benchmark workers): beside make test's workers on a 2-core machine, a second spinning OpenMP
# thread per process made each command several times slower (the one_thread fixture below does
# the same for this process).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never reach a hub: an id that is not cached fails at once instead of after timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test processes import the whole ML stack as a command does: the same collector tuning.
tune_for_a_command()


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Every test logs into one throw-away SQLite store (a new store migrates for seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path}"
    yield os.environ["MLFLOW_TRACKING_URI"]
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread, above all on a shared 2-core machine
    where two spinning threads can be 30x slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in character-level tokenizer (read-only in tests)."""
    from posttrain.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server and database shared by all flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# Small settings for a test stage: a few steps of a tiny model on few rows.
SMALL = {"max_steps": 3, "per_device_batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 1,
         "max_length": 48, "eval_every": 100, "log_every": 1}
SFT_STAGE = {"name": "sft", "method": "sft", "data": "sft", **SMALL, "max_steps": 6,
             "learning_rate": 3e-3, "eval_every": 3}
# The data source each method reads in tests, by default.
TEST_DATA = {"sft": "sft", "reward": "preference", "dpo": "preference", "orpo": "preference",
             "simpo": "preference", "cpo": "preference", "kto": "preference",
             "grpo": "prompts", "rloo": "prompts", "ppo": "prompts", "online_dpo": "prompts",
             "gkd": "sft"}
ONLINE_SMALL = {"max_steps": 2, "max_completion_length": 4}


def stage(method: str, name: str | None = None, *, start: str = "sft", **settings) -> dict:
    """A test stage of `method` (named after it), from the SFT stage, on its usual source."""
    values = {"name": name or method, "method": method, "start": start,
              "data": TEST_DATA[method], **SMALL}
    if method in ("grpo", "rloo"):
        values.update(ONLINE_SMALL, per_device_batch_size=8, num_generations=4,
                      reward_functions={"posttrain.reward_functions:demo_checker": 1.0})
    if method == "ppo":
        values.update(ONLINE_SMALL, reward="reward")
    if method == "gkd":  # distils the SFT stage
        values.update(teacher="sft", max_new_tokens=4, max_steps=2)
    if method == "online_dpo":
        values.update(ONLINE_SMALL, reward_functions={"reward_model": 1.0}, reward="reward")
    return {**values, **settings}


def tiny_pipeline_values(tmp_path, stages: list[dict] | None = None, **sections) -> dict:
    """A pipeline config small enough for a test: tiny model, few steps, few prompts. `stages`
    defaults to one SFT stage; data sources 'sft', 'preference' and 'prompts' read the demo."""
    values = {
        "name": "test",
        "artifacts_root": str(tmp_path / "artifacts"),
        "data": {"sft": {"path": "demo:sft"}, "preference": {"path": "demo:preference"},
                 "prompts": {"path": "demo:prompts"}},
        "demo": {"num_train": 300, "num_eval": 24},
        "model": {"tiny": {"hidden_size": 32, "intermediate_size": 64}},
        "stages": [SFT_STAGE] if stages is None else stages,
        "evaluate": {"max_new_tokens": 6, "batch_size": 24, "num_samples": 4, "max_length": 48,
                     "data": "sft"},
        "tracking": {"experiment": f"test-{tmp_path.name}"},
    }
    for name, update in sections.items():
        if isinstance(update, dict):
            values[name] = {**values.get(name, {}), **update}
        else:
            values[name] = update
    return values


def stage_runs(parent_run_id: str) -> dict:
    """The MLflow child runs of a pipeline's parent run, by stage name."""
    from posttrain import tracking

    c = tracking.client()
    parent = c.get_run(parent_run_id)
    runs = c.search_runs([parent.info.experiment_id],
                         f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags[tracking.STAGE_TAG]: r for r in runs}


def statuses(result: dict) -> dict[str, str]:
    """{stage: 'ran' | 'cached'} from a flow's result."""
    return {r["stage"]: r["status"] for r in result["stages"]}


# The longest test files (minutes each: whole pipelines, killed commands, servers) start first, so
# that the workers of `make test` (one file per worker at a time) do not end on one of them alone.
# (xdist's loadfile would otherwise put the files with the most tests first:
# --no-loadscope-reorder in the Makefile keeps this order.) Each worker starts with two files
# (items 1-3, then 4-6 in turn), so the demo is paired with a shorter one.
LONGEST_FIRST = ("test_demo_quality.py", "test_server_outages.py", "test_crash.py", "test_flows.py",
                 "test_multiturn_demo.py", "test_distributed.py", "test_crash_launched.py",
                 "test_servers.py", "test_infra.py", "test_harness.py", "test_examples.py",
                 "test_vision_pipeline.py",
                 "test_ecosystem.py", "test_concurrency.py", "test_harness_eval.py",
                 "test_prefect_ui.py", "test_trl_parity.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as before
