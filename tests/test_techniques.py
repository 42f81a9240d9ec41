"""Each technique against values computed by hand from its published formula, plus its edge
cases."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from agent_forge.evomerge import blockwise, sparsify
from agent_forge.evomerge.combine import combine_task_vectors
from agent_forge.evomerge.exceptions import ConfigurationError, MergeError
from agent_forge.evomerge.recipe import Merge, Source, recipe_from_dict
from agent_forge.evomerge.techniques import (
    MERGE_TECHNIQUES,
    TensorLocation,
    apply_technique,
    canonical_params,
    della_keep_probabilities,
    drop_outliers_and_small,
    get_technique,
    keep_top_magnitude,
    resolve_value,
)


def run(name: str, stack: list, generator: torch.Generator | None = None, **params) -> torch.Tensor:
    """Apply a registered technique to a stack of tensors with canonical parameters."""
    tech = get_technique(name)
    tensors = torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in stack])
    return apply_technique(
        tech, tensors, canonical_params(tech, params, len(stack)), None, generator
    )


T1 = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
T2 = [[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]]


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> bool:
    return torch.allclose(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# -- registry --------------------------------------------------------------------------------------


def test_registry_lists_every_technique_with_its_traits():
    expected = {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "passthrough",
        "nearswap",
        "sce",
        "karcher",
        "multislerp",
        "nuslerp",
        "arcee_fusion",
        "ram",
        "ramplus_tl",
    }
    assert expected == set(MERGE_TECHNIQUES)
    assert get_technique("multislerp").base_optional and get_technique("nuslerp").base_optional
    assert not get_technique("multislerp").needs_base and get_technique("ram").needs_base
    assert get_technique("arcee_fusion").base_first and get_technique("slerp").base_first
    assert get_technique("nearswap").needs_base and get_technique("nearswap").max_inputs == 1
    assert get_technique("sce").needs_base and not get_technique("karcher").needs_base
    assert get_technique("ties").needs_base and not get_technique("ties").randomized
    assert get_technique("dare_ties").randomized and get_technique("della").randomized
    assert not get_technique("linear").needs_base
    assert get_technique("ties").param("density").per_input
    assert not get_technique("ties").param("lambda").per_input


def test_unknown_technique_names_closest_match():
    with pytest.raises(ConfigurationError, match="did you mean 'ties'"):
        get_technique("tiez")


def test_out_of_range_parameter_is_a_clear_error():
    with pytest.raises(
        ConfigurationError, match=r"ties: parameter 'density' = 1.5 is out of range \[0.0, 1.0\]"
    ):
        Merge("ties", [Source("a"), Source("b")], {"density": 1.5}, Source("base"))


def test_unknown_parameter_and_wrong_count_are_errors():
    with pytest.raises(
        ConfigurationError, match="unknown parameter 'densty'.*did you mean 'density'"
    ):
        Merge("ties", [Source("a"), Source("b")], {"densty": 0.5}, Source("base"))
    with pytest.raises(ConfigurationError, match="3 values for 2 input models"):
        Merge("linear", [Source("a"), Source("b")], {"weight": [1, 2, 3]})
    with pytest.raises(ConfigurationError, match="slerp takes exactly 2 input models, got 3"):
        Merge("slerp", [Source("a"), Source("b"), Source("c")], {"t": 0.5})


def test_missing_base_is_an_error():
    with pytest.raises(ConfigurationError, match="ties needs a base model"):
        Merge("ties", [Source("a"), Source("b")], {})


# -- linear ----------------------------------------------------------------------------------------


def test_linear_weighted_average_by_hand():
    # (1·T1 + 3·T2) / 4
    assert close(run("linear", [T1, T2], weight=[1.0, 3.0]), [[2.5, 2.0, 1.5], [1.0, 2.0, 3.0]])
    assert close(
        run("linear", [T1, T2], weight=[1.0, 3.0], normalize=False), [[10, 8, 6], [4, 8, 12]]
    )


NORMALISING = [
    name
    for name, tech in MERGE_TECHNIQUES.items()
    if {"weight", "normalize"} <= {p.name for p in tech.params}
]


@pytest.mark.parametrize("name", NORMALISING)
def test_a_normalised_merge_is_unchanged_when_every_weight_is_scaled(name):
    """What the refine stage relies on when it centres a normalised merge's weights
    (``search.centred_weights``): Σ wᵢxᵢ / Σ wᵢ, and TIES's election and agreeing divisor, are
    the same for c·w. Without normalize the scale shows."""
    gen = torch.Generator().manual_seed(7)
    stack = [torch.randn(6, 8, generator=gen) for _ in range(3)]
    weights = [0.9, 0.3, 0.6]

    def merged(scale: float, normalize: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        return run(name, stack, gen, weight=[w * scale for w in weights], normalize=normalize)

    assert torch.allclose(merged(1.0, True), merged(0.37, True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged(1.0, False), merged(0.37, False), rtol=1e-3, atol=1e-4)


def test_linear_zero_weight_sum_with_normalize_is_an_error():
    with pytest.raises(MergeError, match="sum to zero"):
        run("linear", [T1, T2], weight=[1.0, -1.0])


# -- slerp -----------------------------------------------------------------------------------------


def test_slerp_orthogonal_vectors_use_original_magnitudes():
    # angle π/2: coefficients sin(π/4)/sin(π/2) = 0.70711 for both ends
    c = math.sin(math.pi / 4)
    assert close(run("slerp", [[2.0, 0.0], [0.0, 1.0]], t=0.5), [2 * c, c])
    # t = 1/3: coefficients sin(π/3), sin(π/6)
    assert close(run("slerp", [[1.0, 0.0], [0.0, 1.0]], t=1 / 3), [math.sin(math.pi / 3), 0.5])


def test_slerp_endpoints_are_exact():
    a = torch.randn(4, 5)
    b = torch.randn(4, 5)
    assert torch.equal(run("slerp", [a, b], t=0.0), a)
    assert torch.equal(run("slerp", [a, b], t=1.0), b)


def test_slerp_collinear_and_antiparallel_fall_back_to_linear():
    a = [1.0, 2.0, 3.0]
    assert close(run("slerp", [a, [2.0, 4.0, 6.0]], t=0.25), [1.25, 2.5, 3.75])
    assert close(run("slerp", [a, [-1.0, -2.0, -3.0]], t=0.25), [0.5, 1.0, 1.5])  # (1-2t)·a
    assert close(run("slerp", [[0.0, 0.0, 0.0], a], t=0.5), [0.5, 1.0, 1.5])  # a zero norm


# -- task arithmetic and TIES ----------------------------------------------------------------------

D1 = [[3.0, -1.0, 0.5], [-2.0, 0.1, 4.0]]
D2 = [[-1.5, -2.0, 0.2], [1.0, 3.0, -0.5]]
D3 = [[2.0, 1.2, -3.0], [0.3, -0.2, 1.0]]


def test_task_arithmetic_by_hand():
    # λ·(1·D1 + 0.5·D2) with λ = 0.5
    expected = [
        [0.5 * (3 - 0.75), 0.5 * (-1 - 1), 0.5 * (0.5 + 0.1)],
        [0.5 * (-2 + 0.5), 0.5 * (0.1 + 1.5), 0.5 * (4 - 0.25)],
    ]
    assert close(run("task_arithmetic", [D1, D2], weight=[1.0, 0.5], **{"lambda": 0.5}), expected)


def test_ties_trim_elect_and_disjoint_mean_by_hand():
    # density 0.5 keeps the 3 largest |δ| of 6 per tensor:
    #   D1 → [[3,0,0],[-2,0,4]]   D2 → [[-1.5,-2,0],[0,3,0]]   D3 → [[2,1.2,-3],[0,0,0]]
    # elected signs (of the sums 3.5, -0.8, -3, -2, 3, 4): + - - - + +
    # agreeing means: (3+2)/2, -2, -3, -2, 3, 4
    merged = run("ties", [D1, D2, D3], density=0.5)
    assert close(merged, [[2.5, -2.0, -3.0], [-2.0, 3.0, 4.0]])
    # without normalize the agreeing entries are summed; λ scales the result
    merged = run("ties", [D1, D2, D3], density=0.5, normalize=False, **{"lambda": 2.0})
    assert close(merged, [[10.0, -4.0, -6.0], [-4.0, 6.0, 8.0]])


@pytest.mark.parametrize(
    "summed,elected",
    [("dare_linear", "dare_ties"), ("breadcrumbs", "breadcrumbs_ties"), ("della_linear", "della")],
)
def test_each_pair_differs_only_by_sign_election_by_hand(summed, elected):
    """At density 1 nothing is dropped: the plain variant is task arithmetic, the other keeps
    only the entries that agree with the sign of the sum (here summed, normalize off)."""
    # sums: 3.5 -1.8 -2.3 | -0.7 2.9 4.5; agreeing: 3+2, -1-2, -3 | -2, 0.1+3, 4+1
    values = dict(density=1.0, normalize=False)
    gen = torch.Generator().manual_seed(0)
    assert close(run(summed, [D1, D2, D3], gen, **values), [[3.5, -1.8, -2.3], [-0.7, 2.9, 4.5]])
    assert close(run(elected, [D1, D2, D3], gen, **values), [[5.0, -3.0, -3.0], [-2.0, 3.1, 5.0]])
    names = [[p.name for p in get_technique(t).params] for t in (summed, elected)]
    assert names[0] == names[1]


def test_ties_sign_tie_counts_as_positive():
    # sums are exactly zero: the positive entry wins; divisor is its weight alone
    merged = run("ties", [[1.0, -2.0], [-1.0, 2.0]], density=1.0)
    assert close(merged, [1.0, 2.0])


def test_ties_weights_enter_election_and_divisor():
    # weights 3 and 1: sums 3·1 − 1·2 = 1 > 0 → only the first agrees → 3·1 / 3
    merged = run("ties", [[1.0], [-2.0]], weight=[3.0, 1.0], density=1.0)
    assert close(merged, [1.0])


def test_ties_with_density_one_and_one_model_equals_task_arithmetic():
    delta = torch.randn(5, 7)
    assert torch.allclose(
        run("ties", [delta], density=1.0, **{"lambda": 0.7}),
        run("task_arithmetic", [delta], **{"lambda": 0.7}),
    )


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.9])
def test_trim_keeps_int_density_times_numel(density):
    delta = torch.randn(13, 17, generator=torch.Generator().manual_seed(1))
    kept = keep_top_magnitude(delta, density)
    count = int(density * delta.numel())
    assert int((kept != 0).sum()) == count
    # the kept entries are the largest in magnitude
    assert kept.abs().max() == delta.abs().max()
    assert delta.abs()[kept == 0].max() <= kept.abs()[kept != 0].min()


# -- DARE ------------------------------------------------------------------------------------------


def dare(seed: int, name: str = "dare_linear", **params) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return run(name, [D1, D2], generator=gen, **params)


def test_dare_one_seed_is_reproducible_and_seeds_differ():
    assert torch.equal(dare(3, density=0.5), dare(3, density=0.5))
    assert not torch.equal(dare(3, density=0.5), dare(4, density=0.5))


def test_dare_mean_over_seeds_approaches_undropped_task_arithmetic():
    expected = run("task_arithmetic", [D1, D2])
    mean = torch.stack([dare(seed, density=0.5) for seed in range(4000)]).mean(dim=0)
    assert torch.allclose(mean, expected, atol=0.15)


def test_dare_paper_rescale_divides_kept_entries_by_the_keep_probability():
    """Density 0.3 keeps a level below round(0.3·2¹⁰) = 307 of 2¹⁰: p = 307/1024."""
    delta = torch.randn(50, 50)
    out = run("dare_linear", [delta], generator=torch.Generator().manual_seed(0), density=0.3)
    kept = out != 0
    assert 0.2 < kept.float().mean() < 0.4
    assert torch.allclose(out[kept], delta[kept] / (307 / 1024), rtol=1e-6, atol=0)
    assert not torch.allclose(out[kept], delta[kept] / 0.3, rtol=1e-6, atol=0)


def levels_by_hand(seed: int, count: int, size: int) -> list[torch.Tensor]:
    """DARE's levels for ``count`` (≤ 3) inputs: one ``randint(0, 2³⁰)`` word per entry from the
    seed's generator, input i's level the word's bits 10·i … 10·i + 9."""
    words = torch.randint(0, 2**30, (size,), generator=torch.Generator().manual_seed(seed))
    return [(words // 1024**i) % 1024 for i in range(count)]


def test_dare_keeps_an_entry_when_its_10_bit_level_is_below_the_density():
    """The levels are three 10-bit fields of the generator's ``randint(0, 2³⁰)``."""
    delta = torch.randn(2, 500, generator=torch.Generator().manual_seed(11))
    out = run("dare_linear", list(delta), torch.Generator().manual_seed(4), density=[0.3, 0.5])
    levels = levels_by_hand(4, 2, 500)
    assert 0.25 < (levels[0] < 307).float().mean() < 0.35
    expected = delta[0] * (levels[0] < 307) / (307 / 1024) + delta[1] * (levels[1] < 512) * 2
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_dare_l1_rescale_restores_l1_norm():
    delta = torch.randn(40, 40, generator=torch.Generator().manual_seed(12))
    out = run(
        "dare_linear",
        [delta],
        generator=torch.Generator().manual_seed(0),
        density=0.3,
        rescale="l1",
    )
    assert torch.allclose(out.abs().sum(), delta.abs().sum(), rtol=1e-5)


def test_dare_ties_elects_signs_after_dropping():
    # density 1 drops nothing: dare_ties must then equal ties with density 1
    a = dare(0, "dare_ties", density=1.0)
    assert torch.equal(a, run("ties", [D1, D2], density=1.0))


def elect_by_hand(rows: list[list[float]], weights: list[float], lam=1.0, normalize=True):
    """TIES's elect-and-disjoint-mean, entry by entry in plain Python, from the formula."""
    merged = []
    for values in zip(*rows, strict=True):
        ys = [w * v for w, v in zip(weights, values, strict=True)]
        sign = 1.0 if sum(ys) >= 0 else -1.0  # a zero sum elects +
        agree = [i for i, y in enumerate(ys) if y * sign > 0]  # zeros agree with nothing
        total = sum(ys[i] for i in agree)
        divisor = sum(weights[i] for i in agree) or 1.0
        merged.append(lam * (total / divisor if normalize else total))
    return merged


def test_dare_ties_drops_rescales_then_elects_by_hand():
    """Seed 1's draws, made here: one word per entry holds the three inputs' levels, density-1
    inputs' too; a level below density·2¹⁰ keeps the entry."""
    draws = levels_by_hand(1, 3, 8)
    assert (draws[0] < 512).tolist() == [True, True, False, False, False, True, False, True]
    assert (draws[2] < 640).tolist() == [False, False, True, False, False, True, True, False]
    a = [1.0, 5.0, -1.5, 0.25, -0.75, 2.0, 0.5, -3.0]  # density 0.5, weight 1
    b = [-4.0, -1.0, 1.0, 0.5, 2.0, 0.0, -0.2, 0.4]  # density 1 (all kept), weight 0.5
    c = [0.0, -0.5, 1.2, -0.3, 3.0, -1.0, 0.6, -0.9]  # density 0.625, weight 2
    # weighted survivors y = w·δ/density: a → 2, 10, 0, 0, 0, 4, 0, −6; b → b/2;
    # c → 0, 0, 3.84, 0, 0, −3.2, 1.92, 0:
    #   0: 2, −2, 0 → a tie, + wins → 2/1          1: 10, −0.5, 0 → + → 10/1
    #   2: 0, 0.5, 3.84 → + → (0.5+3.84)/(0.5+2)   3: only b's 0.25 → 0.25/0.5
    #   4: only b's 1 → 1/0.5                      5: 4, 0, −3.2 → + → 4/1
    #   6: 0, −0.1, 1.92 → + → 1.92/2              7: −6, 0.2, 0 → − → −6/1
    expected = [2.0, 10.0, 4.34 / 2.5, 0.5, 2.0, 4.0, 0.96, -6.0]
    params = {"weight": [1.0, 0.5, 2.0], "density": [0.5, 1.0, 0.625]}
    assert close(run("dare_ties", [a, b, c], torch.Generator().manual_seed(1), **params), expected)
    # unnormalised: the agreeing sums, times λ
    merged = run(
        "dare_ties",
        [a, b, c],
        torch.Generator().manual_seed(1),
        normalize=False,
        **params,
        **{"lambda": 0.5},
    )
    assert close(merged, [1.0, 5.0, 2.17, 0.125, 0.5, 2.0, 0.96, -3.0])


@pytest.mark.parametrize("seed", range(6))
def test_dare_ties_equals_the_formula_on_draws_made_independently(seed):
    """Multiples of ¼ and densities ½, ¼, 1 keep the arithmetic exact, ties included."""
    values = torch.randint(-8, 9, (3, 12), generator=torch.Generator().manual_seed(100 + seed))
    deltas = (values / 4).tolist()
    weights, densities = [1.0, 0.5, 2.0], [0.5, 1.0, 0.25]
    draws = [d.tolist() for d in levels_by_hand(seed, 3, 12)]  # all draw
    dropped = [
        [x / p if level < p * 1024 else 0.0 for x, level in zip(row, us, strict=True)]
        for row, us, p in zip(deltas, draws, densities, strict=True)
    ]
    expected = elect_by_hand(dropped, weights, lam=0.75)
    merged = run(
        "dare_ties",
        deltas,
        torch.Generator().manual_seed(seed),
        weight=weights,
        density=densities,
        **{"lambda": 0.75},
    )
    assert close(merged, expected)


def test_dare_reproducible_across_processes(tiny_family, tmp_path):
    """One recipe with a randomised technique gives the same bytes in another process."""
    script = (
        "import hashlib, sys\n"
        "from pathlib import Path\n"
        "from agent_forge.evomerge.sources import open_source\n"
        "from agent_forge.evomerge.merger import AdvancedModelMerger\n"
        "from agent_forge.evomerge.recipe import Merge, Source\n"
        "fam = {n: sys.argv[i + 2] for i, n in enumerate(['base', 'm1', 'm2'])}\n"
        "sources = {n: open_source(n, p) for n, p in fam.items()}\n"
        "merger = AdvancedModelMerger(sources=sources, base='base')\n"
        "recipe = Merge('dare_ties', [Source('m1'), Source('m2')], {'density': 0.4}, "
        "Source('base'), seed=11)\n"
        "out = merger.merge(recipe, Path(sys.argv[1]))\n"
        "print(hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest())\n"
    )
    paths = [str(tiny_family[n]) for n in ("base", "m1", "m2")]
    digests = [
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"out{i}"), *paths],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for i in range(2)
    ]
    assert digests[0] == digests[1] and len(digests[0]) == 64


