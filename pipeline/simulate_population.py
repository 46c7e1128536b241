"""The simulated organisation: accounts, projects, vaults, secrets, people and workloads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np

from pipeline.simulate_geo import GeoPicker

__all__ = [
    "AWS_ACCOUNTS",
    "AZURE_SUBSCRIPTION",
    "AZURE_TENANT",
    "AZURE_VAULTS",
    "GCP_PROJECTS",
    "Access",
    "Principal",
    "Vault",
    "build_population",
]

AWS_ACCOUNTS: Final = {"prod": "402857164913", "data": "815566230147"}
# Project id -> project number (Secret Manager writes resource names with the number).
GCP_PROJECTS: Final = {"kt-prod-3817": "604218573321", "kt-data-5522": "218840067415"}
AZURE_SUBSCRIPTION: Final = "7D1F3C52-6A0E-4B8E-9F21-3C5D8E0A4B17"
AZURE_TENANT: Final = "5b2e8f10-93c4-4d7a-a1e6-0f8c2d4b6a91"
EMAIL_DOMAIN: Final = "example.com"


@dataclass(frozen=True)
class Vault:
    """An Azure Key Vault."""

    name: str
    resource_group: str
    location: str

    @property
    def resource_id(self) -> str:
        """The upper-case resource id that Key Vault diagnostic records carry."""
        return (
            f"/SUBSCRIPTIONS/{AZURE_SUBSCRIPTION}/RESOURCEGROUPS/{self.resource_group}"
            f"/PROVIDERS/MICROSOFT.KEYVAULT/VAULTS/{self.name}"
        )

    @property
    def host(self) -> str:
        """The vault's data-plane host name."""
        return f"{self.name.lower()}.vault.azure.net"


AZURE_VAULTS: Final = {
    vault.name: vault
    for vault in (
        Vault("KV-PAYMENTS-PROD", "RG-PAYMENTS-PROD", "eastus"),
        Vault("KV-PLATFORM-SHARED", "RG-PLATFORM", "westeurope"),
        Vault("KV-LEGACY-REPORTS", "RG-PLATFORM", "westeurope"),
    )
}

# Secret names per scope (AWS account, GCP project, Azure vault).
SECRETS: Final[dict[str, tuple[str, ...]]] = {
    "aws:prod": (
        "prod/payments/stripe-api-key",
        "prod/payments/db-password",
        "prod/orders/db-password",
        "prod/orders/queue-token",
        "prod/shared/datadog-api-key",
        "prod/shared/github-deploy-key",
        "prod/auth/jwt-signing-key",
        "prod/auth/oauth-client-secret",
        "prod/search/elastic-password",
        "prod/mail/smtp-password",
    ),
    "aws:data": (
        "data/warehouse/snowflake-password",
        "data/warehouse/dbt-token",
        "data/exports/sftp-private-key",
        "data/exports/partner-api-key",
        "data/backup/encryption-passphrase",
        "data/etl/airflow-fernet-key",
    ),
    "gcp:kt-prod-3817": (
        "checkout-db-password",
        "stripe-webhook-secret",
        "session-signing-key",
        "sendgrid-api-key",
        "maps-api-key",
        "recaptcha-secret",
        "feature-flags-sdk-key",
        "cdn-signing-key",
    ),
    "gcp:kt-data-5522": (
        "bigquery-export-key",
        "looker-client-secret",
        "salesforce-refresh-token",
        "invoice-api-token",
        "warehouse-db-password",
        "etl-sftp-password",
        "ads-api-developer-token",
        "crm-webhook-secret",
        "pagerduty-routing-key",
        "backup-gpg-passphrase",
    ),
    "azure:KV-PAYMENTS-PROD": (
        "payments-db-connection",
        "adyen-api-key",
        "fraud-service-token",
        "ledger-signing-key",
        "billing-export-sas",
        "pci-vault-token",
    ),
    "azure:KV-PLATFORM-SHARED": (
        "aks-admin-kubeconfig",
        "acr-pull-password",
        "servicebus-connection",
        "storage-account-key",
        "grafana-admin-password",
        "sql-reporting-password",
        "redis-access-key",
        "cosmos-primary-key",
    ),
    "azure:KV-LEGACY-REPORTS": ("ssrs-service-password", "legacy-ftp-password", "crystal-license"),
}


