"""Sub-network search: every candidate fits the budget; the search finds the best score."""

import pytest
from dynprune.eval.baselines.search import SubnetSearch
from dynprune.eval.baselines.structured import ln_scores
from dynprune.eval.structure import static_flops_model

from tests.helpers import tiny_model


def _search(budget, seed=0, multiple=1):
    model = tiny_model("bert", layers=4)
    fm = static_flops_model(model)
    hs, ns = ln_scores(model, head_dim=16)
    return SubnetSearch(fm, budget, 24, hs, ns, min_ratio=0.05, multiple=multiple, seed=seed), fm


@pytest.mark.parametrize("budget", [0.2, 0.25, 0.5])
def test_every_candidate_respects_the_budget(budget):
    search, fm = _search(budget, multiple=4)
    ratios = []

    def score(structure):
        ratio = structure.flops_ratio(fm, 24)
        ratios.append(ratio)
        return -ratio  # prefer candidates that spend the most

    result = search.run(score, n_random=20, population=4, generations=2, children=8)
    assert max(ratios) <= budget + 1e-9
    assert min(ratios) > budget - 0.1
    assert result.best.structure.flops_ratio(fm, 24) == pytest.approx(max(ratios))
    assert all(n % 4 == 0 for n in result.best.structure.neuron_counts())
    assert len(result.history) == len(ratios)  # duplicates are not re-scored


def test_search_prefers_what_the_score_prefers_and_evolution_improves():
    search, _ = _search(0.3, seed=3)

    def score(structure):  # reward keeping layer 0's FFN wide and layer 3's narrow
        n = structure.neuron_counts()
        return -(n[0] - n[3])

    result = search.run(score, n_random=6, population=3, generations=3, children=8)
    random_best = min(c.score for c in result.history[:6])
    assert result.best.score <= random_best
    n = result.best.structure.neuron_counts()
    assert n[0] > n[3]


def test_search_is_seeded():
    a, _ = _search(0.4, seed=7)
    b, _ = _search(0.4, seed=7)
    score = lambda s: sum(s.head_counts())  # noqa: E731
    ra = a.run(score, n_random=5, generations=1, children=4)
    rb = b.run(score, n_random=5, generations=1, children=4)
    assert ra.best.structure == rb.best.structure
