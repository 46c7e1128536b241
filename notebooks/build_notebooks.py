"""Write the analyst notebooks (``notebooks/*.ipynb``) from the cell sources in this file.

The notebooks are committed without outputs. Edit the cells here and run::

    .venv/bin/python notebooks/build_notebooks.py

Each notebook finds the repository from its working folder, keeps its state in a new temporary
folder and works on ``sample_logs/``, so it runs the same on any clone. The cell tagged
``readme-figure`` draws the picture that ``notebooks/render_figures.py`` saves for the README.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

FOLDER = Path(__file__).resolve().parent
FIGURE_TAG = "readme-figure"


def setup(third_party: str, ours: str) -> str:
    """Return the first code cell of a notebook, with its own import lines."""
    return f"""\
import tempfile
from pathlib import Path

{third_party}

{ours}

# The repository root is the first folder upwards that contains sample_logs/.
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "sample_logs").is_dir())
# This notebook's own state and outputs, so it never touches a real .keytrail folder.
WORK = Path(tempfile.mkdtemp(prefix="keytrail-notebook-"))
config = pipeline.load_config(base_dir=ROOT, state_dir=WORK / "state", output_dir=WORK / "out")

plt.rcParams.update({{"figure.dpi": 110, "figure.figsize": (10, 4.5), "axes.grid": True}})
pd.set_option("display.max_colwidth", 90)
"""


RUN_ONCE = """\
# One keytrail run over sample_logs: history, state and findings land in WORK.
summary = pipeline.run_once(config, console=Console(quiet=True))
print(f"{summary.events_new} events stored, {summary.findings_new} findings, status {summary.status}")
"""


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip())


def code(text: str, *, figure: bool = False) -> nbformat.NotebookNode:
    cell = new_code_cell(text.strip())
    if figure:
        cell.metadata["tags"] = [FIGURE_TAG]
    return cell


START_HERE = [
    md("""
# Start here: the events of 30 days in three clouds

`sample_logs/` holds 30 days of generated audit logs from AWS CloudTrail, Google Cloud Audit
Logs and Azure Key Vault, in each provider's own file layout. This notebook reads them into one
pandas frame, shows the schema, who reads which secrets, and the volume per cloud over time.
"""),
    code(setup("import matplotlib.pyplot as plt\nimport pandas as pd", "import pipeline")),
    md("""
## Read the logs

`pipeline.read_logs` takes files, folders or the name of a configured source. It returns one
row per secret touched. Records that cannot be read are quarantined, never dropped silently:
`return_quarantine=True` returns them as a second frame.
"""),
    code("""
events, quarantined = pipeline.read_logs("sample_logs", config=config, return_quarantine=True)
print(f"{len(events):,} events from {events['origin'].str.split(' ').str[0].nunique():,} files")
quarantined[["origin", "reason", "detail"]]
"""),
    md("""
## The schema

Every cloud maps to the same columns. `principal` is the identity baselines key on (a person's
email where the log names one), `resource` the canonical secret name, and `source_kind` tells
whether `source_ip` is a public, private or cloud-internal address. The `geo_*` columns come
from the GeoIP database.
"""),
    code("""
events.dtypes.to_frame("dtype").T
"""),
    code("""
events.sample(3, random_state=1).T
"""),
    code("""
events.groupby(["cloud", "action"]).size().unstack(fill_value=0)
"""),
    md("""
## Who reads what