@dataclass
class Principal:
    """A simulated identity and its habits.

    ``key`` is the principal string keytrail is expected to normalize the identity to. Where
    the provider offers more than one identifier, ``aliases`` lists the others.
    """

    key: str
    kind: str  # person, ci, workload
    cloud: str
    scope: str  # AWS account alias, GCP project id or Azure vault name
    region: str = ""
    timezone: str = "UTC"
    holidays_country: str | None = None
    city: str | None = None
    ips: list[str] = field(default_factory=list)
    user_agent: str = ""
    secrets: tuple[str, ...] = ()
    aliases: list[str] = field(default_factory=list)
    # AWS identity: IAMUser, SSO or AssumedRole.
    aws_identity: str = ""
    aws_name: str = ""  # IAM user name or role name
    aws_session: str = ""
    aws_principal_id: str = ""
    aws_access_key: str = ""
    # Azure claims.
    azure_oid: str = ""
    azure_appid: str = ""
    azure_mirid: str = ""
    azure_claim_style: str = "short"  # short names (upn, oid) or URI names
    # Workload schedule: read every ``interval_hours`` at ``minute`` past the hour.
    interval_hours: int = 0
    minute: int = 0
    reads_per_run: int = 1
    operation: str = "read"

    @property
    def principal_type(self) -> str:
        """The principal_type keytrail is expected to assign."""
        if self.cloud == "aws":
            return {"IAMUser": "user", "SSO": "federated"}.get(self.aws_identity, "role")
        if self.cloud == "gcp":
            return "user" if self.kind == "person" else "service_account"
        if self.kind == "person":
            return "user"
        return "managed_identity" if self.azure_mirid else "application"


@dataclass
class Access:
    """One simulated API call, before rendering into a provider's record layout."""

    time_us: int  # microseconds since the Unix epoch, UTC
    principal: Principal
    operation: str  # read, batch_read, list, describe, write, params_read, whoami, ...
    secrets: tuple[str, ...]
    outcome: str  # success, denied, not_found, unauthorized
    ip: str


_PEOPLE: Final = (
    # (name, city, timezone, holidays country, cloud, scope, region, AWS identity)
    ("maria.lopez", "new_york", "America/New_York", "US", "gcp", "kt-prod-3817", "", ""),
    ("david.kim", "new_york", "America/New_York", "US", "aws", "prod", "us-east-1", "SSO"),
    ("sarah.oconnor", "new_york", "America/New_York", "US", "azure", "KV-PAYMENTS-PROD", "", ""),
    ("tom.becker", "new_york", "America/New_York", "US", "aws", "data", "us-east-1", "IAMUser"),
    ("priya.shah", "new_york", "America/New_York", "US", "gcp", "kt-data-5522", "", ""),
    ("kevin.nguyen", "los_angeles", "America/Los_Angeles", "US", "aws", "prod", "us-east-1", "SSO"),
    ("emily.chen", "los_angeles", "America/Los_Angeles", "US", "gcp", "kt-prod-3817", "", ""),
    (
        "jake.miller",
        "los_angeles",
        "America/Los_Angeles",
        "US",
        "azure",
        "KV-PAYMENTS-PROD",
        "",
        "",
    ),
    (
        "olivia.brown",
        "los_angeles",
        "America/Los_Angeles",
        "US",
        "aws",
        "prod",
        "us-east-1",
        "IAMUser",
    ),
    ("jonas.weber", "berlin", "Europe/Berlin", "DE", "gcp", "kt-prod-3817", "", ""),
    ("lena.fischer", "berlin", "Europe/Berlin", "DE", "aws", "prod", "eu-central-1", "SSO"),
    ("felix.wagner", "berlin", "Europe/Berlin", "DE", "azure", "KV-PLATFORM-SHARED", "", ""),
    ("anna.schmidt", "berlin", "Europe/Berlin", "DE", "aws", "data", "eu-central-1", "IAMUser"),
    ("max.hoffmann", "berlin", "Europe/Berlin", "DE", "gcp", "kt-data-5522", "", ""),
    ("arjun.banerjee", "kolkata", "Asia/Kolkata", "IN", "azure", "KV-PLATFORM-SHARED", "", ""),
    ("ananya.das", "kolkata", "Asia/Kolkata", "IN", "gcp", "kt-data-5522", "", ""),
    ("rahul.sen", "kolkata", "Asia/Kolkata", "IN", "aws", "data", "eu-central-1", "SSO"),
    ("sneha.roy", "kolkata", "Asia/Kolkata", "IN", "azure", "KV-PAYMENTS-PROD", "", ""),
)
# People whose GCP calls come over IPv6 from their home city.
_IPV6_PEOPLE: Final = frozenset({"maria.lopez", "jonas.weber"})

