"""What Slurm says about a sweep's jobs: state, nodes, restarts and the reason (``scontrol show job``).

The controller keeps ended jobs for ``MinJobAge`` seconds, so a job that lost a node and was not
requeued still shows as ``NODE_FAIL`` for a while; after that it is ``gone`` (MLflow still says which
of its runs are done, and ``submit`` sends the others again).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

_FIELD = re.compile(r"(\w+)=(\S*)")


@dataclass
class SlurmJob:
    job_id: str  # "123_4" for an array task, as jobs.json records it
    state: str
    nodes: str  # Slurm's host list, e.g. "nlabc[1-2]"; "-" while it holds none
    restarts: int
    reason: str

    def describe(self) -> str:
        """What happened to the job, in words (for ``sweep status``)."""
        parts = [self.state]
        if self.restarts:
            parts.append(f"requeued {self.restarts}x")
        if self.state == "NODE_FAIL":
            parts.append("a node failed and Slurm did not requeue it; `sweep submit` sends its unfinished runs again")
        elif self.reason not in ("None", ""):
            parts.append(f"reason {self.reason}")
        return ", ".join(parts)


def slurm_jobs() -> dict[str, SlurmJob]:
    """Every job the controller knows (queued, running, or ended less than MinJobAge ago), by job id."""
    if not shutil.which("scontrol"):
        return {}
    result = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return {}
    jobs = {}
    for line in result.stdout.splitlines():
        fields = dict(_FIELD.findall(line))
        if "JobId" not in fields:
            continue
        array, tasks = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
        ids = [f"{array}_{task}" for task in _task_ids(tasks)] if array and tasks else [fields["JobId"]]
        nodes = fields.get("NodeList", "(null)")
        for job_id in ids:
            jobs[job_id] = SlurmJob(job_id, fields.get("JobState", "?"), "-" if nodes in ("(null)", "") else nodes,
                                    int(fields.get("Restarts", "0") or 0), fields.get("Reason", ""))
    return jobs


def _task_ids(tasks: str) -> list[str]:
    """The indices of an array record: "4", or "0-3,7%2" for tasks still pending together."""
    ids = []
    for part in tasks.split("%")[0].split(","):
        first, _, last = part.partition("-")
        ids += [str(i) for i in range(int(first), int(last or first) + 1)] if first.isdigit() else [part]
    return ids