# -- breadcrumbs -----------------------------------------------------------------------------------


def test_breadcrumbs_drops_outliers_and_small_entries_by_hand():
    delta = torch.arange(1.0, 11.0)  # 1 … 10
    # density 0.5 keeps 5; gamma 0.1 drops the single largest (10); the 4 smallest go too
    assert close(drop_outliers_and_small(delta, 0.5, 0.1), [0, 0, 0, 0, 5, 6, 7, 8, 9, 0])


def test_breadcrumbs_gamma_zero_keeps_the_largest_not_nothing():
    delta = torch.tensor([1.0, -10.0, 3.0, 7.0, -2.0, 5.0])
    kept = drop_outliers_and_small(delta, 0.5, 0.0)
    assert close(kept, [0, -10, 0, 7, 0, 5])
    assert torch.equal(kept, keep_top_magnitude(delta, 0.5))
    merged = run("breadcrumbs", [delta.tolist()], density=0.5, gamma=0.0)
    assert int((merged != 0).sum()) == 3


def test_breadcrumbs_reduces_outlier_drop_to_keep_density():
    delta = torch.arange(1.0, 11.0)
    # density 0.95 keeps 9 of 10, so only the largest can go although gamma asks for 10%·… more
    assert close(drop_outliers_and_small(delta, 0.95, 0.3), [1, 2, 3, 4, 5, 6, 7, 8, 9, 0])