_USER_AGENTS: Final = {
    "aws": (
        "aws-cli/2.17.20 md/awscrt#0.20.11 ua/2.0 os/macos#23.5.0 md/arch#arm64 lang/python#3.11.9 "
        "md/pyimpl#CPython cfg/retry-mode#standard md/installer#source md/prompt#off "
        "md/command#secretsmanager.get-secret-value",
        "Boto3/1.34.144 md/Botocore#1.34.144 ua/2.0 os/linux#6.5.0-1022-aws md/arch#x86_64 "
        "lang/python#3.12.4 md/pyimpl#CPython cfg/retry-mode#legacy Botocore/1.34.144",
        "AWS Internal",
    ),
    "gcp": (
        "google-cloud-sdk gcloud/489.0.0 command/gcloud.secrets.versions.access "
        "invocation-id/3f1c0b1e2d8a4e6f environment/None environment-version/None "
        "client-os/MACOSX client-os-ver/14.5.0 client-pltf-arch/arm interactive/True "
        "from-script/False python/3.11.8 term/xterm-256color (Macintosh; Intel Mac OS X 14.5.0),"
        "gzip(gfe)",
        "grpc-python/1.64.1 grpc-c/41.0.0 (linux; chttp2),gzip(gfe)",
        "grpc-go/1.64.0,gzip(gfe)",
    ),
    "azure": (
        "azsdk-python-keyvault-secrets/4.8.0 Python/3.11.9 (macOS-14.5-arm64-arm-64bit)",
        "azsdk-net-Security.KeyVault.Secrets/4.6.0 (.NET 8.0.7; Ubuntu 22.04.4 LTS)",
        "PowerShell/7.4.3 Az.KeyVault/5.2.2",
    ),
}


def _hex(rng: np.random.Generator, length: int) -> str:
    return "".join(f"{int(v):x}" for v in rng.integers(0, 16, size=length))


