"""`ensemble-train report`: plots and one self-contained HTML page from a population's history.

Reads ``<population>/history.jsonl`` (one record per generation, see
:func:`ensemble_serve.shared.population.append_history`) and ``population.json`` and
writes, into ``<population>/report`` by default:

* ``fitness.png``    best / mean / min fitness per generation;
* ``accuracy.png``   held-out accuracy per generation (best member, mean member, ensemble vote, oracle);
* ``diversity.png``  each diversity measure per generation;
* ``domains.png``    per-member per-domain held-out accuracy of the last evaluated generation;
* ``lineage.png``    the family tree (x = generation, one node per member per generation);
* ``votes.png``      histogram of the ensemble vote agreement (only when recorded);
* ``phases.png``     wall seconds per phase of each generation, stacked (which phase to scale out);
* ``retention.png``  the forgetting guard: own-family validation before and after training, rollbacks in red;
* ``report.html``    all of the above embedded as data URIs, plus the tables.

Every history key except ``generation`` is optional: a plot without data is
skipped. A field of the wrong type raises :class:`ReportError` naming the
generation. matplotlib is imported only when plots are drawn, and only its
object-oriented API with the Agg canvas is used (no pyplot, no global backend
state), so importing this package stays cheap and it works without a display.

The modules, in the order the data flows: :mod:`.records` (the history, type-checked),
:mod:`.tables` (text and per-domain tables), :mod:`.figures` (the plots over generations and the
router's heat map), :mod:`.lineage` (the family tree), :mod:`.page` (the HTML page and the files).
"""

from trainer.study.report.lineage import Lineage, build_lineage
from trainer.study.report.page import PLOT_NAMES, write_report
from trainer.study.report.records import GenerationRecord, MemberRecord, ReportError, load_records, parse_records
from trainer.study.report.tables import summary_table

__all__ = [
    "PLOT_NAMES",
    "GenerationRecord",
    "Lineage",
    "MemberRecord",
    "ReportError",
    "build_lineage",
    "load_records",
    "parse_records",
    "summary_table",
    "write_report",
]