def test_breadcrumbs_ties_drops_each_band_then_elects_by_hand():
    a = [0.5, -3.0, 1.0, 2.5, -0.2, 4.0, -1.5, 0.8, 2.0, -0.1]
    b = [-2.0, 1.0, -0.3, -2.5, 0.6, 0.9, 3.5, -0.4, -1.2, 5.0]
    c = [0.7, 0.2, -0.6, 0.0, -3.0, 0.3, 0.4, 1.1, -0.5, 0.05]
    # a: density 0.5, gamma 0.1 → skip the largest (4), keep the next 5
    # b: density 0.6, gamma 0.2 → skip the 2 largest (5, 3.5), keep the next 6
    # c: density 0.9, gamma 0.3 → keep 9, so only 1 outlier (−3) can go, not 3
    #   a' = [0,    -3,  1,    2.5, 0,   0,   -1.5, 0,   2,    0   ]
    #   b' = [-2,   1,   0,   -2.5, 0.6, 0.9,  0,   0,  -1.2,  0   ]
    #   c' = [0.7,  0.2, -0.6, 0,   0,   0.3,  0.4, 1.1, -0.5, 0.05]
    # weights 1, 1, 2: column 3 sums to exactly 0, so + wins and a's 2.5 stands alone;
    # in columns 2 and 8 c's weight elects − (unweighted, + would win)
    params = {"weight": [1.0, 1.0, 2.0], "density": [0.5, 0.6, 0.9], "gamma": [0.1, 0.2, 0.3]}
    merged = run("breadcrumbs_ties", [a, b, c], **params)
    assert close(merged, [-2.0, -3.0, -0.6, 2.5, 0.6, 1.5 / 3, -1.5, 1.1, -2.2 / 3, 0.05])
    merged = run("breadcrumbs_ties", [a, b, c], normalize=False, **params, **{"lambda": 2.0})
    assert close(merged, [-4.0, -6.0, -2.4, 5.0, 1.2, 3.0, -3.0, 4.4, -4.4, 0.2])