Successful reads per person and secret over the 30 days, for the 25 secrets people read most.
Each person reads a few secrets of their team; a person who suddenly reads many secrets shows
up as a wide row. Workloads are left out here because each reads its own few secrets every hour.
"""),
    code(
        '''
import re

people = events[
    events["principal_type"].isin(["user", "federated", "root"])
    & (events["action"] == "read")
    & (events["outcome"] == "success")
]
top_secrets = people["resource"].value_counts().head(25).index
matrix = (
    people[people["resource"].isin(top_secrets)]
    .pivot_table(index="principal", columns="resource", values="event_uid", aggfunc="count")
    .reindex(columns=top_secrets)
    .sort_index()
)

def secret_label(resource: str) -> str:
    """Shorten an ARN, path or vault URL to its last two meaningful parts."""
    noise = {"https:", "projects", "secrets", "parameter", ""}
    parts = [p.removesuffix(".vault.azure.net") for p in re.split(r"[/]", resource) if p not in noise]
    return "/".join(parts[-2:])

fig, ax = plt.subplots(figsize=(11, 7))
image = ax.imshow(matrix.to_numpy(dtype=float), cmap="viridis", aspect="auto")
ax.set_xticks(range(len(matrix.columns)), [secret_label(c) for c in matrix.columns],
              rotation=60, ha="right", fontsize=8)
ax.set_yticks(range(len(matrix.index)), matrix.index, fontsize=8)
ax.grid(False)
ax.set_title("Successful reads per person and secret, 30 days (white: none)")
fig.colorbar(image, ax=ax, label="reads")
fig.tight_layout()
''',
        figure=True,
    ),
    md("""
## Volume over time per cloud

Events per day and cloud. Weekends are quieter because people read secrets on working days;
workloads read every day.
"""),
    code("""
daily = events.groupby([events["time"].dt.floor("D"), "cloud"]).size().unstack(fill_value=0)
ax = daily.plot(kind="bar", stacked=True, width=0.85, figsize=(11, 4))
ax.set_xticks(range(len(daily)), [f"{day:%a %d}" for day in daily.index], rotation=90, fontsize=8)
ax.set_xlabel("day (UTC)")
ax.set_ylabel("events")
ax.set_title("Events per day and cloud")
plt.tight_layout()
"""),
    md("""
Next: `02_triage_a_finding.ipynb` runs the detectors and takes one finding apart,
`03_tune_detectors.ipynb` backtests parameters, and `04_hunt.ipynb` queries the history with SQL.
"""),
]


TRIAGE = [
    md("""
# Triage a finding

Run keytrail once over `sample_logs/`, pick a finding, and look at it the way an analyst on
call would: what happened, when, against which baseline, from which addresses, and who else
reads the same secrets.
"""),
    code(
        setup(
            "import matplotlib.pyplot as plt\nimport numpy as np\nimport pandas as pd\nfrom rich.console import Console",
            "import pipeline",
        )
    ),
    code(RUN_ONCE),
    code("""
found = pipeline.findings(config)
found[["severity", "detector", "principal", "first_seen", "title"]]
"""),
    md("""
## Pick a finding

`pipeline.explain` returns the events behind the finding, the evidence and the baseline the
detector reported, and the principal's earlier events.
"""),
    code("""
# An off-hours finding shows the hour-of-week picture best; any other finding works too.
preferred = found[found["detector"] == "keytrail.off_hours"]
finding = (preferred if len(preferred) else found).iloc[0]
explained = pipeline.explain(finding, config)
explained
"""),
    md("""
## Timeline

The principal's reads in the days around the finding: grey are earlier reads, red the reads
the finding names.
"""),
    code("""
past = pipeline.history(config)
start = finding["first_seen"] - pd.Timedelta(days=4)
end = finding["last_seen"] + pd.Timedelta(days=2)
around = past.events(since=start, until=end, where="principal = $who", params={"who": finding["principal"]})
flagged = around["event_uid"].isin(finding["event_uids"])
secrets = sorted(around["resource"].unique())
rows = around["resource"].map({name: i for i, name in enumerate(secrets)})

fig, ax = plt.subplots(figsize=(11, 3.5))
ax.scatter(around["time"][~flagged], rows[~flagged], color="0.6", s=18, label="other reads")
ax.scatter(around["time"][flagged], rows[flagged], color="crimson", s=40, label="this finding")
ax.set_yticks(range(len(secrets)), [name.split("/")[-1] for name in secrets], fontsize=8)
ax.set_title(f"{finding['principal']}: reads per secret")
ax.legend(loc="upper left")
fig.tight_layout()
"""),
    md("""
## Hour of week against the baseline

