"""Prefect flows. Each reads like a table of contents: one line per stage."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from prefect import flow
from prefect.context import get_run_context

from pipelines import errors, stop
from posttrain import artifacts, interrupt, stages, tracking
from posttrain.config import DEMO_CONFIG, PipelineConfig, load_pipeline_config
from tasks import events
from tasks.data import prepare_data_task
from tasks.evaluate import evaluate_task
from tasks.promote import promote_task
from tasks.train import train_task

# The parameter form's default: the demo, what `posttrain run` runs without a config (an
# installation without conf/ shows an empty pipeline instead).
DEFAULT_CONFIG = load_pipeline_config() if DEMO_CONFIG.is_file() else PipelineConfig()


@dataclass
class PipelineRun:
    """The MLflow parent run of one flow run, and the per-stage rows of its summary."""

    cfg: PipelineConfig
    run_id: str
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def start(cls, cfg: PipelineConfig, flow_name: str) -> PipelineRun:
        ctx = get_run_context()
        flow_run_id = str(ctx.flow_run.id) if getattr(ctx, "flow_run", None) else ""
        interrupt.rearm()  # the flow run swapped in Prefect's SIGTERM handler: ours again
        stop.note_flow_run(flow_run_id)
        config = cfg.model_dump(mode="json")
        try:  # parent runs of this pipeline (and their children) a kill -9 left RUNNING
            closed = tracking.close_orphaned_runs(
                cfg.tracking.experiment, {"posttrain.pipeline": cfg.name},
                closer=f"the next run of pipeline {cfg.name!r}")
            if closed:
                print(f"marked {len(closed)} MLflow run(s) left RUNNING by a killed run of "
                      f"{cfg.name} as KILLED: {', '.join(closed)}")
        except Exception as e:  # noqa: BLE001 - a cleanup must never stop the pipeline
            print(f"could not check for runs left RUNNING: {type(e).__name__}: {e}")
        run_id = tracking.start_run(
            cfg.tracking.experiment,
            f"{cfg.name}:{flow_name}",
            params=config,
            tags={
                "posttrain.pipeline": cfg.name,
                "posttrain.config_hash": artifacts.hash_json(config)[:16],
                "prefect.flow_run_id": flow_run_id,
                "prefect.flow_name": flow_name,
            },
        )
        return cls(cfg, run_id)

    def stage(self, name: str, task, *args, **kwargs) -> dict:
        """Run one stage task; record whether it ran or came from the cache, and how long."""
        started = time.time()
        state = task(self.cfg, *args, parent_run_id=self.run_id, return_state=True, **kwargs)
        try:
            manifest = state.result()  # raises the stage's own error if it failed
        except Exception as error:
            errors.note_stage(error, name)
            raise
        prefect_cached = state.name == "Cached"
        if prefect_cached:
            # The task body did not run, so nothing logged a child run: do it here.
            tracking.record_cache_hit(self.cfg.tracking.experiment, self.run_id, name, manifest)
        cached = prefect_cached or manifest.get("cached", False)
        self.rows.append(
            {
                "stage": name,
                "status": "cached" if cached else "ran",
                "seconds": round(time.time() - started, 2),
                "metrics": manifest.get("metrics", {}),
                "path": manifest.get("path"),
                "source_run_id": manifest.get("mlflow_run_id"),
            }
        )
        return manifest

    def finish(self, evaluation: dict | None = None, promotion: dict | None = None) -> dict:
        comparison = (evaluation or {}).get("comparison", {})
        if comparison:
            tracking.log_comparison(self.run_id, comparison, "comparison.json", "comparison.png")
            tracking.log_metrics(
                self.run_id,
                {f"{s}/{k}": v for s, m in comparison.items() for k, v in m.items()},
            )
        tracking.log_table(
            self.run_id,
            [{k: r[k] for k in ("stage", "status", "seconds")} for r in self.rows],
            "stages.json",
        )
        tracking.end_run(self.run_id)
        return {
            "mlflow_run_id": self.run_id,
            "stages": self.rows,
            "comparison": comparison,
            "promotion": promotion,
        }

    def fail(self, error: BaseException) -> None:
        tracking.end_run(self.run_id, "FAILED", reason=f"{type(error).__name__}: {error}")


@flow(name="posttrain-pipeline", log_prints=True)
def pipeline(cfg: PipelineConfig = DEFAULT_CONFIG) -> dict:
    """Prepare the data, run the stages in their declared order (each from the model its `start`
    names), evaluate the base model and every trained stage side by side, promote the winner if
    the gate passes; every stage cached and tracked."""
    cfg = served_config(cfg)
    run = PipelineRun.start(cfg, "pipeline")
    return _train_evaluate_promote(run, emit_events=cfg.retrain.emit_events)


@flow(name="posttrain-retrain", log_prints=True)
def retrain(cfg: PipelineConfig = DEFAULT_CONFIG) -> dict:
    """Retraining (scheduled, or triggered by a 'posttrain.dataset.updated' event): re-fingerprint
    the data sources, then the whole pipeline. Unchanged data finds every stage cached; changed
    data re-runs what depends on it, evaluates, and promotes only if the gate passes."""
    cfg = served_config(cfg)
    run = PipelineRun.start(cfg, "retrain")
    fingerprints = events.current_fingerprints(cfg)
    tracking.client().set_tag(run.run_id, "posttrain.data_fingerprints",
                              json.dumps(fingerprints, sort_keys=True)[:5000])
    # No event from here: this run already is the retraining an event would trigger.
    return _train_evaluate_promote(run, emit_events=False)


def served_config(cfg: PipelineConfig) -> PipelineConfig:
    """In a deployment's run, the fields the run was given merged onto the config the deployment
    was served with. Prefect replaces a whole parameter (`cfg`) with the run's value and fills
    what it lacks from the function's default, so a run given {"stages": [...]} alone would
    otherwise silently train on the code's defaults. Outside a deployment: `cfg` as it is."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    from posttrain.config import merge, validate

    served = None
    if deployment.id:  # the deployment's own parameters (runtime's are the run's, merged)
        with get_client(sync_client=True) as client:
            served = (client.read_deployment(deployment.id).parameters or {}).get("cfg")
    if not served:
        return cfg.check("flow parameters")
    given = cfg.model_dump(mode="json", exclude_unset=True)
    return validate(PipelineConfig, merge(served, given), "deployment parameters + run")