# -- DELLA -----------------------------------------------------------------------------------------


def test_della_keep_probabilities_rise_with_magnitude_rank():
    row = torch.tensor([[0.1, -0.4, 0.3, 0.2]])
    # ranks by |x|: 0, 3, 2, 1 → p = 0.4 + 0.2·rank/3
    assert close(
        della_keep_probabilities(row, 0.5, 0.1), [[0.4, 0.6, 0.4 + 0.2 * 2 / 3, 0.4 + 0.2 / 3]]
    )


def test_della_rescales_kept_entries_by_one_over_p_and_is_unbiased():
    delta = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    probs = della_keep_probabilities(delta, 0.5, 0.2)
    out = run(
        "della_linear",
        [delta],
        generator=torch.Generator().manual_seed(0),
        density=0.5,
        epsilon=0.2,
    )
    kept = out != 0
    assert torch.allclose(out[kept], delta[kept] / probs[kept])
    mean = torch.stack(
        [
            run(
                "della_linear",
                [delta],
                generator=torch.Generator().manual_seed(s),
                density=0.5,
                epsilon=0.2,
            )
            for s in range(3000)
        ]
    ).mean(0)
    assert torch.allclose(mean, delta, atol=0.25)


def test_della_ranks_per_row_rescales_by_one_over_p_then_elects_by_hand():
    """Every input draws one ``torch.rand(shape)``, in input order, whatever its density."""
    a = [[0.5, -2.0, 0.25], [-3.0, 1.5, 0.75]]  # density 0.5, ε 0.25, weight 1
    b = [[-1.0, 0.5, -2.0], [6.0, -1.0, 1.0]]  # density 1: kept whole (draws unused); weight 0.5
    c = [[-0.75, 1.0, -0.25], [0.5, -0.25, -1.0]]  # density 0.5, ε 0.125, weight 1
    # ranks of |x| within each row (0 … 2) give p = density − ε + 2ε·rank/2, exact in binary:
    p_a = [[0.5, 0.75, 0.25], [0.75, 0.5, 0.25]]  # ranks 1 2 0 | 2 1 0
    p_c = [[0.5, 0.625, 0.375], [0.5, 0.375, 0.625]]  # ranks 1 2 0 | 1 0 2
    gen = torch.Generator().manual_seed(0)
    u_a, _, u_c = (torch.rand((2, 3), generator=gen) for _ in range(3))
    assert (u_a < torch.tensor(p_a)).tolist() == [[True, False, True], [True, True, False]]
    assert (u_c < torch.tensor(p_c)).tolist() == [[True, True, True], [False, False, False]]
    # survivors δ/p:  a → [[1, 0, 1], [−4, 3, 0]]   c → [[−1.5, 1.6, −2/3], [0, 0, 0]]
    # weighted sums with b·0.5: [[−1, 1.85, −2/3], [−1, 2.5, 0.5]]; the agreeing entries
    # (non-zero, same sign) divided by their weights: [0][0] b and c, [0][1] b and c (a's 0
    # does not count), [0][2] b and c, [1][0] a alone (the weight elects −; unweighted, b's 6
    # would win), [1][1] a, [1][2] b
    expected = [[(-0.5 - 1.5) / 1.5, (0.25 + 1.6) / 1.5, (-1.0 - 2 / 3) / 1.5], [-4.0, 3.0, 1.0]]
    merged = run(
        "della",
        [a, b, c],
        torch.Generator().manual_seed(0),
        weight=[1.0, 0.5, 1.0],
        density=[0.5, 1.0, 0.5],
        epsilon=[0.25, 0.15, 0.125],
    )
    assert close(merged, expected)


