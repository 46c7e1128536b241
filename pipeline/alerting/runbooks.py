"""Next steps per detector: what the person who receives an alert should do.

Steps are plain text plus optional shell commands. Values from the logs (principal, secret
names, IP addresses) are inserted raw into the text, which the renderer escapes per channel,
and shell-quoted with :func:`shlex.quote` inside commands, so that copying a command never runs
a name someone chose. Commands use the documented CLI forms of AWS CLI v2, gcloud and Azure CLI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shlex
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pipeline.alerting.alerts import Alert

__all__ = ["Step", "next_steps", "silence_hint"]

# Commands are listed for at most this many secrets; the rest are counted.
MAX_SECRETS_WITH_COMMANDS: Final = 5

# Review commands search the logs from this long before the first event to this long after
# the last one, to show what the actor did just before and after the finding.
REVIEW_MARGIN: Final = dt.timedelta(hours=24)


@dataclass(frozen=True)
class Step:
    """One thing to do: a sentence and the shell commands that do it (possibly none)."""

    text: str
    commands: tuple[str, ...] = ()


def silence_hint(detector: str, principal: str | None = None) -> str:
    """Return how to silence this alert for a while and where to tune ``detector`` for good."""
    matchers = f"--matcher detector={detector}"
    if principal:
        matchers += f" --matcher principal={shlex.quote(principal)}"
    return (
        f"To silence it for a while: keytrail silence add {matchers} --owner YOU "
        f"--reason WHY --expires 1d. To tune: detectors.{detector} or alerting.allow_list "
        "in config.yaml."
    )


def next_steps(alert: Alert) -> list[Step]:
    """Return the steps for ``alert``: confirm, contain (revoke, rotate), then investigate.

    The first steps depend on the detector; the containment steps depend on the cloud and
    principal type of the first (most severe) finding. An unknown detector gets the generic
    confirm step.
    """
    first = alert.findings[0]
    detector = str(first["detector"])
    cloud = str(first.get("cloud") or "")
    principal = str(first["principal"]) if first.get("principal") else None
    principal_type = str(first.get("principal_type") or "unknown")
    evidence = first.get("evidence") or {}

    intro = _INTRO_STEPS.get(detector, _generic_intro)
    steps = list(intro(alert, first))
    if principal is None:
        steps.append(_unnamed_principals_step(alert))
    else:
        arns = [str(arn) for arn in evidence.get("principal_arns") or []]
        steps.extend(_revoke_steps(cloud, principal, principal_type, arns))
    rotate = _rotate_step(cloud, alert.resources)
    if rotate is not None and detector != "keytrail.failure_burst":
        steps.append(rotate)
    window = _review_window(alert)
    steps.extend(_review_steps(cloud, principal, alert.source_ips, alert.accounts, window))
    return steps


def _unnamed_principals_step(alert: Alert) -> Step:
    """Return the containment step for an alert about an address, not one principal."""
    address = ", ".join(alert.source_ips) or "the source address"
    if not alert.principals:
        return Step(
            f"Find which credentials were used from {address} and revoke them if the "
            "caller is not a known workload."
        )
    return Step(
        f"Check each principal that called from {address}: {', '.join(alert.principals)}. "
        "Revoke the credentials of every one that is not expected to call from there."
    )


# Detector-specific opening steps -------------------------------------------------------------


def _generic_intro(alert: Alert, first: dict[str, Any]) -> list[Step]:
    return [
        Step(
            f"Confirm with {_actor(alert)} (or the owner of that workload) whether this "
            "access was expected. If it was not, continue with the steps below."
        )
    ]


def _off_hours_intro(alert: Alert, first: dict[str, Any]) -> list[Step]:
    evidence = first["evidence"]
    local_time = evidence.get("local_time")
    local_times = evidence.get("local_times")
    if not local_time and isinstance(local_times, list) and local_times:
        zone = f" {evidence['timezone']}" if evidence.get("timezone") else ""
        day = f"{evidence['local_date']} " if evidence.get("local_date") else ""
        local_time = f"{day}{', '.join(map(str, local_times))}{zone}"
    when = f" at {local_time}" if local_time else ""
    return [
        Step(
            f"Ask {_actor(alert)} whether the reads{when} were theirs, a scheduled job or an "
            "on-call fix. If it is a recurring job, move it to a workload identity or widen "
            "the business hours for this principal."
        ),
        Step("If nobody recognises the reads, treat the credentials as stolen:"),
    ]


def _new_country_intro(alert: Alert, first: dict[str, Any]) -> list[Step]:
    where = ", ".join(alert.countries) or "the new country"
    return [
        Step(
            f"Confirm with {_actor(alert)} whether they are working from {where} "
            "(travel, VPN exit, new office). If not, treat the credentials as stolen:"
        )
    ]


def _impossible_travel_intro(alert: Alert, first: dict[str, Any]) -> list[Step]:
    evidence = first["evidence"]
    origin = _place(evidence.get("from"))
    target = _place(evidence.get("to"))
    route = f" (seen in {origin} and then in {target})" if origin and target else ""
    return [
        Step(
            f"Confirm with {_actor(alert)} whether they are travelling or using a VPN"
            f"{route}. Two places too far apart for the time between them usually mean "
            "two people share the credentials. If it is not explained, revoke them:"
        )
    ]


def _failure_burst_intro(alert: Alert, first: dict[str, Any]) -> list[Step]:
    evidence = first.get("evidence") or {}
    if first.get("principal"):
        caller = str(first["principal"])
    else:
        caller = f"the caller at {evidence.get('key_value') or ', '.join(alert.source_ips)}"
    steps = [
        Step(
            f"Find out why {caller} was refused so often. Many denied reads usually "
            "mean someone is probing which secrets a credential can reach, and many not-found "
            "errors mean someone is guessing secret names."
        )
    ]
    success = evidence.get("success_after")
    if isinstance(success, dict) and success.get("time"):
        steps.append(_success_step(success, str(first.get("cloud") or "")))
    else:
        steps.append(
            Step(
                f"Check whether any read by {caller} succeeded after the failures (keytrail "
                "found none shortly after the burst). If one did, rotate that secret."
            )
        )
    steps.append(Step("If the caller is not a known workload, revoke its credentials:"))
    return steps


def _success_step(success: dict[str, Any], cloud: str) -> Step:
    """Return the step about the read that succeeded after a failure burst."""
    who = success.get("principal") or "an unknown principal"
    what = success.get("resource") or "a secret"
    source = f" from {success['source_ip']}" if success.get("source_ip") else ""
    after = success.get("minutes_after_burst")
    delay = f", {after:g} min after the last failure" if isinstance(after, int | float) else ""
    uid = f" (event {success['event_uid']})" if success.get("event_uid") else ""
    text = (
        f"A read succeeded after the failures: {who} read {what}{source} at {success['time']}"
        f"{delay}{uid}. Treat that secret as exposed and rotate it unless the read is explained."
    )
    commands = _rotate_commands(cloud, str(success["resource"])) if success.get("resource") else []
    return Step(text, tuple(commands))


def _actor(alert: Alert) -> str:
    return alert.principal or alert.who or "the caller"


_INTRO_STEPS: Final[dict[str, Callable[[Alert, dict[str, Any]], list[Step]]]] = {
    "keytrail.off_hours": _off_hours_intro,
    "keytrail.new_country": _new_country_intro,
    "keytrail.impossible_travel": _impossible_travel_intro,
    "keytrail.failure_burst": _failure_burst_intro,
}


def _place(value: Any) -> str:
    if not isinstance(value, dict):
        return ""
    parts = [str(value[key]) for key in ("city", "country") if value.get(key)]
    return ", ".join(parts)


# Containment: revoke the principal's credentials ---------------------------------------------


def _revoke_steps(cloud: str, principal: str, principal_type: str, arns: list[str]) -> list[Step]:
    if cloud == "aws":
        return _aws_revoke(principal, principal_type, arns)
    if cloud == "gcp":
        return _gcp_revoke(principal, principal_type)
    if cloud == "azure":
        return _azure_revoke(principal, principal_type)
    return [Step(f"Revoke the active sessions and keys of {principal} in its cloud account.")]


_AWS_REVOKE_POLICY: Final = (
    'revoke-older-sessions.json is a policy that denies every action ("Effect": "Deny", '
    '"Action": "*", "Resource": "*") under the condition DateLessThan '
    "aws:TokenIssueTime set to the current UTC time."
)


def _aws_revoke(principal: str, principal_type: str, arns: list[str]) -> list[Step]:
    q = shlex.quote
    # The role is in the principal itself for a role, and in the assumed-role ARN of the events
    # (kept in the evidence as principal_arns) for a federated or SSO user.
    roles = sorted({name for name in map(_aws_role_name, [principal, *arns]) if name})
    if principal_type == "role" or ":role/" in principal or ":assumed-role/" in principal:
        role = roles[0] if len(roles) == 1 else "ROLE_NAME"
        return [
            Step(
                f"Revoke the sessions of role {role} issued before now. This is what the IAM "
                "console's 'Revoke active sessions' button does. " + _AWS_REVOKE_POLICY,
                (
                    f"aws iam put-role-policy --role-name {q(role)} "
                    "--policy-name AWSRevokeOlderSessions "
                    "--policy-document file://revoke-older-sessions.json",
                ),
            )
        ]
    if principal_type == "user":
        user = _after(principal, ":user/") or principal
        return [
            Step(
                f"Deactivate the access keys of IAM user {user} and deny its sessions issued "
                "before now. " + _AWS_REVOKE_POLICY,
                (
                    f"aws iam list-access-keys --user-name {q(user)}",
                    f"aws iam update-access-key --user-name {q(user)} "
                    "--access-key-id ACCESS_KEY_ID --status Inactive",
                    f"aws iam put-user-policy --user-name {q(user)} "
                    "--policy-name AWSRevokeOlderSessions "
                    "--policy-document file://revoke-older-sessions.json",
                ),
            )
        ]
    if principal_type == "root":
        return [
            Step(
                "Root credentials cannot be limited by an IAM policy: change the root "
                "password, delete any root access keys and check the root MFA device."
            )
        ]
    if roles:
        assumed = f"IAM role {', '.join(roles)} they assumed"
    else:
        assumed = "IAM role they assumed (the role name is in the assumed-role ARN of the events)"
    return [
        Step(
            f"Sign {principal} out in the identity provider, then revoke the sessions of the "
            f"{assumed}. " + _AWS_REVOKE_POLICY,
            tuple(
                f"aws iam put-role-policy --role-name {q(role)} "
                "--policy-name AWSRevokeOlderSessions "
                "--policy-document file://revoke-older-sessions.json"
                for role in roles or ["ROLE_NAME"]
            ),
        )
    ]


def _aws_role_name(principal: str) -> str | None:
    assumed = _after(principal, ":assumed-role/")
    if assumed:
        return assumed.split("/")[0]
    role_path = _after(principal, ":role/")
    if role_path:
        return role_path.rsplit("/", 1)[-1]
    return None


def _gcp_revoke(principal: str, principal_type: str) -> list[Step]:
    q = shlex.quote
    if principal_type == "service_account" or principal.endswith(".gserviceaccount.com"):
        account = q(principal)
        return [
            Step(
                f"Disable the user-managed keys of service account {principal}. Disabling the "
                "account itself stops every workload that uses it, so do that only if the "
                "keys are not the way in.",
                (
                    f"gcloud iam service-accounts keys list --iam-account={account} "
                    "--managed-by=user",
                    f"gcloud iam service-accounts keys disable KEY_ID --iam-account={account}",
                    f"gcloud iam service-accounts disable {account}",
                ),
            )
        ]
    return [
        Step(
            f"Sign {principal} out of all sessions and reset their password in the Google "
            "Admin console (Directory > Users > the user > Sign out). gcloud has no command "
            "for this."
        )
    ]


def _azure_revoke(principal: str, principal_type: str) -> list[Step]:
    q = shlex.quote
    if principal_type == "user" or (
        principal_type in ("federated", "unknown") and "@" in principal
    ):
        user = urllib.parse.quote(principal, safe="@")
        return [
            Step(
                f"Revoke the sign-in sessions of {principal} in Microsoft Entra ID (Microsoft "
                "Graph revokeSignInSessions; refresh tokens stop working within minutes).",
                (
                    "az rest --method POST --url "
                    + q(f"https://graph.microsoft.com/v1.0/users/{user}/revokeSignInSessions"),
                ),
            )
        ]
    if principal_type == "application":
        return [
            Step(
                f"Remove the client secrets and certificates of application {principal} and "
                "issue new ones to its owners.",
                (
                    f"az ad app credential list --id {q(principal)}",
                    f"az ad app credential delete --id {q(principal)} --key-id KEY_ID",
                ),
            )
        ]
    if principal_type == "managed_identity":
        return [
            Step(
                f"Tokens of managed identity {principal} cannot be revoked. Find the resource "
                "it belongs to and remove its role assignments on the vault until that "
                "resource is checked.",
                (f"az role assignment list --assignee {q(principal)} --all",),
            )
        ]
    return [Step(f"Revoke the sessions and credentials of {principal} in Microsoft Entra ID.")]


# Containment: rotate the secrets that were read ----------------------------------------------


def _rotate_step(cloud: str, resources: list[str]) -> Step | None:
    if not resources:
        return None
    commands: list[str] = []
    for resource in resources[:MAX_SECRETS_WITH_COMMANDS]:
        commands.extend(_rotate_commands(cloud, resource))
    extra = len(resources) - MAX_SECRETS_WITH_COMMANDS
    more = f" ({extra} more secrets are listed in the alert)" if extra > 0 else ""
    how = ""
    if cloud == "aws" and any("aws secretsmanager rotate-secret" in c for c in commands):
        how = (
            " For a Secrets Manager secret, rotate-secret works only if rotation is configured "
            "on it (a rotation Lambda function or managed rotation); otherwise store a new "
            "value with put-secret-value."
        )
    return Step(
        f"Rotate the secrets that were read{more}, then update the workloads that use them "
        f"and disable the old versions.{how}",
        tuple(commands),
    )


def _rotate_commands(cloud: str, resource: str) -> list[str]:
    q = shlex.quote
    if cloud == "aws":
        if ":ssm:" in resource or resource.startswith("/"):
            name = _ssm_parameter_name(resource)
            return [
                f"aws ssm put-parameter --name {q(name)} --type SecureString --overwrite "
                "--value file://new-value.txt"
            ]
        if ":kms:" in resource:
            return []
        # rotate-secret needs a rotation Lambda function (or a managed rotation) on the secret;
        # without one, the new value is stored with put-secret-value.
        return [
            f"aws secretsmanager rotate-secret --secret-id {q(resource)}",
            f"aws secretsmanager put-secret-value --secret-id {q(resource)} "
            "--secret-string file://new-value.txt",
        ]
    if cloud == "gcp":
        match = re.fullmatch(r"projects/([^/]+)/secrets/([^/]+)(?:/versions/[^/]+)?", resource)
        if match is None:
            return []
        project, secret = q(match[1]), q(match[2])
        return [
            f"gcloud secrets versions add {secret} --project={project} --data-file=new-value.txt",
            f"gcloud secrets versions disable OLD_VERSION --secret={secret} --project={project}",
        ]
    if cloud == "azure":
        vault_secret = _azure_vault_secret(resource)
        if vault_secret is None:
            return []
        vault, secret = q(vault_secret[0]), q(vault_secret[1])
        return [
            f"az keyvault secret set --vault-name {vault} --name {secret} --file new-value.txt",
            f"az keyvault secret set-attributes --vault-name {vault} --name {secret} "
            "--version OLD_VERSION --enabled false",
        ]
    return []


def _ssm_parameter_name(resource: str) -> str:
    # An SSM parameter ARN drops the leading slash of a hierarchical name
    # (arn:...:parameter/prod/db is the parameter /prod/db).
    name = _after(resource, ":parameter/")
    if name is None:
        return resource
    return "/" + name if "/" in name else name


def _azure_vault_secret(resource: str) -> tuple[str, str] | None:
    parsed = urllib.parse.urlsplit(resource)
    parts = [part for part in parsed.path.split("/") if part]
    if not parsed.hostname or len(parts) < 2 or parts[0] != "secrets":
        return None
    return parsed.hostname.split(".")[0], parts[1]


# Investigation ---------------------------------------------------------------------------------


def _review_window(alert: Alert) -> tuple[str, str] | None:
    """Return the UTC search window of the review commands as ISO 8601 texts, if known."""
    if alert.first_seen is None or alert.last_seen is None:
        return None
    since = (alert.first_seen - REVIEW_MARGIN).astimezone(dt.UTC)
    until = (alert.last_seen + REVIEW_MARGIN).astimezone(dt.UTC)
    return since.strftime("%Y-%m-%dT%H:%M:%SZ"), until.strftime("%Y-%m-%dT%H:%M:%SZ")


def _review_steps(
    cloud: str,
    principal: str | None,
    source_ips: list[str],
    accounts: list[str],
    window: tuple[str, str] | None,
) -> list[Step]:
    ips = [ip for ip in source_ips if _is_ip(ip)]
    q = shlex.quote
    subject = f" by {principal}" if principal else ""
    target = f" from {', '.join(ips)}" if ips else ""
    period = ""
    if window is not None:
        period = f" between {window[0]} and {window[1]} (a day either side of the finding)"
    steps = []
    if cloud == "aws":
        commands: tuple[str, ...] = ()
        if principal:
            # lookup-events matches Username against the IAM user name or the role session name.
            name = principal.rsplit("/", 1)[-1]
            times = f" --start-time {window[0]} --end-time {window[1]}" if window else ""
            commands = (
                "aws cloudtrail lookup-events --lookup-attributes "
                + q(f"AttributeKey=Username,AttributeValue={name}")
                + times,
            )
        text = f"Review other activity{subject}{target}{period}"
        if ips:
            text += " (CloudTrail field sourceIPAddress)"
        steps.append(
            Step(
                text + ". lookup-events filters by user name but not by IP address, so search "
                "by IP in CloudTrail Lake or Athena.",
                commands,
            )
        )
    elif cloud == "gcp":
        project = f" --project={q(accounts[0])}" if accounts else ""
        # An explicit timestamp range, because --freshness counts back from today and finds
        # nothing for an older finding.
        times = f' AND timestamp>="{window[0]}" AND timestamp<="{window[1]}"' if window else ""
        filters = [f'protoPayload.requestMetadata.callerIp="{ip}"' for ip in ips]
        if principal:
            filters.insert(0, f'protoPayload.authenticationInfo.principalEmail="{principal}"')
        commands = tuple(f"gcloud logging read {q(text + times)}{project}" for text in filters)
        steps.append(Step(f"Review other activity{subject}{target}{period}.", commands))
    elif cloud == "azure":
        times = (
            f" and TimeGenerated between (datetime({window[0]}) .. datetime({window[1]}))"
            if window
            else ""
        )
        commands = tuple(
            "az monitor log-analytics query --workspace WORKSPACE_ID --analytics-query "
            + q(f'AzureDiagnostics | where CallerIPAddress == "{ip}"{times}')
            for ip in ips
        )
        steps.append(Step(f"Review other activity{subject}{target}{period}.", commands))
    elif ips:
        steps.append(Step(f"Review other activity from {', '.join(ips)}{period}."))
    return steps


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _after(text: str, marker: str) -> str | None:
    index = text.find(marker)
    if index == -1:
        return None
    return text[index + len(marker) :] or None