def _train_evaluate_promote(run: PipelineRun, *, emit_events: bool) -> dict:
    cfg = run.cfg
    try:
        manifests = _train(run, None, emit_events=emit_events)
        evaluation, decision = None, None
        if cfg.evaluate.enabled:
            reward = cfg.eval_reward
            evaluation = run.stage("evaluate", evaluate_task(cfg), manifests["data"],
                                   stages.candidates(cfg, manifests),
                                   manifests[reward] if reward else None)
            if cfg.promotion.enabled:
                decision = promote_task(cfg, evaluation, stages.candidates(cfg, manifests),
                                        manifests["data"], parent_run_id=run.run_id)
    except BaseException as e:
        run.fail(e)
        raise
    return run.finish(evaluation, decision)


def _train(run: PipelineRun, targets: list[str] | None, *, emit_events: bool) -> dict:
    """Data, then every stage `targets` needs (all: None) in the declared order."""
    cfg = run.cfg
    manifests = {"data": run.stage("data", prepare_data_task(cfg))}
    changed = events.note_fingerprints(cfg, emit=emit_events)
    if changed:
        print(f"data sources changed since the last run: {', '.join(changed)}")
    for stage in stages.needed(cfg, targets):
        inputs = stages.inputs_for(stage, manifests["data"], manifests)
        teacher = {"teacher": inputs["teacher"]} if "teacher" in inputs else {}
        manifests[stage.name] = run.stage(stage.name, train_task(cfg, stage.name), stage.name,
                                          inputs["data"], inputs["start"], inputs["reward"],
                                          **teacher)
    return manifests


@flow(name="posttrain-stage", log_prints=True)
def stage_flow(cfg: PipelineConfig = DEFAULT_CONFIG, targets: list[str] | None = None) -> dict:
    """The stages named in `targets` and every stage they start from or use (usually cached),
    tracked like the pipeline; no evaluation."""
    cfg = cfg.check("flow parameters")
    unknown = [t for t in targets or () if t not in {s.name for s in cfg.stages}]
    if unknown:
        raise ValueError(f"no stage named {unknown}; stages: {[s.name for s in cfg.stages]}")
    run = PipelineRun.start(cfg, ",".join(targets or ["all"]))
    try:
        _train(run, targets, emit_events=False)
    except BaseException as e:
        run.fail(e)
        raise
    return run.finish()


# -------------------------------------------------------------------------------- deployments


def deployments(cfg: PipelineConfig) -> list:
    """The deployments `posttrain serve` registers (and prefect.yaml declares for work pools):

    - `posttrain-pipeline/<name>`: the full pipeline, run by hand from the UI; its parameter form
      is generated from PipelineConfig and the server validates values before a run starts;
    - `posttrain-retrain/<name>`: the retraining flow on `cfg.retrain.cron`, and on every
      `posttrain.dataset.updated` event for this pipeline.

    Both default to `cfg` and run one at a time (concurrency limit 1; further runs wait in
    line); under that, the stages' serializable locks keep concurrent runs from training the
    same stage twice.
    """
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    params = {"cfg": cfg.model_dump(mode="json")}
    r = cfg.retrain
    triggers = []
    if r.on_dataset_updated:
        triggers.append(DeploymentEventTrigger(
            name=f"{cfg.name}: dataset updated",
            expect={events.EVENT},
            match={"prefect.resource.id": events.resource(cfg.name)["prefect.resource.id"]},
        ))
    common = {"name": cfg.name, "parameters": params, "concurrency_limit": 1,
              "enforce_parameter_schema": True, "tags": ["posttrain", cfg.name]}
    return [
        pipeline.to_deployment(description="The full pipeline, run by hand.", **common),
        retrain.to_deployment(
            description="Scheduled and event-triggered retraining; promotes only through the "
            "gate.",
            schedules=[Cron(r.cron, timezone=r.timezone)] if r.cron else None,
            triggers=triggers,
            **common,
        ),
    ]
