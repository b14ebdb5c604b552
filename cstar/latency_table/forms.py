"""The deploy forms of a Tucker-2 layer and the one tie rule that picks among them (latency model, allocator,
export all use `fastest_form`)."""

from __future__ import annotations

DEPLOY_FORMS = ("dense", "three-conv", "merge-input", "merge-output")
FACTORIZED_FORMS = DEPLOY_FORMS[1:]
# One tie rule for every place that picks a deploy form (the latency model, the allocator's cost model,
# export): on an exact tie the unmerged three-conv form first, the fully merged dense conv last.
FORM_TIE_ORDER = ("three-conv", "merge-input", "merge-output", "dense")


def fastest_form(costs: dict[str, float]) -> str:
    """The cheapest deploy form of `costs` (form -> cost); exact ties follow FORM_TIE_ORDER."""
    return min(costs, key=lambda form: (costs[form], FORM_TIE_ORDER.index(form)))
# nodes a factorized form runs beyond the dense layer's one (a factorized Linear: two Gemms)
EXTRA_NODES: dict[str, int] = {"three-conv": 2, "merge-input": 1, "merge-output": 1, "linear": 1}