@pytest.mark.parametrize("density,epsilon", [(0.1, 0.2), (0.9, 0.15)])
def test_della_parameters_outside_unit_interval_are_errors(density, epsilon):
    with pytest.raises(ConfigurationError, match=r"density ± epsilon must lie inside \(0, 1\)"):
        Merge(
            "della",
            [Source("a"), Source("b")],
            {"density": density, "epsilon": epsilon},
            Source("base"),
        )


def test_della_check_pairs_per_layer_densities_with_their_epsilons():
    # a per-layer density of 0.9 meets the default epsilon 0.15 at some layer: refused
    with pytest.raises(ConfigurationError, match="got density 0.9, epsilon 0.15"):
        Merge(
            "della", [Source("a"), Source("b")], {"density": [[0.3, 0.5, 0.9], 0.5]}, Source("base")
        )
    # matching lists pair position by position: 0.9 with 0.05 and 0.3 with 0.2 are both fine
    Merge(
        "della",
        [Source("a"), Source("b")],
        {"density": [[0.3, 0.9], 0.5], "epsilon": [[0.2, 0.05], 0.1]},
        Source("base"),
    )


# -- model stock -----------------------------------------------------------------------------------


def test_model_stock_interpolation_ratio_by_hand():
    # offsets [1,0] and [1,1]: cos = 1/√2, N = 2 → t = 2c/(1+c); result t·mean(δ)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert close(run("model_stock", [[1.0, 0.0], [1.0, 1.0]]), [t * 1.0, t * 0.5])


