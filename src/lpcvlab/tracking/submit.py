"""The competition's last step: ``lpcvlab submit RUN_ID [--dry-run]``.

A run is submitted only when every check passes; each check that fails is one line:

- the run FINISHED and was measured on the device (``hub=aihub``), with an AI Hub compile job
  for each component (the organisers evaluate that job's compiled model);
- its total latency (``latency_ms/total``, the sum of the components') is within the track's
  ``track.budget_ms`` (``conf/track/``; ``--budget-ms`` overrides);
- the fidelity gate passed (``fidelity_gate``; a run with every component in fp32 has none);
- the device hazard check passed for every component (``lint/<component>`` = ``ok``; a run
  without it was not checked and is refused);
- each compiled model's I/O (``compiled_io/<component>``, as AI Hub reported it after the
  compile job) is what the organisers' harness feeds and reads (``track.contract``, from the
  run's params): names, shapes, dtypes; quantized (integer) I/O only where the contract allows
  it -- a run compiled with ``hub.quantize_io=true`` is refused with an ``io_contract`` line.
  Before anything is shared, the same check runs again on the compiled models as AI Hub
  describes them now.

Then each compile job is shared with ``submission.share_with`` (default: the organisers'
``lowpowervision@gmail.com``, as their instructions do it: ``compile_job.modify_sharing(
add_emails=[...])`` of the ``qai-hub`` client; a job already shared with an address is not
shared again), the run is registered (``lpcvlab register``) and the submission record is
written: job IDs, target model IDs, device, runtime, each compiled model's input names, shapes,
dtypes and layout (as AI Hub reports them), ONNX sha256, the compiled file's sha256 and QAIRT
version, score, latency and where it was measured (device and profile jobs), the weights and
the commit, as the run's
``submission/submission.json`` and as ``submission.*`` tags on each registered version, which
the alias ``submitted`` then points at. ``--dry-run`` checks and says what it would share,
without contacting AI Hub.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lpcvlab.config.schema import (
    ComponentContract,
    RetrievalTrackConfig,
    SubmissionConfig,
    TensorContract,
    TrackConfig,
    VideoTrackConfig,
)
from lpcvlab.errors import LpcvlabError
from lpcvlab.tracking.models import ONNX_SHA_TAG
from lpcvlab.tracking.registry import components, latency_measured_on, register_run
from lpcvlab.tracking.runstore import RunInfo, get_run
from lpcvlab.types import CompiledIO, io_mismatches

LINT_PREFIX = "lint/"  # lint/<component>: "ok" or the hazard rules found
GATE_TAG = "fidelity_gate"
TOTAL = "latency_ms/total"
RECORD = "submission/submission.json"
ALIAS = "submitted"
TRACK_CONFIGS: dict[str, type[TrackConfig]] = {
    "retrieval": RetrievalTrackConfig,
    "video": VideoTrackConfig,
}


class SubmitError(LpcvlabError):
    """A run that cannot be submitted as it is: one line per failed check."""

    def __init__(self, run_id: str, failures: Sequence[str]) -> None:
        self.failures = list(failures)
        lines = "\n".join(f"  {f}" for f in self.failures)
        super().__init__(f"run {run_id} cannot be submitted:\n{lines}")


@dataclass
class Verdict:
    """What the checks found: a line per check that passed, and per check that failed."""

    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def check(self, ok: bool, line: str) -> None:
        (self.passed if ok else self.failed).append(line)


def _none(value: str | None) -> bool:
    return value in (None, "", "None", "null")


def budget_of(run: RunInfo, override: float | None = None) -> float | None:
    """``override``, else the run's ``track.budget_ms``."""
    if override is not None:
        return float(override)
    value = run.params.get("track.budget_ms")
    return None if _none(value) else float(str(value))


def share_with_of(run: RunInfo, override: Sequence[str] | None = None) -> list[str]:
    """``override``, else the run's ``submission.share_with``, else the default address."""
    if override:
        return list(override)
    value = run.params.get("submission.share_with")
    if _none(value):
        return list(SubmissionConfig().share_with)
    return [str(v) for v in json.loads(str(value))]


def total_latency(run: RunInfo, comps: Sequence[str]) -> float:
    """``latency_ms/total``, else the sum of the components' (NaN when one is missing)."""
    if TOTAL in run.metrics:
        return float(run.metrics[TOTAL])
    parts = [run.metrics.get(f"latency_ms/{c}", math.nan) for c in comps]
    return float(sum(parts)) if parts else math.nan


def precision_of(run: RunInfo, component: str) -> str:
    return run.tags.get(f"precision/{component}") or run.params.get("precision.name") or "fp32"


