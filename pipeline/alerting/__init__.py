"""Alerting: turn findings into alerts, render them for Slack and email, and deliver them.

:mod:`pipeline.alerting.delivery` defines the ``alerting`` settings and connects routing,
silences, the outbox table and the channels for the engine.
"""

from pipeline.alerting.alerts import Alert, alerts_from_findings, finding_records
from pipeline.alerting.escape import escape_mrkdwn, header_text, truncate
from pipeline.alerting.output import (
    OutputReport,
    OutputSettings,
    findings_to_json_lines,
    render_console,
    write_outputs,
)
from pipeline.alerting.render import Renderer, TemplateOutputError, email_subject
from pipeline.alerting.runbooks import Step, next_steps, silence_hint

__all__ = [
    "Alert",
    "OutputReport",
    "OutputSettings",
    "Renderer",
    "Step",
    "TemplateOutputError",
    "alerts_from_findings",
    "email_subject",
    "escape_mrkdwn",
    "finding_records",
    "findings_to_json_lines",
    "header_text",
    "next_steps",
    "render_console",
    "silence_hint",
    "truncate",
    "write_outputs",
]