def test_model_stock_steps_away_from_opposed_task_vectors_as_mergekit_does():
    # offsets [1, 0] and [-1, 0.5]: cos = -1/√1.25, N = 2 → t = 2c/(1+c) ≈ -16.9; mean [0, 0.25]
    c = -1 / math.sqrt(1.25)
    t = 2 * c / (1 + c)
    assert close(run("model_stock", [[1.0, 0.0], [-1.0, 0.5]]), [0.0, t * 0.25], tol=1e-5)
    # cos = -1: the denominator vanishes, t = 0 keeps the base
    assert close(run("model_stock", [[1.0, 0.0], [-2.0, 0.0]]), [0.0, 0.0])


@pytest.mark.parametrize("second", [[0.0, 1.0], [-1.0, 0.5]])
def test_model_stock_clamp_cosine_keeps_the_base_where_task_vectors_share_no_direction(second):
    assert close(run("model_stock", [[1.0, 0.0], second], clamp_cosine=True), [0.0, 0.0])


def test_model_stock_three_models_by_hand():
    # pairwise cosines of e1, e2, e1+e2: 0, 1/√2, 1/√2 → mean c = √2/3; t = 3c / (1 + 2c)
    c = math.sqrt(2) / 3
    t = 3 * c / (1 + 2 * c)
    merged = run("model_stock", [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert close(merged, [t * 2 / 3, t * 2 / 3])


def test_passthrough_returns_its_input():
    assert torch.equal(run("passthrough", [T1]), torch.tensor(T1))


# -- layer-dependent parameter values --------------------------------------------------------------


def test_layer_dependent_values_resolve_by_group_and_component():
    # 4 layers → positions 0..5; a list of 3 splits them into [0,1], [2,3], [4,5]
    loc = TensorLocation("attention", position=3, layers=4)
    assert resolve_value([0.1, 0.2, 0.3], loc) == 0.2
    assert resolve_value({"attention": [0.5, 0.6], "default": 0.9}, loc) == 0.6
    assert resolve_value({"mlp": 0.5, "default": 0.9}, loc) == 0.9
    assert resolve_value(0.4, loc) == 0.4


def test_name_filters_take_the_first_substring_found_in_the_tensor_name():
    value = {"filters": [["self_attn", 0.2], ["q_proj", 0.9], ["layers.1.", [0.3, 0.4]]]}
    value["default"] = 0.5
    at = lambda name: TensorLocation("attention", position=2, layers=4, name=name)  # noqa: E731
    assert resolve_value(value, at("model.layers.1.self_attn.q_proj.weight")) == 0.2
    assert resolve_value(value, at("model.layers.1.mlp.up_proj.weight")) == 0.3  # group 0 of 2
    assert resolve_value(value, at("model.norm.weight")) == 0.5
    merge = Merge("linear", [Source("m1"), Source("m2")], {"weight": [value, 1.0]})
    assert merge.params["weight"][0]["filters"][1] == ["q_proj", 0.9]  # the order is kept
    assert recipe_from_dict(merge.to_dict()).hash == merge.hash
    reordered = {**value, "filters": value["filters"][::-1]}
    assert Merge("linear", [Source("m1"), Source("m2")], {"weight": [reordered, 1.0]}).hash != (
        merge.hash
    )


def test_name_filters_without_a_default_are_a_clear_error():
    with pytest.raises(ConfigurationError, match="take exactly 'filters' and 'default'"):
        Merge("linear", [Source("m1"), Source("m2")], {"weight": {"filters": [["mlp", 1.0]]}})


def test_a_component_mapping_without_default_is_a_clear_error_unless_it_names_all():
    with pytest.raises(ConfigurationError, match="has no 'default' for the other tensors"):
        Merge("linear", [Source("m1"), Source("m2")], {"weight": [{"mlp": 1.0}, 1.0]})
    every = {"embeddings": 0.1, "attention": 0.2, "mlp": 0.3, "norms": 0.4, "head": 0.5}
    Merge("linear", [Source("m1"), Source("m2")], {"weight": [every, 1.0]})  # complete: fine


# -- exact trims, batches of tensors and the blockwise core ----------------------------------------


def reference_trim(x: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` largest |x| by a stable sort: among equal magnitudes the lowest flat index
    first."""
    flat = x.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:keep]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.view_as(x)


def trim_cases():
    gen = torch.Generator().manual_seed(7)
    size = 3 * sparsify.EXACT_SELECT  # large enough for the sampled bracket
    step = (size // min(sparsify.SAMPLE, max(sparsify.SAMPLE >> 4, size >> 6))) | 1
    return {
        "normal, small": torch.randn(13, 17, generator=gen),
        "normal, large": torch.randn(size, generator=gen),
        "few levels, small": torch.randint(-5, 6, (40, 30), generator=gen).float(),
        "few levels, large": torch.randint(-9, 10, (size,), generator=gen).float(),
        "mostly zero": torch.randn(size, generator=gen) * (torch.rand(size, generator=gen) < 0.3),
        "period of the sample stride": (torch.arange(size) % step).float() - step / 2,
    }


@pytest.mark.parametrize("case", list(trim_cases()))
@pytest.mark.parametrize("density", [0.001, 0.3, 0.5, 0.97])
def test_trim_equals_a_stable_sort_with_ties_broken_by_position(case, density):
    x = trim_cases()[case]
    keep = max(1, int(density * x.numel()))
    expected = reference_trim(x, keep)
    assert torch.equal(keep_top_magnitude(x, density), expected)
    assert torch.equal(
        keep_top_magnitude(x.double().float(), density), expected
    )  # a second run: same bits


def test_trim_keeps_exactly_k_entries_among_many_ties():
    x = torch.tensor([3.0, -1.0, 1.0, 2.0, -1.0, 1.0, -3.0, 1.0])  # |x| = 1 four times
    # keep 5: the two 3s, the 2, then the first two of the tied ones (flat indices 1 and 2)
    assert close(keep_top_magnitude(x, 5 / 8), [3, -1, 1, 2, 0, 0, -3, 0])


@pytest.fixture()
def tiny_blocks(monkeypatch):
    """Blocks, spans, samples and chunks of a few elements, so small tensors exercise every path."""
    monkeypatch.setattr(blockwise, "BLOCK", 48)
    monkeypatch.setattr(blockwise, "WHOLE", 100)
    monkeypatch.setattr(blockwise, "SPAN", 333)
    monkeypatch.setattr(sparsify, "EXACT_SELECT", 200)
    monkeypatch.setattr(sparsify, "SAMPLE", 128)
    monkeypatch.setattr(sparsify, "_CHUNK", 64)


def reference_combine(deltas, weights, lam, normalize, consensus):
    """The task-vector core written with whole-tensor ops, as the formula reads."""
    w = torch.tensor(weights).reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    if consensus:
        agree = weighted.sign() == torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        mixed, divisor = (weighted * agree).sum(dim=0), (w * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed, total = weighted.sum(dim=0), float(sum(weights))
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total)
    return (mixed / divisor if normalize else mixed) * lam


@pytest.mark.parametrize(
    "weights", [[1.0], [1.0, 1.0, 1.0], [0.5, 0.3, 0.2], [1.0, -1.0, 0.5], [2.0, 0.0]]
)
@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("size", [37, 1000])
def test_blockwise_core_gives_the_bits_of_the_formula(weights, consensus, size, tiny_blocks):
    gen = torch.Generator().manual_seed(11)
    deltas = torch.randn(len(weights), size, generator=gen)
    deltas[:, ::7] = 0.0  # zero entries and exact sign ties
    for normalize, lam in [(True, 1.0), (False, 0.7), (True, 1.3)]:
        got = combine_task_vectors(
            deltas, weights, lam=lam, normalize=normalize, sign_consensus=consensus
        )
        assert torch.equal(got, reference_combine(deltas, weights, lam, normalize, consensus))


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_in_blocks_equals_trim_then_formula(density, tiny_blocks):
    gen = torch.Generator().manual_seed(5)
    deltas = (
        torch.randint(-20, 21, (3, 700), generator=gen).float() / 8
    )  # many ties at the threshold
    weights = [0.6, 0.3, 0.4]
    keep = max(1, int(density * 700))
    trimmed = torch.stack([reference_trim(d, keep) for d in deltas])
    expected = reference_combine(trimmed, weights, 1.0, True, True)
    assert torch.equal(run("ties", list(deltas), weight=weights, density=density), expected)


SEGMENTED = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
]


@pytest.mark.parametrize("name", SEGMENTED)
@pytest.mark.parametrize("blocked", [False, True])
def test_a_batch_of_tensors_gives_the_bits_of_each_tensor_alone(name, blocked, request):
    if blocked:
        request.getfixturevalue("tiny_blocks")
    tech = get_technique(name)
    assert tech.segmented
    sizes = [7, 300, 1, 64, 250]
    stack = torch.randn(3, sum(sizes), generator=torch.Generator().manual_seed(2))
    wanted = {"density": [0.4, 0.7, 0.25], "weight": [0.5, 1.0, 0.8], "gamma": 0.05}
    params = canonical_params(tech, {k: v for k, v in wanted.items() if k in tech.defaults()}, 3)

    def generators():
        return [torch.Generator().manual_seed(100 + j) for j in range(len(sizes))]

    batched = apply_technique(
        tech,
        stack,
        params,
        None,
        generators() if tech.randomized else None,
        segments=sizes,
        out=torch.empty(sum(sizes)),
    )
    pieces, start = [], 0
    for size, generator in zip(sizes, generators(), strict=True):
        part = stack[:, start : start + size].contiguous()
        pieces.append(
            apply_technique(tech, part, params, None, generator if tech.randomized else None)
        )
        start += size
    assert torch.equal(batched, torch.cat(pieces))


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_trims_from_sorted_magnitudes_give_the_same_bits(name):
    """The resident pool hands trims the magnitudes sorted per tensor; thresholds become lookups."""
    tech = get_technique(name)
    sizes = [50, 7, 400]
    gen = torch.Generator().manual_seed(4)
    stack = (
        torch.randint(-6, 7, (3, sum(sizes)), generator=gen).float() / 4
    )  # ties at every threshold
    stack[1] = torch.randn(sum(sizes), generator=gen)
    ranked = torch.empty_like(stack)
    for row in range(3):
        sparsify.sort_segments(stack[row], sparsify.segment_starts(sum(sizes), sizes), ranked[row])
    wanted = {"density": [0.3, 0.5, 0.8], "gamma": 0.1}
    params = canonical_params(tech, {k: v for k, v in wanted.items() if k in tech.defaults()}, 3)
    plain = apply_technique(tech, stack, params, segments=sizes)
    assert torch.equal(apply_technique(tech, stack, params, segments=sizes, ranked=ranked), plain)


@pytest.mark.parametrize("case", list(trim_cases()))
def test_the_device_path_of_the_trim_gives_the_same_bits(case, monkeypatch):
    """On GPUs thresholds come from topk/searchsorted in torch; run that path here on CPU."""
    x = trim_cases()[case].reshape(-1)
    sizes = [x.numel() // 3, x.numel() - x.numel() // 3]
    parts = sparsify.segment_starts(x.numel(), sizes)
    ranked = sparsify.sort_segments(x, parts, torch.empty_like(x))
    expected = sparsify.magnitude_cut(x, [max(1, s // 4) for s in sizes], parts)
    monkeypatch.setattr(sparsify, "TORCH_SELECT", True)
    assert sparsify.magnitude_cut(x, [max(1, s // 4) for s in sizes], parts) == expected
    assert sparsify.magnitude_cut(x, [max(1, s // 4) for s in sizes], parts, ranked) == expected
    assert torch.equal(sparsify.sort_segments(x, parts, torch.empty_like(x)), ranked)


def test_nearswap_takes_small_differences_whole_and_large_ones_by_t():
    deltas = torch.tensor([[0.001, -0.01, 0.0]])
    merged = run("nearswap", deltas, t=0.002)  # min(1, t/|δ|)·δ
    assert close(merged, [0.001, -0.002, 0.0], tol=1e-9)


def test_sce_weights_models_by_energy_and_erases_the_minority_sign():
    deltas = torch.tensor([[1.0, -1.0], [3.0, 1.0]])
    # energies 1 and 5 → shares 1/6, 5/6; the sums [4, 0] elect + for both entries
    merged = run("sce", deltas)
    assert close(merged, [(1 / 6 + 3 * 5 / 6) / 1.0, 1.0], tol=1e-6)
    # select_topk 0.5 keeps the one entry of largest variance in every model
    spread = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # variances 1 and 4: entry 1 is kept
    assert close(run("sce", spread, select_topk=0.5), [0.0, 4.0], tol=1e-6)


def test_multislerp_scales_the_weighted_mean_direction_by_the_weighted_mean_norm():
    stack = [[3.0, 0.0], [0.0, 1.0]]  # directions e₁, e₂; norms 3 and 1
    direction = torch.tensor([0.75, 0.25]) / math.hypot(0.75, 0.25)
    merged = run("multislerp", stack, weight=[3.0, 1.0])  # weights normalised to 0.75, 0.25
    assert close(merged, (2.5 * direction).tolist(), tol=1e-6)  # 0.75·3 + 0.25·1 = 2.5


def test_multislerp_falls_back_to_the_weighted_sum_where_directions_cancel():
    """A deliberate difference: mergekit raises here for three or more models."""
    stack = [[1.0, 0.0], [-2.0, 0.0], [0.0, 0.0]]
    assert close(run("multislerp", stack, weight=[1.0, 1.0, 1.0]), [-1 / 3, 0.0], tol=1e-6)


def test_nuslerp_interpolates_on_the_arc_and_linearly_when_collinear():
    half = math.sin(math.pi / 4)  # t = 1/(1+1): the arc's midpoint between e₁ and e₂
    assert close(run("nuslerp", [[1.0, 0.0], [0.0, 1.0]], weight=[1.0, 1.0]), [half, half])
    rows = [[[1.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [4.0, 0.0]]]  # row 1 collinear: linear
    merged = run("nuslerp", rows, weight=[1.0, 1.0], nuslerp_flatten=False)
    assert close(merged, [[half, half], [3.0, 0.0]], tol=1e-6)
    # t = 3/4 towards the second, column by column: column 0 goes (1, 0) → (0, 1), the arc at
    # 3/4 of 90°; column 1 goes (2, 0) → (4, 0), collinear: 2 + 3/4 · 2
    columns = [[[1.0, 2.0], [0.0, 0.0]], [[0.0, 4.0], [1.0, 0.0]]]
    merged = run(
        "nuslerp", columns, weight=[1.0, 3.0], nuslerp_flatten=False, nuslerp_row_wise=True
    )
    expected = [[math.cos(3 * math.pi / 8), 3.5], [math.sin(3 * math.pi / 8), 0.0]]
    assert close(merged, expected, tol=1e-6)


def test_ram_averages_the_models_that_move_an_entry_and_ramplus_amplifies_unique_moves():
    deltas = [[0.5, 0.0, 0.2], [0.3, 0.0, 0.0]]  # entry 0 shared, entry 2 model 0's alone
    assert close(run("ram", deltas), [0.4, 0.0, 0.2], tol=1e-7)
    # model 0: 1 shared, 1 unique → ρ = 1, λ = 1 + 0.5·min(1, 0.2) = 1.1
    assert close(run("ramplus_tl", deltas, r=0.5), [0.4, 0.0, 0.22], tol=1e-7)
    assert close(run("ramplus_tl", deltas, r=0.5, alpha=2.0), [0.4, 0.0, 0.3], tol=1e-7)


def test_arcee_fusion_takes_exact_quartiles_even_past_mergekits_sample_size():
    """A deliberate difference: mergekit samples 1M entries of a larger tensor at random."""
    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(1100, 1000, generator=generator)  # 1.1M entries
    model = reference + 0.1 * torch.randn(1100, 1000, generator=generator)
    p, q = torch.softmax(model, dim=-1) + 1e-8, torch.softmax(reference, dim=-1) + 1e-8
    importance = (model - reference).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    ranked = importance.reshape(-1).sort().values
    n = ranked.numel() - 1
    q1, median, q3 = ranked[n // 4], ranked[n // 2], ranked[3 * n // 4]
    expected = torch.where(importance >= median + 1.5 * (q3 - q1), model, reference)
    merged = run("arcee_fusion", [reference, model])
    assert torch.equal(merged, expected)
    assert 0 < int((merged != reference).sum()) < merged.numel()