def check_run(run: RunInfo, budget_ms: float | None) -> Verdict:
    """Every check of the module docstring, each a line."""
    v = Verdict()
    comps = list(components(run))
    if run.status == "FINISHED":
        v.passed.append("status: FINISHED")
    else:
        why = f" ({run.tags['error'].splitlines()[0][:160]})" if run.tags.get("error") else ""
        v.failed.append(
            f"status: the run is {run.status}{why}; only a FINISHED run can be submitted"
        )
    hub = run.tags.get("hub", "?")
    device = run.params.get("device.aihub_name") or run.tags.get("device", "?")
    runtime = run.params.get("runtime.target_runtime") or run.tags.get("runtime", "?")
    v.check(
        hub == "aihub",
        f"device: {device} ({runtime}, hub=aihub)"
        if hub == "aihub"
        else f"device: measured with hub={hub} (on {run.tags.get('measured_on', 'this machine')},"
        " not the device); submit a run made with hub=aihub: the organisers evaluate its AI Hub "
        "compile jobs",
    )
    if not comps:
        v.failed.append("components: the run exported none (no onnx_sha256/<component> tags)")
    missing = [c for c in comps if not run.tags.get(f"aihub/{c}/compile_job")]
    if hub == "aihub" and comps:
        v.check(
            not missing,
            f"compile jobs: {', '.join(run.tags[f'aihub/{c}/compile_job'] for c in comps)}"
            if not missing
            else f"compile jobs: none recorded for {', '.join(missing)} "
            "(aihub/<component>/compile_job); run it again with hub=aihub",
        )
    _check_latency(v, run, comps, budget_ms)
    _check_gate(v, run, comps)
    _check_hazards(v, run, comps)
    if hub == "aihub":
        _check_io(v, run, comps)
    return v


def contract_of(run: RunInfo, component: str) -> tuple[ComponentContract, bool] | None:
    """The run's ``track.contract.<component>`` (from its params; the track's default contract
    for a run logged before the contract existed) and whether it accepts quantized I/O."""
    p = run.params
    prefix = f"track.contract.{component}"
    if f"{prefix}.input.name" not in p:
        default = TRACK_CONFIGS.get(run.tags.get("track", ""))
        if default is None:
            return None
        rule = default().contract_of(component)
        return (rule, default().quantized_io()) if rule is not None else None

    def tensor(kind: str) -> TensorContract:
        shape = p.get(f"{prefix}.{kind}.shape")
        return TensorContract(
            name=str(p[f"{prefix}.{kind}.name"]),
            dtype=str(p[f"{prefix}.{kind}.dtype"]),
            shape=None if _none(shape) else [int(d) for d in json.loads(str(shape))],
        )

    quantized = str(p.get("track.contract.quantized_io", "False")).lower() == "true"
    return ComponentContract(tensor("input"), tensor("output")), quantized


def io_lines(component: str, rule: ComponentContract, io: CompiledIO, quantized: bool) -> list[str]:
    """One ``io_contract`` line per way ``io`` breaks the contract (none when it keeps it)."""
    lines = []
    for m in io_mismatches(rule, io, quantized):
        hint = ""
        if any(t.quantized or t.dtype == "float16" for t in (*io.inputs, *io.outputs)):
            hint = "; compile with float I/O (hub.quantize_io=false)"
        lines.append(f"io_contract: {component} {m.line()} (track.contract){hint}")
    return lines


def _check_io(v: Verdict, run: RunInfo, comps: list[str]) -> None:
    seen = []
    for c in comps:
        contract = contract_of(run, c)
        raw = run.tags.get(f"compiled_io/{c}")
        if contract is None:
            continue
        if raw is None:
            v.failed.append(
                f"io_contract: {c}: the compiled model's I/O was not recorded (no compiled_io/{c} "
                "tag: a run from before the check); run it again with hub=aihub"
            )
            continue
        io = CompiledIO.from_record(json.loads(raw))
        lines = io_lines(c, contract[0], io, contract[1])
        v.failed += lines
        if not lines:
            ins = ", ".join(t.describe() for t in io.inputs)
            outs = ", ".join(t.describe() for t in io.outputs)
            seen.append(f"{c} {ins} -> {outs}")
    if seen:
        v.passed.append(f"io_contract: as track.contract ({'; '.join(seen)})")


def _check_latency(v: Verdict, run: RunInfo, comps: list[str], budget_ms: float | None) -> None:
    total = total_latency(run, comps)
    measured = {
        c: run.metrics[f"latency_ms/{c}"] for c in comps if f"latency_ms/{c}" in run.metrics
    }
    parts = " + ".join(f"{c} {ms:.2f}" for c, ms in measured.items())
    if math.isnan(total):
        v.failed.append("latency: the run measured no latency_ms/<component>")
    elif budget_ms is None:
        v.failed.append(
            f"latency: total {total:.2f} ms, but the run has no track.budget_ms to check it "
            "against; pass --budget-ms"
        )
    elif total > budget_ms:
        v.failed.append(
            f"latency: total {total:.2f} ms ({parts}) is over track.budget_ms={budget_ms:g}; "
            "choose a faster model or precision"
        )
    else:
        v.passed.append(f"latency: total {total:.2f} ms ({parts}), within {budget_ms:g} ms")


