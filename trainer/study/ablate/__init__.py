"""`ensemble-train ablate`: a two-level factorial over the population's switches, measured by balanced log-PPL.

The switches (:data:`trainer.config.ABLATION_FACTORS`, reference level first):

=========== ================= ============== =====================================================
factor      reference         test           what changes
=========== ================= ============== =====================================================
router      softmax           sigmoid_floor  the mixture router's variant (baseline vs rewrite)
scope       global            domain_loo     fitness of the per-problem terms (evaluation scope)
lifecycle   off               on             death, inheritance, SVD mutation, reallocation
evolution   off               on             selection/crossover/mutation (off: gradient phase only)
init        random            pre_aligned    starting adapters: PEFT's initialisation vs warmed-up
inheritance blend             none           the alpha = 0 counterfactual: the lifecycle without inheritance
alignment   aligned           misaligned     members' weights rotated among the focus families
=========== ================= ============== =====================================================

The base-perturbation probe (``base_perturbation``) is not a switch: every cell is also scored on
a copy of the base with seeded Gaussian noise in its weight matrices, under the same router and
adapters, and the report gives every effect on that base beside the plain one: do the adapters'
gains hold only in the exact base they were trained in?

A **cell** is one combination of levels; it runs once per seed with the same budget
(``generations`` evolve generations of ``evolve.train_steps`` gradient steps per member):

1. **stage**: the starting population (pre-aligned, or the same members re-initialised as PEFT does)
   is evolved with the cell's scope/lifecycle/evolution levels. Cells that differ only in the
   router share the stage (it is the same run), so the router comparison is paired on identical
   adapters;
2. **router**: trained on ``router_per_domain`` sandbox prompts per domain, on per-prompt member
   quality (a softmax over members of their reference-chain log-likelihoods) or end to end
   through the mixture (``router_objective``);
3. **evaluation**: each held-out prompt's reference chain is scored under the prompt's mixture of
   the members (:class:`trainer.models.mixture_lm.MixtureLM`, the server's ``mixture`` weights); the
   cell's value is the balanced log-PPL (mean over domains of log-PPL). The uniform mixture,
   the best single member and the bare base are scored too, for reference (and all of it again on
   the perturbed base when the probe is on).

Each cell's result is one JSON file written atomically, so an interrupted ablation resumes where it
stopped and finished cells are never recomputed. A cell that raises is recorded as failed (its
error kept) and the rest go on; the report lists the missing cells, and running the same command
again retries them. The report: per-factor effects (mean, SE, paired t-test p), per-domain effects,
the requested interactions, a cell table, and plots (``effects.png``, ``domains.png``).

The modules: :mod:`.design` (the cells and their names), :mod:`.folder` (where results live, one
config per folder), :mod:`.stages` (the evolve run of a stage), :mod:`.cells` (one cell for real),
:mod:`.run` (the command's loop: resume, failures, Ctrl-C), :mod:`.summary` (effects and the
report files), :mod:`.markdown` and :mod:`.plots` (how the report reads).
"""

from trainer.study.ablate.cells import CellRunner
from trainer.study.ablate.design import DEFAULT_LEVELS, AblationError, cell_id, design_cells, plan
from trainer.study.ablate.markdown import format_report
from trainer.study.ablate.run import run_ablation
from trainer.study.ablate.summary import report

__all__ = [
    "DEFAULT_LEVELS",
    "AblationError",
    "CellRunner",
    "cell_id",
    "design_cells",
    "format_report",
    "plan",
    "report",
    "run_ablation",
]
