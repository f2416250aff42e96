"""Doctor: every way a device can drift from what ``run`` needs, as named checks.

``run_doctor(settings)`` returns a :class:`Report` with one :class:`CheckResult`
per stable id of docs/api.md (ok / warn / fail / skip, a summary and a fix). It
never prints and never exits; ``edgebundle doctor`` renders it.
"""

from edgebundle.doctor.report import CHECK_IDS, CheckResult, Report, Status
from edgebundle.doctor.runner import failed_wasmedge_checks, run_doctor, wasmedge_results

__all__ = ["CHECK_IDS", "CheckResult", "Report", "Status", "failed_wasmedge_checks",
           "run_doctor", "wasmedge_results"]