def _check_gate(v: Verdict, run: RunInfo, comps: list[str]) -> None:
    gate = run.tags.get(GATE_TAG)
    lowered = [c for c in comps if precision_of(run, c) != "fp32"]
    if gate == "failed":
        why = run.tags.get("fidelity_gate_reasons", "see the run's description")
        v.failed.append(f"fidelity gate: failed ({why[:300]})")
    elif gate == "passed":
        v.passed.append("fidelity gate: passed")
    elif lowered:
        v.failed.append(
            f"fidelity gate: not recorded for {', '.join(lowered)} (not fp32); run it again with "
            "fidelity thresholds set (fidelity.cosine_min, fidelity.metric_drop_max)"
        )
    else:
        v.passed.append("fidelity gate: not needed (every component in fp32)")


def _check_hazards(v: Verdict, run: RunInfo, comps: list[str]) -> None:
    for c in comps:
        found = run.tags.get(f"{LINT_PREFIX}{c}")
        if found is None:
            v.failed.append(
                f"device hazards: {c} was not checked (no lint/{c} tag); run it again with the "
                "device hazard check on (export.lint)"
            )
        elif found != "ok":
            count = run.metrics.get(f"lint_hazards/{c}")
            n = f"{int(count)} hazard(s): " if count is not None else ""
            v.failed.append(f"device hazards: {c} has {n}{found}; fix them before submitting")
    if comps and all(run.tags.get(f"{LINT_PREFIX}{c}") == "ok" for c in comps):
        v.passed.append(f"device hazards: none ({', '.join(comps)})")


# ----------------------------------------------------------------------------- AI Hub


def _layout(name: str, shape: Sequence[int], forced: set[str]) -> str:
    if len(shape) < 3:
        return "n/a"
    return "channel-last" if name in forced else "channel-first"


def share_jobs(
    run: RunInfo, emails: Sequence[str], hub_client: Any | None = None
) -> dict[str, dict[str, Any]]:
    """Read what AI Hub compiled for each component (compile job, target model and its I/O),
    check that I/O against the contract once more, then share each compile job with ``emails``
    (those it is not shared with yet): component -> compile job, target model, inputs,
    shared with. A compiled model that breaks the contract is a :class:`SubmitError` before
    anything is shared."""
    from lpcvlab.hubs.aihub.client import Redactor, guard, make_client, target_io
    from lpcvlab.hubs.aihub.settings import forced_channel_last

    client = hub_client if hub_client is not None else make_client()
    redact = Redactor(client.config.api_token)
    out: dict[str, dict[str, Any]] = {}
    jobs: dict[str, Any] = {}
    failures: list[str] = []
    for comp in components(run):
        job_id = run.tags[f"aihub/{comp}/compile_job"]
        job = guard(lambda job_id=job_id: client.get_job(job_id), f"fetching {job_id}", redact)
        target = guard(job.get_target_model, f"reading the target model of {job_id}", redact)
        io = target_io(target, job_id, redact)
        contract = contract_of(run, comp)
        if contract is not None:
            failures += io_lines(comp, contract[0], io, contract[1])
        forced = forced_channel_last(str(getattr(job, "options", "") or ""))
        inputs = [
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "layout": _layout(t.name, t.shape, forced),
            }
            | ({"scale": t.scale, "zero_point": t.zero_point} if t.scale is not None else {})
            for t in io.inputs
        ]
        jobs[comp] = job
        out[comp] = {
            "compile_job": job_id,
            "compile_job_url": getattr(job, "url", None),
            "target_model": run.tags.get(f"aihub/{comp}/target_model"),
            "inputs": inputs,
            "outputs": [t.to_record() for t in io.outputs],
        }
    if failures:
        raise SubmitError(run.run_id, failures)
    for comp, job in jobs.items():
        job_id = out[comp]["compile_job"]
        before = run.tags.get(f"aihub/{comp}/compile_job_shared_with", "")
        already = {e.strip() for e in before.split(",") if e.strip()}
        missing = [e for e in emails if e not in already]
        if missing:
            guard(
                lambda job=job, missing=missing: job.modify_sharing(add_emails=missing),
                f"sharing compile job {job_id} with {', '.join(missing)}",
                redact,
            )
        out[comp] |= {"shared_with": sorted(already | set(emails)), "newly_shared": missing}
    return out


# ----------------------------------------------------------------------------- the record