The principal's reads in the detector's look-back, by weekday and hour in the principal's own
time zone (from the finding's evidence), with the finding's reads marked. A habit looks like a
block; the finding is a dot outside it.
"""),
    code(
        """
zone = explained.evidence.get("timezone", "UTC")
local = explained.baseline_events["time"].dt.tz_convert(zone)
grid = np.zeros((7, 24))
np.add.at(grid, (local.dt.dayofweek.to_numpy(), local.dt.hour.to_numpy()), 1)
marked = explained.events["time"].dt.tz_convert(zone)

fig, ax = plt.subplots(figsize=(11, 3.8))
image = ax.imshow(grid, cmap="Blues", aspect="auto")
ax.scatter(marked.dt.hour + marked.dt.minute / 60 - 0.5, marked.dt.dayofweek, color="crimson",
           s=60, marker="X", label="this finding")
ax.set_yticks(range(7), ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"])
# Cell h spans h - 0.5 to h + 0.5, so each hour's label sits on the left edge of its cell.
ax.set_xticks(np.arange(0, 24, 2) - 0.5, [f"{hour:02d}:00" for hour in range(0, 24, 2)])
ax.grid(False)
ax.set_title(f"{finding['principal']}: reads by hour of week ({zone}), "
             f"{explained.lookback.days} days before the finding")
fig.colorbar(image, ax=ax, label="reads in baseline")
ax.legend(loc="upper right")
fig.tight_layout()
""",
        figure=True,
    ),
    md("""
## Where the reads came from

Source addresses of the finding and of the baseline, with country, city and autonomous system.
An address that appears only in the finding deserves a look.
"""),
    code("""
columns = ["source_ip", "source_kind", "geo_country", "geo_city", "asn", "as_org"]
addresses = pd.concat(
    [explained.baseline_events.assign(part="baseline"), explained.events.assign(part="finding")]
)
table = addresses.groupby(columns, dropna=False)["part"].value_counts().unstack(fill_value=0)
table.sort_values("finding", ascending=False) if "finding" in table else table
"""),
    md("""
## Who else reads these secrets

Every principal that read one of the finding's secrets in the history. A secret that only this
principal reads is a different story from a shared one.
"""),
    code('''
past.sql(
    """
    SELECT resource, principal, principal_type, count(*) AS reads,
           min(time) AS first_read, max(time) AS last_read
    FROM events
    WHERE list_contains($secrets, resource) AND action = 'read' AND outcome = 'success'
    GROUP BY ALL
    ORDER BY resource, reads DESC
    """,
    params={"secrets": list(finding["resources"])},
)
'''),
    md("""
## Hand it over

`pipeline.export` writes CSV, Excel or Parquet; text that a spreadsheet would run as a formula
is neutralized.
"""),
    code("""
path = pipeline.export(explained.events, WORK / "finding-events.xlsx")
print(path.name, path.stat().st_size, "bytes")
"""),
]


TUNE = [
    md("""
# Tune a detector

Backtest `keytrail.failure_burst` over the 30 days of `sample_logs/` with different
parameters: how many findings each setting gives, how they spread over the days, which
principals dominate, and what an allow-list entry would remove. `detectors.run` runs any
detector on any events frame, with the same parameter checks as `config.yaml`.
"""),
    code(
        setup(
            "import matplotlib.pyplot as plt\nimport pandas as pd",
            "import detectors\nimport pipeline",
        )
    ),
    code("""
events = pipeline.read_logs("sample_logs", config=config, progress=False)
current = detectors.run(events)
current.groupby("detector").size().rename("findings").to_frame()
"""),
    md("""
## A parameter grid

`min_failures` failures within `window_minutes` make a burst. The shipped setting is 10 in 10
minutes. Lower values find slower or smaller bursts, at the cost of more findings.
"""),
    code("""
grid = []
for window in (5, 10, 30, 120):
    for minimum in (3, 5, 10, 15):
        found = detectors.run(
            events,
            detectors=["keytrail.failure_burst"],
            params={"keytrail.failure_burst": {"min_failures": minimum, "window_minutes": window}},
        )
        grid.append({"window_minutes": window, "min_failures": minimum, "findings": len(found)})
grid = pd.DataFrame(grid)
table = grid.pivot(index="min_failures", columns="window_minutes", values="findings")
table
"""),
    code(
        """
fig, ax = plt.subplots(figsize=(9, 4.5))
# Settings often give equal counts, and then one line hides another. So each window gets its
# own line style and marker, and is drawn a little to the side.
styles = zip(table.columns, ["-", "--", "-.", ":"], ["o", "s", "^", "D"], strict=True)
for position, (window, style, marker) in enumerate(styles):
    shift = (position - (len(table.columns) - 1) / 2) * 0.12
    ax.plot(table.index + shift, table[window], linestyle=style, marker=marker, label=str(window))
ax.axvline(10, color="0.5", linestyle="--", label="shipped min_failures")
ax.set_xlabel("min_failures")
ax.set_ylabel("findings in 30 days")
ax.set_title("keytrail.failure_burst: findings per setting (lines: window_minutes)")
ax.legend(title="window_minutes")
plt.tight_layout()
""",
        figure=True,
    ),
    md("""
## Alerts per day at a loose setting

With 3 failures in 2 hours, which days would page someone?
"""),
    code("""
loose = detectors.run(
    events,
    detectors=["keytrail.failure_burst"],
    params={"keytrail.failure_burst": {"min_failures": 3, "window_minutes": 120}},
)
per_day = loose.groupby(loose["first_seen"].dt.floor("D")).size()
per_day = per_day.reindex(pd.date_range("2026-10-01", "2026-10-30", freq="D", tz="UTC"), fill_value=0)
ax = per_day.plot(kind="bar", color="tab:orange", figsize=(11, 3.5))
ax.set_xticks(range(len(per_day)), [f"{day:%a %d}" for day in per_day.index], rotation=90, fontsize=8)
ax.set_ylabel("findings")
ax.set_title("Findings per day with min_failures=3, window_minutes=120")
plt.tight_layout()
"""),
    md("""
## Which principals dominate

A failure burst keyed by address has no single principal; those show as the address.
"""),
    code("""
who = loose["principal"].fillna("(address) " + loose["source_ips"].str[0])
who.value_counts().to_frame("findings")
"""),
    md("""
## What an allow-list entry would remove

An allow-list entry removes expected findings before alerting, with a reason and an owner. Here
is the effect of allowing the principal with the most findings, before adding it to
`alerting.allow_list` in `config.yaml`.
"""),
    code("""
from datetime import UTC, datetime

from pipeline.alerting.routing import AllowEntry, apply_allow_list

top = loose["principal"].value_counts().index[0]
entry = AllowEntry(
    detectors=["keytrail.failure_burst"],
    principals=[top],
    reason="known misconfigured job, ticket SEC-123",
    owner="data-platform@example.com",
)
kept, removed = apply_allow_list(loose, [entry], now=datetime.now(UTC))
print(f"allowing {top} removes {len(removed)} of {len(loose)} findings")
removed[["principal", "first_seen", "event_count", "allowed_by"]]
"""),
]


HUNT = [
    md("""
# Hunt in the history

Every run appends its events to a Parquet dataset partitioned by date and cloud.
`pipeline.history(config).sql(...)` queries it with DuckDB: the view `events` has every schema
column plus `date`, and `rollup` has hourly counts. Queries are read-only, and times are UTC.
"""),
    code(
        setup(
            "import matplotlib.pyplot as plt\nimport pandas as pd\nfrom rich.console import Console",
            "import pipeline",
        )
    ),
    code(RUN_ONCE),
    code("""
past = pipeline.history(config)
past.sql("SELECT cloud, count(*) AS events, min(time) AS first, max(time) AS last FROM events GROUP BY ALL ORDER BY cloud")
"""),
    md("""
## Rare operations

Operations seen only a handful of times in 30 days: deletes, policy changes, restores. Each is
worth knowing about even when it is legitimate.
"""),
    code('''
rare = past.sql(
    """
    SELECT cloud, operation, action, count(*) AS events, count(DISTINCT principal) AS principals
    FROM events
    GROUP BY ALL
    ORDER BY events, operation
    LIMIT 15
    """
)
ax = rare.plot.barh(x="operation", y="events", legend=False, figsize=(9, 5), color="tab:purple")
ax.set_xscale("log")
ax.invert_yaxis()
ax.set_xlabel("events in 30 days (log scale)")
ax.set_title("The 15 rarest operations")
plt.tight_layout()
rare
'''),
    md("""
## First-seen networks

For each principal, the networks it reads from for the first time after its first week in the
history. The network is the autonomous system when the GeoIP setup has an ASN database
(`enrich.geoip.asn_db`), else the country and city.
"""),
    code('''
has_asn = past.sql("SELECT count(asn) AS n FROM events")["n"].iloc[0] > 0
network = "CAST(asn AS VARCHAR) || ' ' || coalesce(as_org, '')" if has_asn else "geo_country || ' ' || geo_city"
first_seen = past.sql(
    f"""
    WITH seen AS (
        SELECT principal, {network} AS network, min(time) AS first_time, count(*) AS events
        FROM events WHERE source_kind = 'public' AND geo_country IS NOT NULL
        GROUP BY ALL
    ), starts AS (
        SELECT principal, min(time) AS principal_start FROM events GROUP BY principal
    )
    SELECT principal, network, first_time, events
    FROM seen JOIN starts USING (principal)
    WHERE first_time > principal_start + INTERVAL 7 DAY
    ORDER BY first_time
    """
)
first_seen
'''),
    code("""
fig, ax = plt.subplots(figsize=(10, 3))
ax.scatter(first_seen["first_time"], first_seen["principal"], s=40 + 4 * first_seen["events"], color="tab:red")
for row in first_seen.itertuples():
    ax.annotate(row.network, (row.first_time, row.principal), xytext=(6, 4), textcoords="offset points", fontsize=8)
ax.set_title("Networks a principal used for the first time (after its first week)")
fig.tight_layout()
"""),
    md("""
## Denied, then allowed

A read that was denied and then succeeded for the same principal and secret within 30 minutes:
someone found the permission they were missing, or got it granted. Misconfigured jobs also
look like this, so the count of denials matters.
"""),
    code('''
retried = past.sql(
    """
    SELECT d.principal, d.resource, d.time AS denied_at, min(s.time) AS allowed_at
    FROM events AS d
    JOIN events AS s
      ON s.principal = d.principal AND s.resource = d.resource AND s.outcome = 'success'
     AND s.time > d.time AND s.time <= d.time + INTERVAL 30 MINUTE
    WHERE d.outcome = 'failure' AND d.failure_reason = 'denied'
    GROUP BY ALL
    ORDER BY denied_at
    """
)
retried.groupby("principal").agg(
    denials=("denied_at", "size"), secrets=("resource", "nunique"),
    first=("denied_at", "min"), last=("denied_at", "max"),
).sort_values("denials", ascending=False)
'''),
    code(
        """
principals = list(retried["principal"].value_counts().index)
rows = retried["principal"].map({name: i for i, name in enumerate(principals)})
fig, ax = plt.subplots(figsize=(11, 3.8))
ax.scatter(retried["denied_at"], rows, marker="x", color="crimson", s=50, label="denied")
ax.scatter(retried["allowed_at"], rows + 0.15, marker="o", facecolors="none", edgecolors="green",
           s=50, label="then allowed")
ax.set_yticks(range(len(principals)), [p if len(p) < 40 else "…" + p[-39:] for p in principals], fontsize=8)
ax.set_title("Denied reads followed by a successful read of the same secret within 30 minutes")
ax.legend(loc="lower right")
fig.tight_layout()
""",
        figure=True,
    ),
]


NOTEBOOKS = {
    "01_start_here.ipynb": START_HERE,
    "02_triage_a_finding.ipynb": TRIAGE,
    "03_tune_detectors.ipynb": TUNE,
    "04_hunt.ipynb": HUNT,
}


def build(name: str, cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    notebook.metadata["language_info"] = {"name": "python"}
    for index, cell in enumerate(notebook.cells):
        # Stable ids keep the committed files unchanged when nothing was edited.
        cell["id"] = f"{Path(name).stem[:2]}-{index:02d}"
    nbformat.validate(notebook)
    return notebook


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), FOLDER / name)
        print(f"wrote {FOLDER / name}")


if __name__ == "__main__":
    main()
