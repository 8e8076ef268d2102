"""The automations that watch requant's runs, so a nightly that nobody looks at still tells
someone when it goes wrong.

- **Silent runs marked Crashed**: every flow run sends a heartbeat event every
  ``HEARTBEAT_S`` (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set on both work pools and by the CLI);
  a requant run whose process was killed (``kill -9``, OOM killer, a lost host) stops sending
  them, and this automation moves it from Running to Crashed ``SILENT_AFTER_S`` after its last
  heartbeat. Without it such a run shows Running in the UI forever (Prefect Cloud has this
  built in; a self-hosted server needs the automation, as Prefect's "detect zombie flows"
  guide says). Only requant's flows are watched: the server may be shared.
- **The team told**: when ``REQUANT_NOTIFY_WEBHOOK_URL`` is set where ``make prefect-apply``
  runs (the operator's environment, never a run parameter), a webhook notification block is
  made (the URL kept in the block's secrets: it is a credential for Slack and most chat tools)
  and two automations send to it: a requant run that Failed or Crashed, and a gate that
  failed (``requant.gate.failed``). The body is Slack's ``{"text": ...}``; most chat webhooks
  accept it.

Idempotent: applying again replaces these automations by name, and removes the notifying ones
when the webhook is no longer configured.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

#: Seconds between a flow run's heartbeats (Prefect's minimum is 30).
HEARTBEAT_S = 30
#: A run with no heartbeat (and no final state) for this long is marked Crashed: two and a half
#: heartbeats, so one late heartbeat on a busy host is not taken for a dead run.
SILENT_AFTER_S = 75
#: The flows this project runs; automations match runs of these flows only.
FLOWS = ("requantize", "promote")
WEBHOOK_ENV = "REQUANT_NOTIFY_WEBHOOK_URL"
BLOCK_NAME = "requant-team-webhook"
CRASHED = "requant: mark silent runs Crashed"
RUN_FAILED = "requant: notify when a run fails or crashes"
GATE_FAILED = "requant: notify when a gate fails"
FINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def _related_flows() -> dict[str, object]:
    return {"prefect.resource.role": "flow", "prefect.resource.name": list(FLOWS)}


def crashed_automation():  # -> prefect.automations.Automation
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=CRASHED,
        description=f"A requant flow run with no heartbeat for {SILENT_AFTER_S} s and no final "
        "state: its process is gone (kill -9, OOM, lost host). Made by make prefect-apply.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in FINAL)},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=_related_flows(),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=SILENT_AFTER_S),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {SILENT_AFTER_S} s: the run's process is gone "
                    "(requant automation; see docs/platform.md).")],
    )


def run_failed_automation(block_id):  # -> Automation
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=RUN_FAILED, description="A requant run Failed or Crashed: the team's webhook.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=_related_flows(), posture=Posture.Reactive, threshold=1,
            within=timedelta(0)),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="requant: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}",
            body="requant: {{ flow.name }} run {{ flow_run.name }} ended "
                 "{{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
                 "{{ flow_run|ui_url }}")],
    )


def gate_failed_automation(block_id):  # -> Automation
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=GATE_FAILED, description="A requant gate failed: nothing was published.",
        trigger=EventTrigger(
            expect={"requant.gate.failed"}, match={"prefect.resource.id": "requant.model.*"},
            posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="requant: gate failed for {{ event.payload.source }}",
            body="requant: the gate failed for {{ event.payload.source }} (run "
                 "{{ event.payload.run_id }}, status {{ event.payload.status }}, recovery "
                 "{{ event.payload.recovery }}); nothing was published or promoted.")],
    )


def webhook_block(url: str):  # -> CustomWebhookNotificationBlock
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    return CustomWebhookNotificationBlock(
        name="requant", url="{{ webhook_url }}", secrets={"webhook_url": url},
        json_data={"text": "{{ body }}"})


def apply_automations(log: Callable[[str], None] = print) -> list[str]:
    """Create or replace requant's automations on the server at PREFECT_API_URL; the names
    applied, in order."""
    from prefect.automations import Automation

    wanted = [crashed_automation()]
    url = os.environ.get(WEBHOOK_ENV, "").strip()
    if url:
        from requant.errors import SettingsError

        if not url.startswith(("https://", "http://")):
            raise SettingsError(f"{WEBHOOK_ENV}: not an http(s) URL. Set it to the team's "
                                "webhook (e.g. a Slack incoming webhook), or unset it.")
        block_id = webhook_block(url).save(BLOCK_NAME, overwrite=True)
        wanted += [run_failed_automation(block_id), gate_failed_automation(block_id)]
    for name in (CRASHED, RUN_FAILED, GATE_FAILED):
        _delete_named(Automation, name)
    for automation in wanted:
        automation.create()
        log(f"automation: {automation.name}")
    if not url:
        log(f"no team notifications: {WEBHOOK_ENV} is not set")
    return [a.name for a in wanted]


def _delete_named(automation_cls, name: str) -> None:
    from prefect.exceptions import ObjectNotFound

    while True:
        try:
            automation_cls.read(name=name).delete()
        except (ObjectNotFound, ValueError):
            return