def submission_record(
    run: RunInfo, jobs: dict[str, dict[str, Any]], budget_ms: float | None, when: str
) -> dict[str, Any]:
    """What was submitted, for the run's artifact and the registered versions' tags."""
    comps = list(components(run))
    objective = run.params.get("track.objective", "")
    return {
        "run_id": run.run_id,
        "run_name": run.name,
        "track": run.tags.get("track"),
        "submitted_at": when,
        "commit": run.tags.get("git_commit") or run.tags.get("mlflow.source.git.commit"),
        "git_dirty": run.tags.get("git_dirty"),
        "device": run.params.get("device.aihub_name") or run.tags.get("device"),
        "runtime": run.params.get("runtime.target_runtime") or run.tags.get("runtime"),
        "score": {"metric": objective, "value": run.metrics.get(objective)},
        "weights": run.tags.get("weights"),
        "latency_ms": {
            "total": total_latency(run, comps),
            "budget": budget_ms,
            **{c: run.metrics.get(f"latency_ms/{c}") for c in comps},
            "measured_on": {c: latency_measured_on(run, c) for c in comps},
        },
        "components": {
            c: {
                "precision": precision_of(run, c),
                ONNX_SHA_TAG: run.tags.get(f"{ONNX_SHA_TAG}/{c}"),
                "deployed_sha256": run.tags.get(f"deployed_sha256/{c}"),
                "deployed_artifact": run.tags.get(f"deployed_artifact/{c}"),
                "qairt_version": run.tags.get(f"aihub/{c}/qairt_version"),
                **{k: v for k, v in jobs[c].items() if k != "newly_shared"},
            }
            for c in comps
        },
    }


def version_tags(record: dict[str, Any], component: str) -> dict[str, str]:
    """The record, as ``submission.*`` tags of the component's registered version."""
    comp = record["components"][component]
    score = record["score"]
    return {
        "submission.submitted_at": record["submitted_at"],
        "submission.compile_job": comp["compile_job"],
        "submission.target_model": str(comp.get("target_model")),
        "submission.shared_with": ", ".join(comp["shared_with"]),
        "submission.device": str(record["device"]),
        "submission.runtime": str(record["runtime"]),
        "submission.inputs": json.dumps(comp["inputs"])[:5000],
        "submission.onnx_sha256": str(comp.get(ONNX_SHA_TAG)),
        "submission.score": f"{score['metric']}={score['value']}",
        "submission.latency_ms_total": f"{record['latency_ms']['total']:.6g}",
        "submission.latency_ms": f"{record['latency_ms'].get(component)}",
        "submission.latency_measured_on": str(record["latency_ms"]["measured_on"][component]),
        "submission.weights": str(record.get("weights")),
        "submission.deployed_sha256": str(comp.get("deployed_sha256")),
        "submission.commit": str(record["commit"]),
        "submission.record": f"runs:/{record['run_id']}/{RECORD}",
    }


@dataclass
class Submission:
    run_id: str
    verdict: Verdict
    shared: dict[str, list[str]]  # component -> addresses shared with by this call
    record: dict[str, Any] | None  # None on a dry run
    versions: list[str]  # "<name> v<version>"


def submit_run(
    client: Any,
    run_id: str,
    *,
    dry_run: bool = False,
    share_with: Sequence[str] | None = None,
    budget_ms: float | None = None,
    registry_name: str | None = None,
    hub_client: Any | None = None,
) -> Submission:
    """Check the run; unless ``dry_run``, share, register and record it (module docstring).
    A failed check raises :class:`SubmitError` before anything is shared."""
    run = get_run(client, run_id)
    budget = budget_of(run, budget_ms)
    verdict = check_run(run, budget)
    if verdict.failed:
        raise SubmitError(run_id, verdict.failed)
    emails = share_with_of(run, share_with)
    if dry_run:
        return Submission(run_id, verdict, {}, None, [])
    jobs = share_jobs(run, emails, hub_client)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    versions = register_run(client, run_id, registry_name)
    record = submission_record(run, jobs, budget, when)
    record["registered"] = {v.component: f"{v.name} v{v.version}" for v in versions}
    client.log_dict(run_id, record, RECORD)
    for v in versions:
        for key, value in version_tags(record, v.component).items():
            client.set_model_version_tag(v.name, v.version, key, value)
        client.set_registered_model_alias(v.name, ALIAS, v.version)
    tags = {
        f"aihub/{c}/compile_job_shared_with": ", ".join(j["shared_with"]) for c, j in jobs.items()
    }
    tags["submitted_at"] = when
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    shared = {c: list(j["newly_shared"]) for c, j in jobs.items()}
    return Submission(run_id, verdict, shared, record, [f"{v.name} v{v.version}" for v in versions])