def _upper_id(rng: np.random.Generator, prefix: str, length: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return prefix + "".join(alphabet[int(v)] for v in rng.integers(0, len(alphabet), size=length))


def _guid(rng: np.random.Generator) -> str:
    text = _hex(rng, 32)
    return f"{text[:8]}-{text[8:12]}-4{text[13:16]}-a{text[17:20]}-{text[20:]}"


def _scope_secrets(cloud: str, scope: str) -> tuple[str, ...]:
    return SECRETS[f"{cloud}:{scope}"]


def _pick_secrets(rng: np.random.Generator, pool: tuple[str, ...], count: int) -> tuple[str, ...]:
    indices = sorted(
        int(i) for i in rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    )
    return tuple(pool[i] for i in indices)


def _person(rng: np.random.Generator, geo: GeoPicker, spec: tuple[str, ...]) -> Principal:
    name, city, timezone, country, cloud, scope, region, aws_identity = spec
    email = f"{name}@{EMAIL_DOMAIN}"
    version = 6 if cloud == "gcp" and name in _IPV6_PEOPLE else 4
    person = Principal(
        key=email,
        kind="person",
        cloud=cloud,
        scope=scope,
        region=region,
        timezone=timezone,
        holidays_country=country,
        city=city,
        ips=geo.pick(city, 2, version=version),
        user_agent=_USER_AGENTS[cloud][0],
        secrets=_pick_secrets(rng, _scope_secrets(cloud, scope), 4),
    )
    if cloud == "aws":
        account = AWS_ACCOUNTS[scope]
        person.aws_identity = aws_identity
        if aws_identity == "IAMUser":
            user = name.split(".")[0][0] + name.split(".")[1]
            person.aws_name = user
            person.key = user
            person.aliases = [f"arn:aws:iam::{account}:user/{user}"]
            person.aws_principal_id = _upper_id(rng, "AIDA", 17)
            person.aws_access_key = _upper_id(rng, "AKIA", 16)
        else:
            role = f"AWSReservedSSO_Developer_{_hex(rng, 16)}"
            person.aws_name = role
            person.aws_session = email
            person.aws_principal_id = _upper_id(rng, "AROA", 17)
            person.aws_access_key = _upper_id(rng, "ASIA", 16)
            person.aliases = [f"arn:aws:sts::{account}:assumed-role/{role}/{email}"]
    elif cloud == "azure":
        person.azure_oid = _guid(rng)
        # Azure CLI's public client id; people read secrets with `az keyvault secret show`.
        person.azure_appid = "04b07795-8ddb-461a-bbee-02f9e1bf7b46"
        person.azure_claim_style = "uri" if rng.random() < 0.5 else "short"
        person.aliases = [person.azure_oid]
    return person


def _aws_role(
    rng: np.random.Generator,
    role: str,
    session: str,
    scope: str,
    region: str,
    *,
    kind: str = "workload",
    interval: int = 0,
    operation: str = "read",
    reads: int = 1,
) -> Principal:
    account = AWS_ACCOUNTS[scope]
    return Principal(
        key=f"arn:aws:iam::{account}:role/{role}",
        kind=kind,
        cloud="aws",
        scope=scope,
        region=region,
        ips=[
            f"10.{20 + int(rng.integers(0, 10))}.{int(rng.integers(0, 256))}.{int(rng.integers(4, 250))}"
        ],
        user_agent=_USER_AGENTS["aws"][1],
        secrets=_pick_secrets(rng, _scope_secrets("aws", scope), 3),
        aliases=[f"arn:aws:sts::{account}:assumed-role/{role}/{session}"],
        aws_identity="AssumedRole",
        aws_name=role,
        aws_session=session,
        aws_principal_id=_upper_id(rng, "AROA", 17),
        aws_access_key=_upper_id(rng, "ASIA", 16),
        interval_hours=interval,
        minute=int(rng.integers(0, 60)),
        reads_per_run=reads,
        operation=operation,
    )


def _gcp_account(
    rng: np.random.Generator,
    email: str,
    scope: str,
    caller: str,
    *,
    kind: str = "workload",
    interval: int = 0,
    reads: int = 1,
) -> Principal:
    return Principal(
        key=email,
        kind=kind,
        cloud="gcp",
        scope=scope,
        ips=[caller],
        user_agent=_USER_AGENTS["gcp"][1 + int(rng.integers(0, 2))],
        secrets=_pick_secrets(rng, _scope_secrets("gcp", scope), 3),
        interval_hours=interval,
        minute=int(rng.integers(0, 60)),
        reads_per_run=reads,
    )


def _azure_app(
    rng: np.random.Generator,
    name: str,
    vault: str,
    *,
    managed: bool,
    kind: str = "workload",
    interval: int = 0,
    reads: int = 1,
) -> Principal:
    appid = _guid(rng)
    oid = _guid(rng)
    mirid = ""
    if managed:
        mirid = (
            f"/subscriptions/{AZURE_SUBSCRIPTION.lower()}/resourcegroups/"
            f"{AZURE_VAULTS[vault].resource_group.lower()}/providers/"
            f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
    return Principal(
        key=name if managed else appid,
        kind=kind,
        cloud="azure",
        scope=vault,
        ips=[f"10.1.{int(rng.integers(0, 16))}.{int(rng.integers(4, 250))}"],
        user_agent=_USER_AGENTS["azure"][1],
        secrets=_pick_secrets(rng, _scope_secrets("azure", vault), 3),
        aliases=[appid, oid, mirid] if managed else [oid, name],
        azure_oid=oid,
        azure_appid=appid,
        azure_mirid=mirid,
        interval_hours=interval,
        minute=int(rng.integers(0, 60)),
        reads_per_run=reads,
    )


def build_population(rng: np.random.Generator, geo: GeoPicker) -> dict[str, Principal]:
    """Build every simulated principal, keyed by a short handle used in scenarios."""
    population: dict[str, Principal] = {}
    for spec in _PEOPLE:
        population[spec[0]] = _person(rng, geo, spec)

    population["aws-ci-deploy"] = _aws_role(
        rng, "ci-deploy", "GitHubActions", "prod", "us-east-1", kind="ci"
    )
    population["aws-payments-api"] = _aws_role(
        rng, "payments-api-task", _hex(rng, 32), "prod", "us-east-1", interval=1, reads=2
    )
    population["aws-orders-worker"] = _aws_role(
        rng, "orders-worker-instance", "i-0" + _hex(rng, 16), "prod", "eu-central-1", interval=2
    )
    population["aws-rotation"] = _aws_role(
        rng, "secret-rotation-lambda", "rotation-fn", "prod", "us-east-1", interval=6
    )
    population["aws-report-exporter"] = _aws_role(
        rng,
        "report-exporter",
        "exporter",
        "data",
        "us-east-1",
        interval=3,
        operation="batch_read",
        reads=3,
    )
    population["aws-config-loader"] = _aws_role(
        rng,
        "config-loader",
        "config-loader",
        "data",
        "eu-central-1",
        interval=2,
        operation="params_read",
        reads=2,
    )
    population["aws-backup-agent"] = _aws_role(
        rng, "backup-agent", "backup", "data", "us-east-1", interval=6
    )

    population["gcp-terraform"] = _gcp_account(
        rng, "terraform@kt-prod-3817.iam.gserviceaccount.com", "kt-prod-3817", "private", kind="ci"
    )
    population["gcp-cloudbuild"] = _gcp_account(
        rng,
        "218840067415@cloudbuild.gserviceaccount.com",
        "kt-data-5522",
        "private",
        kind="ci",
    )
    population["gcp-checkout"] = _gcp_account(
        rng,
        "checkout@kt-prod-3817.iam.gserviceaccount.com",
        "kt-prod-3817",
        "gce-internal-ip",
        interval=1,
    )
    population["gcp-compute-default"] = _gcp_account(
        rng,
        "604218573321-compute@developer.gserviceaccount.com",
        "kt-prod-3817",
        "10.128.0.17",
        interval=1,
    )
    population["gcp-ingest"] = _gcp_account(
        rng,
        "ingest-pipeline@kt-data-5522.iam.gserviceaccount.com",
        "kt-data-5522",
        "gce-internal-ip",
        interval=2,
        reads=2,
    )
    population["gcp-reporting-etl"] = _gcp_account(
        rng,
        "reporting-etl@kt-data-5522.iam.gserviceaccount.com",
        "kt-data-5522",
        "gce-internal-ip",
        interval=3,
    )
    population["gcp-invoice-sync"] = _gcp_account(
        rng,
        "invoice-sync@kt-data-5522.iam.gserviceaccount.com",
        "kt-data-5522",
        "10.132.0.42",
        interval=1,
    )

    population["az-orders-api"] = _azure_app(
        rng, "mi-orders-api", "KV-PAYMENTS-PROD", managed=True, interval=1
    )
    population["az-batch-jobs"] = _azure_app(
        rng, "mi-batch-jobs", "KV-PLATFORM-SHARED", managed=True, interval=2, reads=2
    )
    population["az-svc-reporting"] = _azure_app(
        rng, "svc-reporting", "KV-PLATFORM-SHARED", managed=False, interval=3
    )
    population["az-web-frontend"] = _azure_app(
        rng, "mi-web-frontend", "KV-PLATFORM-SHARED", managed=True, interval=1
    )
    population["az-billing-export"] = _azure_app(
        rng, "billing-export", "KV-PAYMENTS-PROD", managed=False, interval=4
    )
    population["az-github-deploy"] = _azure_app(
        rng, "github-deploy", "KV-PAYMENTS-PROD", managed=False, kind="ci"
    )
    population["az-report-archiver"] = _azure_app(
        rng, "mi-report-archiver", "KV-LEGACY-REPORTS", managed=True
    )
    return population


def build_person(
    rng: np.random.Generator,
    geo: GeoPicker,
    name: str,
    city: str,
    timezone: str,
    country: str,
    cloud: str,
    scope: str,
    *,
    region: str = "",
    aws_identity: str = "",
) -> Principal:
    """Build one person the way :func:`build_population` does, for principals added later."""
    return _person(rng, geo, (name, city, timezone, country, cloud, scope, region, aws_identity))
