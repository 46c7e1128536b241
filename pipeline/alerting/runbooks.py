"""Next steps per detector: what the person who receives an alert should do.

Steps are plain text plus optional shell commands. Values from the logs (principal, secret
names, IP addresses) are inserted raw into the text, which the renderer escapes per channel,
and shell-quoted with :func:`shlex.quote` inside commands, so that copying a command never runs
a name someone chose. Commands use the documented CLI forms of AWS CLI v2, gcloud and Azure CLI.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Step:
    """One thing to do: a sentence and the shell commands that do it (possibly none)."""

    text: str
    commands: tuple[str, ...] = ()


def silence_hint(detector: str) -> str:
    """Return how to tune ``detector`` when its alerts are expected."""
    return f"To tune: detectors.{detector} in config.yaml"


def next_steps(alert: Alert) -> list[Step]:
    """Return the steps for ``alert``: confirm, contain (revoke, rotate), then investigate.

    The first steps depend on the detector; the containment steps depend on the cloud and
    principal type of the first (most severe) finding. An unknown detector gets the generic
    confirm step.
    """
    first = alert.findings[0]
    detector = str(first["detector"])
    cloud = str(first.get("cloud") or "")
    principal = str(first["principal"])
    principal_type = str(first.get("principal_type") or "unknown")

    intro = _INTRO_STEPS.get(detector, _generic_intro)
    steps = list(intro(alert, first))
    steps.extend(_revoke_steps(cloud, principal, principal_type))
    rotate = _rotate_step(cloud, alert.resources)
    if rotate is not None and detector != "keytrail.failure_burst":
        steps.append(rotate)
    steps.extend(_review_steps(cloud, principal, alert.source_ips, alert.accounts))
    return steps


# Detector-specific opening steps -------------------------------------------------------------


def _generic_intro(alert: Alert, first: dict[str, Any]) -> list[Step]:
    return [
        Step(
            f"Confirm with {alert.principal} (or the owner of that workload) whether this "
            "access was expected. If it was not, continue with the steps below."
        )
    ]


def _off_hours_intro(alert: Alert, first: dict[str, Any]) -> list[Step]:
    local_time = first["evidence"].get("local_time")
    when = f" at {local_time}" if local_time else ""
    return [
        Step(
            f"Ask {alert.principal} whether the reads{when} were theirs, a scheduled job or an "
            "on-call fix. If it is a recurring job, move it to a workload identity or widen "
            "the business hours for this principal."
        ),
        Step("If nobody recognises the reads, treat the credentials as stolen:"),
    ]


def _new_country_intro(alert: Alert, first: dict[str, Any]) -> list[Step]:
    where = ", ".join(alert.countries) or "the new country"
    return [
        Step(
            f"Confirm with {alert.principal} whether they are working from {where} "
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
            f"Confirm with {alert.principal} whether they are travelling or using a VPN"
            f"{route}. Two places too far apart for the time between them usually mean "
            "two people share the credentials. If it is not explained, revoke them:"
        )
    ]


def _failure_burst_intro(alert: Alert, first: dict[str, Any]) -> list[Step]:
    return [
        Step(
            f"Find out why {alert.principal} was refused so often. Many denied reads usually "
            "mean someone is probing which secrets a credential can reach, and many not-found "
            "errors mean someone is guessing secret names."
        ),
        Step(
            f"Check whether any read by {alert.principal} succeeded after the failures. If "
            "one did, rotate that secret. If the caller is not a known workload, revoke it:"
        ),
    ]


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


def _revoke_steps(cloud: str, principal: str, principal_type: str) -> list[Step]:
    if cloud == "aws":
        return _aws_revoke(principal, principal_type)
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


def _aws_revoke(principal: str, principal_type: str) -> list[Step]:
    q = shlex.quote
    if principal_type == "role" or ":role/" in principal or ":assumed-role/" in principal:
        role = _aws_role_name(principal) or "ROLE_NAME"
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
    return [
        Step(
            f"Sign {principal} out in the identity provider, then revoke the sessions of the "
            "IAM role they assumed (the role name is in the assumed-role ARN of the events). "
            + _AWS_REVOKE_POLICY,
            (
                "aws iam put-role-policy --role-name ROLE_NAME "
                "--policy-name AWSRevokeOlderSessions "
                "--policy-document file://revoke-older-sessions.json",
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
    return Step(
        f"Rotate the secrets that were read{more}, then update the workloads that use them "
        "and disable the old versions.",
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
        return [f"aws secretsmanager rotate-secret --secret-id {q(resource)}"]
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


def _review_steps(
    cloud: str, principal: str, source_ips: list[str], accounts: list[str]
) -> list[Step]:
    ips = [ip for ip in source_ips if _is_ip(ip)]
    steps = []
    if cloud == "aws":
        # lookup-events matches Username against the IAM user name or the role session name.
        name = principal.rsplit("/", 1)[-1]
        text = f"Review other activity by {principal}"
        if ips:
            text += f" and from {', '.join(ips)} (CloudTrail field sourceIPAddress)"
        steps.append(
            Step(
                text + ". lookup-events filters by user name but not by IP address, so search "
                "by IP in CloudTrail Lake or Athena.",
                (
                    "aws cloudtrail lookup-events --lookup-attributes "
                    + shlex.quote(f"AttributeKey=Username,AttributeValue={name}"),
                ),
            )
        )
    elif cloud == "gcp":
        project = f" --project={shlex.quote(accounts[0])}" if accounts else ""
        commands = tuple(
            "gcloud logging read "
            + shlex.quote(f'protoPayload.requestMetadata.callerIp="{ip}"')
            + f"{project} --freshness=7d"
            for ip in ips
        )
        target = f" from {', '.join(ips)}" if ips else ""
        steps.append(Step(f"Review other activity by {principal}{target}.", commands))
    elif cloud == "azure":
        commands = tuple(
            "az monitor log-analytics query --workspace WORKSPACE_ID --analytics-query "
            + shlex.quote(f'AzureDiagnostics | where CallerIPAddress == "{ip}"')
            for ip in ips
        )
        target = f" from {', '.join(ips)}" if ips else ""
        steps.append(Step(f"Review other activity by {principal}{target}.", commands))
    elif ips:
        steps.append(Step(f"Review other activity from {', '.join(ips)}."))
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
