"""Fused resident kernels (:mod:`agent_forge.evomerge.fused`): trims by row keep exactly the
streaming trim, the compiled kernel gives the streamed bytes, DARE draws are common random
numbers, and a kernel whose bits differ is switched off."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agent_forge.evomerge.config import EvolutionSettings
from agent_forge.evomerge.fused import (
    AUTO_MIN_ELEMENTS,
    FusedKernels,
    TrimRows,
    magnitude_order,
    merge_kernel,
    plan_for,
    row_pieces,
    row_width,
    wanted,
)
from agent_forge.evomerge.merger import AdvancedModelMerger
from agent_forge.evomerge.recipe import Merge, Source
from agent_forge.evomerge.sources import open_source
from agent_forge.evomerge.sparsify import draw_words, keep_top_magnitude, level_of

INPUTS = (Source("m1"), Source("m2"), Source("m3"))
BASE = Source("base")


@pytest.fixture(scope="module")
def fused(tiny_family):
    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    return AdvancedModelMerger(sources=sources, base="base", resident=True, fused_kernels="on")


@pytest.fixture()
def streaming(tiny_family):
    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    return AdvancedModelMerger(sources=sources, base="base")


# -- trims by row ---------------------------------------------------------------------------------


def trimmed_by_rows(values, sizes, density):
    """One input's TIES trim as the kernel takes it (eagerly): the tensors of ``values`` laid
    out as rows, cut by the thresholds and tie bounds of :meth:`TrimRows.cuts`."""
    rows = TrimRows.of(sizes)
    starts = [0, *np.cumsum(sizes)]
    orders = torch.cat([magnitude_order(values[a:b]) for a, b in itertools.pairwise(starts)])
    cuts = rows.cuts(orders[None].int(), values[None], [density])
    params = {"weight": [1.0], "density": [density], "lam": 1.0, "normalize": True}
    plan = plan_for("ties", params, cuts)
    assert plan is not None
    out = torch.empty(len(values))
    shape = (-1, rows.width)
    merge_kernel(
        values[None].unflatten(1, shape),
        torch.zeros(shape[1:]).expand(len(values) // rows.width, -1),
        None,
        out.view(shape),
        *plan.arguments(),
    )
    return out, plan


@pytest.mark.parametrize("density", [0.5, 0.1, 0.3, 0.7, 0.29, 0.95, 0.0, 1.0, 0.999])
@pytest.mark.parametrize("sizes", [[1], [10], [4097], [48, 16, 96, 32], [64, 4096, 128]])
def test_row_cuts_keep_exactly_the_streaming_trim(density, sizes):
    """Any density (no float32 grid): each tensor keeps its own max(1, int(d·n)) largest
    entries, ties by lowest index, whichever row of the layout an entry lies in."""
    torch.manual_seed(sum(sizes))
    values = torch.randint(-6, 7, (sum(sizes),)).float() / 4.0  # many ties and zeros
    got, _ = trimmed_by_rows(values, sizes, density)
    starts = [0, *np.cumsum(sizes)]
    expected = torch.cat(
        [keep_top_magnitude(values[a:b], density) for a, b in itertools.pairwise(starts)]
    )
    assert torch.equal(got, expected)


def test_trim_keeps_max_one_int_density_count_and_breaks_ties_by_lowest_index():
    values = torch.tensor([1.0, -3.0, 3.0, 2.0, -3.0, 0.5, 3.0, 1.0, 0.0, 2.0])
    # by hand: |x| ranks 3,3,3,3 (indices 1,2,4,6) then 2,2 (3,9) then 1,1 (0,7) then .5, 0;
    # ten entries make two rows of five. A split tie whose first dropped entry lies in a later
    # row than the last kept one is cut by row (cut: ≥ t up to that row, > t after it); one in
    # the same row needs the column bound (cut_tie).
    cases = [
        (0.25, [1, 2], "cut_tie"),  # 4 is dropped beside 2 in row 0
        (0.3, [1, 2, 4], "cut"),  # 6 is dropped in row 1: rows ≥ 3, > 3
        (0.5, [1, 2, 3, 4, 6], "cut"),  # the 2 at 9 is dropped in row 1
        (0.05, [1], "cut_tie"),
        (0.4, [1, 2, 4, 6], "cut"),  # no tie split
        (0.9, [0, 1, 2, 3, 4, 5, 6, 7, 9], "cut"),  # only the 0 goes
    ]
    for density, kept, mode in cases:
        got, plan = trimmed_by_rows(values, [10], density)
        assert plan.modes == (mode,), density
        assert torch.nonzero(got).flatten().tolist() == kept, density
        assert torch.equal(got[kept], values[kept])
    _, plan = trimmed_by_rows(values, [10], 0.3)
    assert plan.cuts.thresholds.flatten().tolist() == [3.0, float(np.nextafter(np.float32(3), 4))]


def test_a_tie_split_across_rows_is_cut_by_row_in_the_right_tensor():
    """Two tensors (16 and 32 entries) in rows of 16: the second keeps one entry and its two
    3s fall in different rows, so its first row keeps ≥ 3 and its second > 3, by hand."""
    first = torch.arange(1.0, 17.0) / 8  # distinct magnitudes; keeps its largest, 2.0
    second = torch.full((32,), 0.5)
    second[2], second[20] = -3.0, 3.0
    values = torch.cat([first, second])
    got, plan = trimmed_by_rows(values, [16, 32], 1 / 32)
    assert plan.modes == ("cut",)
    above_three = float(np.nextafter(np.float32(3), np.float32(4)))
    assert plan.cuts.thresholds.flatten().tolist() == [2.0, 3.0, above_three]
    assert torch.nonzero(got).flatten().tolist() == [15, 16 + 2]


def test_magnitude_order_is_descending_with_equal_magnitudes_by_index():
    values = torch.tensor([0.5, -0.5, 0.0, -0.0, 2.0, -2.0, 1e-30, float("inf"), -1e-45])
    # by hand: inf; 2 and −2 (index 4 before 5); ±0.5; 1e-30; the denormal; +0 and −0
    assert magnitude_order(values).tolist() == [7, 4, 5, 0, 1, 6, 8, 2, 3]


def test_tensors_share_a_kernel_call_when_their_sizes_share_a_row_width():
    # by hand: gcd(768, 589824) = 768 joins; 5 shares nothing; 64, 128, 32 share 32
    assert row_pieces([768, 589824, 5, 64, 128, 32]) == [(0, 2), (2, 3), (3, 6)]
    assert row_pieces([32, 8, 8]) == [(0, 1), (1, 2), (2, 3)]  # a divisor under 16 splits
    assert row_width(768, 590592) == 768
    assert row_width(12_288_000, 12_288_000) == 4096  # 2¹⁵·375: the widest row allowed
    assert row_width(768, 768) == 384  # one tensor alone still has two rows (two threads)
    assert row_width(4097, 4097) == 241  # 17·241
    assert row_width(5, 5) == 1 and row_width(1, 1) == 1


# -- fused materialisation equals streaming --------------------------------------------------------

CASES = {
    "linear": Merge("linear", INPUTS, {}),
    "linear unnormalised": Merge(
        "linear", INPUTS, {"weight": [0.3, -0.5, 0.7], "normalize": False}
    ),
    "task_arithmetic": Merge("task_arithmetic", INPUTS, {"lambda": 0.6}, BASE),
    "task_arithmetic normalised": Merge(
        "task_arithmetic", INPUTS, {"weight": [0.3, 0.5, 0.7], "normalize": True}, BASE
    ),
    "ties": Merge("ties", INPUTS, {"density": 0.5}, BASE),
    "ties mixed": Merge(
        "ties",
        INPUTS,
        {"density": [0.25, 0.75, 1.0], "weight": [0.3, -0.5, 0.7], "lambda": 1.3},
        BASE,
    ),
    "ties unnormalised": Merge(
        "ties", INPUTS, {"density": [0.375, 0.0, 0.875], "normalize": False}, BASE
    ),
    "ties per layer": Merge(
        "ties",
        INPUTS,
        {"density": [[0.25, 0.5], 0.75, [1.0, 0.125]], "weight": [[0.2, 0.9], 0.5, 0.4]},
        BASE,
    ),
    "dare_ties": Merge("dare_ties", INPUTS, {"density": 0.5}, BASE, seed=1),
    "dare_linear": Merge(
        "dare_linear", INPUTS, {"density": [0.3, 0.7, 1.0], "weight": [0.2, 0.5, 0.9]}, BASE, seed=5
    ),
    "dare no rescale": Merge(
        "dare_ties", INPUTS, {"density": [0.3, 0.0, 0.8], "rescale": "none"}, BASE, seed=5
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_materialisation_gives_the_streamed_bytes(case, fused, streaming, tmp_path):
    recipe = CASES[case]
    streamed = load_file(streaming.merge(recipe, tmp_path / "out") / "model.safetensors")
    kernels = fused.graph.fused
    assert kernels is not None
    before = kernels.calls
    params = dict(fused.materialize(recipe).named_parameters())
    assert kernels.enabled and kernels.calls > before  # it ran fused and passed its own check
    for name, tensor in streamed.items():
        got = params[name].detach()
        assert torch.equal(tensor.view(torch.int32), got.view(torch.int32)), name


@pytest.mark.parametrize("case", ["ties mixed", "ties per layer"])
@pytest.mark.parametrize("task_vectors", ["a third zero", "quantised"])
def test_ties_with_split_ties_and_zero_thresholds_gives_the_eager_bytes(
    case, task_vectors, tiny_family
):
    """Task vectors a third 0 exactly (thresholds of 0, ties galore) or on a grid of 1/64
    (ties at every threshold, split inside rows: the kernel compares tie bounds by column)."""
    recipe = CASES[case]
    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    merger = AdvancedModelMerger(sources=sources, base="base", resident=True, fused_kernels="on")
    store = merger.pool._store("base")
    base = store.matrix[store.rows["base"]]
    for name in ("m1", "m2", "m3"):
        row = store.matrix[store.rows[name]]
        if task_vectors == "quantised":
            row.copy_(base + torch.round((row - base) * 64) / 64)
        else:
            row[::3] = base[::3]
    eager = AdvancedModelMerger(sources=sources, base="base", resident=True, fused_kernels="off")
    eager.pool._store("base").matrix.copy_(store.matrix)
    kernels = merger.graph.fused
    assert kernels is not None
    params = dict(merger.materialize(recipe).named_parameters())
    assert kernels.enabled and kernels.calls > 0
    if task_vectors == "quantised":
        assert any(variant[0][0] == "cut_tie" for variant in kernels._checked)
    want = dict(eager.materialize(recipe).named_parameters())
    for name, tensor in want.items():
        got = params[name].detach()
        assert torch.equal(tensor.detach().view(torch.int32), got.view(torch.int32)), name


def merger_output(streaming, recipe, tmp_path):
    return load_file(streaming.merge(recipe, tmp_path / "out") / "model.safetensors")


@pytest.mark.parametrize("technique", ["ties", "dare_ties", "dare_linear", "task_arithmetic"])
def test_candidates_with_new_weights_and_densities_reuse_the_compiled_kernels(
    technique, tiny_family
):
    """Evolution proposes new values for every candidate: after the first two (static shapes,
    then dynamic ones) no candidate compiles a kernel — not for a new weight (one baked into
    the graph as a constant recompiled every time), nor for an input at density 1 (one mode
    per input made a variant per combination), nor for TIES's rows of new thresholds."""
    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    merger = AdvancedModelMerger(sources=sources, base="base", resident=True, fused_kernels="on")
    kernels = merger.graph.fused
    rng = np.random.default_rng(0)

    def candidate():
        params = {"weight": rng.uniform(0.1, 1.0, 3).tolist(), "lambda": rng.uniform(0.5, 1.5)}
        if technique != "task_arithmetic":
            density = rng.uniform(0.2, 0.9, 3).astype(np.float32).tolist()
            density[rng.integers(3)] = float(rng.choice([density[0], 1.0]))
            params["density"] = density
        return Merge(technique, INPUTS, params, BASE, seed=3)

    rng.random(5)  # a stream whose first candidates differ in where density 1 falls

    for _ in range(2):
        merger.materialize(candidate())
    compiled = kernels.compiles
    for _ in range(6):
        merger.materialize(candidate())
    assert kernels.enabled and kernels.compiles == compiled


def test_fused_kernel_keeps_signed_zeros_and_ties_as_the_eager_path(tiny_family):
    """Adversarial task vectors: exact zeros, −0.0 in the base, equal magnitudes."""
    from agent_forge.evomerge.graph import RecipeGraph
    from agent_forge.evomerge.pool import SourcePool

    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    pool = SourcePool(sources, "base", resident=True)
    store = pool._store("base")
    matrix = store.matrix
    rows = {name: store.rows[name] for name in ("base", "m1", "m2", "m3")}
    matrix[rows["base"], ::7] = -0.0
    for k, name in enumerate(("m1", "m2", "m3")):
        row = matrix[rows[name]]
        row.copy_(matrix[rows["base"]] + torch.round(torch.randn_like(row) * 3) / 64)
        row[:: 5 + k] = matrix[rows["base"], :: 5 + k]  # δ = 0 exactly
        # where the base is −0.0: tiny negative task vectors, which every trim drops, so the
        # whole column merges to a zero whose sign decides the stored bits
        row[::7] = -1e-30 if name != "m3" else -0.0
    graph = RecipeGraph(pool, fused=FusedKernels())
    eager = RecipeGraph(pool)
    names = graph.names(INPUTS[0])
    for recipe in (CASES["ties mixed"], CASES["dare_ties"], CASES["task_arithmetic"]):
        count = graph.count(recipe, names)
        assert graph.fused is not None
        before = graph.fused.calls
        got = graph.compute_into(recipe, names, torch.empty(count))
        want = eager.compute_into(recipe, names, torch.empty(count))
        assert graph.fused.enabled and graph.fused.calls > before
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), recipe.technique


def test_the_pools_ranked_magnitudes_read_off_its_orders_are_the_sorted_magnitudes(
    tiny_family,
):
    """The eager trims' sorted magnitudes come from the fused path's magnitude orders, not a
    second sort: equal to sorting |δ| per tensor, with exact zeros, −0.0 and ties."""
    from agent_forge.evomerge.pool import SourcePool
    from agent_forge.evomerge.sparsify import sort_segments

    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    pool = SourcePool(sources, "base", resident=True)
    store = pool._store("base")
    base = store.matrix[store.rows["base"]]
    for name in ("m1", "m2", "m3"):
        row = store.matrix[store.rows[name]]
        row.copy_(base + torch.round((row - base) * 64) / 64)  # ties at every magnitude
        row[::5] = base[::5]  # exact zeros
    names = list(store.offsets)
    deltas = pool.stack(["m1", "m2", "m3"], names, deltas=True)
    deltas[:, 1::7] = -0.0
    ranked = pool.ranked(["m1", "m2", "m3"], names)
    segments = list(store.offsets.values())
    for i in range(3):
        want = sort_segments(deltas[i], segments, torch.empty_like(deltas[i]))
        assert torch.equal(ranked[i].view(torch.int32), want.view(torch.int32))


# -- DARE's draw words -------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("shared", [False, True])
def test_draw_words_hold_three_10_bit_levels_drawn_by_each_segments_generator(count, shared):
    """Per segment, word row after word row, the segment generator's ``randint(0, 2³⁰)``
    (segments with generators of their own draw on threads; one generator shared by every
    segment draws them in order); input i's level is bits 10·(i % 3) … of row i // 3."""
    segments = [(0, 5), (5, 100_000), (100_005, 3)]
    rows = -(-count // 3)
    if shared:
        one = torch.Generator().manual_seed(1)
        generators = [one] * 3
    else:
        generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    words = draw_words(torch.empty(rows, 100_008, dtype=torch.int32), segments, generators)
    gen = torch.Generator().manual_seed(1)
    for (start, size), seed in zip(segments, (1, 2, 3), strict=True):
        gen = gen if shared else torch.Generator().manual_seed(seed)
        for row in range(rows):
            expected = torch.randint(0, 2**30, (size,), generator=gen, dtype=torch.int32)
            assert torch.equal(words[row, start : start + size], expected), (row, start)
    for i in range(count):
        level = level_of(words, i)
        assert torch.equal(level, (words[i // 3] // 1024 ** (i % 3)) % 1024), i
        assert 0 <= int(level.min()) and int(level.max()) < 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_draw_words_on_a_gpu_are_the_cpu_generators_across_chunks():
    """A CPU generator fills a device tensor in chunks of 2²⁰: the same words as on the CPU."""
    segments = [(0, 5), (5, 1_100_000), (1_100_005, 3)]

    def words(device):
        out = torch.empty(2, 1_100_008, dtype=torch.int32, device=device)
        return draw_words(out, segments, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])

    assert torch.equal(words("cuda").cpu(), words("cpu"))


def test_reused_draw_buffers_give_a_seeds_draws_again(tiny_family, monkeypatch):
    """Past its budget the draws cache recycles its oldest buffer for the next seed; a seed
    drawn again, into a recycled buffer, gives the same model as the first time."""
    from agent_forge.evomerge import graph

    monkeypatch.setattr(graph, "_DRAW_CACHE_MODELS", 2)  # two seeds of three inputs
    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    merger = AdvancedModelMerger(sources=sources, base="base", resident=True, fused_kernels="on")

    def merged(seed):
        recipe = Merge("dare_ties", INPUTS, {"density": 0.4}, BASE, seed=seed)
        return {n: p.detach().clone() for n, p in merger.materialize(recipe).named_parameters()}

    first = merged(1)
    for seed in (2, 3, 4):
        other = merged(seed)
        assert not all(torch.equal(other[n], first[n]) for n in first)
    assert len(merger.graph._draw_cache) < 4  # seed 1's draws were dropped
    again = merged(1)
    assert all(torch.equal(again[n], first[n]) for n in first)
    assert merger.graph.fused.enabled


@pytest.mark.parametrize("technique", ["dare_ties", "dare_linear"])
def test_the_compiled_dare_kernel_gives_the_eager_bits_on_five_inputs(technique):
    """Inputs in all three fields of a word and two in the last word; densities on and off
    the 2⁻¹⁰ grid, 0 and 1; the eager technique draws from the same generator."""
    from agent_forge.evomerge.techniques import (
        apply_technique,
        canonical_params,
        get_technique,
        resolved_params,
    )

    tech = get_technique(technique)
    gen = torch.Generator().manual_seed(3)
    deltas = torch.round(torch.randn(5, 3000, generator=gen) * 16) / 64  # zeros and sign ties
    base = torch.randn(3000, generator=gen)
    base[:10] = -0.0
    params = canonical_params(
        tech,
        {
            "weight": [0.3, 1.0, -0.2, 0.7, 0.5],
            "density": [0.5, 0.3, 1.0, 0.0, 0.9],
            "lambda": 0.8,
            "normalize": True,
        },
        5,
    )
    eager = apply_technique(tech, deltas, params, None, torch.Generator().manual_seed(7))
    draws = draw_words(
        torch.empty(2, 3000, dtype=torch.int32), [(0, 3000)], [torch.Generator().manual_seed(7)]
    )
    plan = plan_for(technique, resolved_params(tech, params, None))
    assert plan is not None and plan.modes == ("draw",) * 5
    out = torch.empty(3000)
    torch.compile(merge_kernel)(deltas, base, draws, out, *plan.arguments())
    assert torch.equal(out.view(torch.int32), (eager + base).view(torch.int32))


# -- common random numbers -----------------------------------------------------------------------


def test_dare_masks_of_one_seed_grow_with_density(streaming, tmp_path):
    """The draws depend on the seed and inputs, not the density: a DARE mask at density 0.3
    lies inside the mask at 0.6 (with draws per parameters it would not)."""
    masks = {}
    base = load_file(streaming.merge(Source("base"), tmp_path / "base") / "model.safetensors")
    for density in (0.3, 0.6):
        recipe = Merge(
            "dare_linear", [Source("m1")], {"density": density, "rescale": "none"}, BASE, seed=9
        )
        merged = load_file(streaming.merge(recipe, tmp_path / f"d{density}") / "model.safetensors")
        masks[density] = {n: merged[n] != base[n] for n in merged}
    delta = load_file(streaming.merge(Source("m1"), tmp_path / "m1") / "model.safetensors")
    total_small = total_large = 0
    for name, small in masks[0.3].items():
        large = masks[0.6][name]
        assert not torch.any(small & ~large), name
        changed = delta[name] != base[name]
        total_small += int(small.sum())
        total_large += int(large.sum())
        assert torch.all(large <= changed)
    assert 0.4 < total_small / total_large < 0.6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("technique", ["dare_ties", "della"])
def test_a_randomised_recipe_built_on_a_gpu_has_the_cpus_bytes(tiny_family, tmp_path, technique):
    """torch's CUDA and CPU generators give different numbers for one seed; recipes draw on
    the CPU, so a candidate a GPU worker scored is the model a CPU rebuilds from its recipe
    (up to float rounding: CUDA kernels may contract multiply-adds)."""
    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    recipe = Merge(technique, INPUTS, {"density": 0.5, "epsilon": 0.1}, BASE, seed=5)
    if technique == "dare_ties":
        recipe = Merge(technique, INPUTS, {"density": 0.5}, BASE, seed=5)
    cpu = load_file(
        AdvancedModelMerger(sources=sources, base="base").merge(recipe, tmp_path / "cpu")
        / "model.safetensors"
    )
    gpu = AdvancedModelMerger(sources=sources, base="base", device="cuda")
    streamed = load_file(gpu.merge(recipe, tmp_path / "gpu") / "model.safetensors")
    resident = AdvancedModelMerger(sources=sources, base="base", device="cuda", resident=True)
    held = {n: p.detach().cpu() for n, p in resident.materialize(recipe).named_parameters()}
    for name, tensor in cpu.items():  # other draws would drop other entries: far from close
        torch.testing.assert_close(streamed[name], tensor, rtol=1e-5, atol=1e-6)
        if name in held:
            torch.testing.assert_close(held[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["ties mixed", "ties per layer"])
def test_fused_ties_on_a_gpu_gives_the_cpus_values(tiny_family, tmp_path, case):
    """The row layout on the device: thresholds looked up there, tables moved there, the
    kernel in Triton (up to float rounding: CUDA kernels may contract multiply-adds)."""
    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    recipe = CASES[case]
    cpu = load_file(
        AdvancedModelMerger(sources=sources, base="base").merge(recipe, tmp_path / "cpu")
        / "model.safetensors"
    )
    gpu = AdvancedModelMerger(
        sources=sources, base="base", device="cuda", resident=True, fused_kernels="on"
    )
    held = {n: p.detach().cpu() for n, p in gpu.materialize(recipe).named_parameters()}
    kernels = gpu.graph.fused
    assert kernels is not None and kernels.calls > 0
    for name, tensor in cpu.items():
        if name in held:
            torch.testing.assert_close(held[name], tensor, rtol=1e-5, atol=1e-6)


# -- safety net and policy -----------------------------------------------------------------------


def test_a_kernel_whose_bits_differ_is_switched_off(tiny_family, caplog):
    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    merger = AdvancedModelMerger(sources=sources, base="base", resident=True, fused_kernels="on")
    eager = AdvancedModelMerger(sources=sources, base="base", resident=True, fused_kernels="off")
    kernels = merger.graph.fused
    assert kernels is not None and eager.graph.fused is None

    def off_by_one_ulp(*args):
        out = args[3]
        out.copy_(torch.nextafter(args[1], torch.tensor(float("inf"))))

    kernels._compiled = off_by_one_ulp
    recipe = CASES["ties"]
    with caplog.at_level(logging.WARNING):
        got = {n: p.detach().clone() for n, p in merger.materialize(recipe).named_parameters()}
    assert not kernels.enabled and "differ from the eager path" in caplog.text
    want = dict(eager.materialize(recipe).named_parameters())
    assert all(torch.equal(got[n], want[n].detach()) for n in got)


def test_auto_fuses_on_gpus_and_for_large_resident_models_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not wanted("auto", cpu, AUTO_MIN_ELEMENTS - 1)
    assert wanted("auto", cpu, AUTO_MIN_ELEMENTS)
    assert wanted("auto", cuda, 10)
    assert wanted("on", cpu, 10) and not wanted("off", cuda, AUTO_MIN_ELEMENTS)


def test_the_gpu_benchmark_contenders_compute_task_arithmetic_and_ties():
    """What ``benchmarks --what gpu`` times is the techniques themselves (here on the CPU)."""
    from agent_forge.evomerge.benchmarks import fused_contenders
    from agent_forge.evomerge.techniques import task_arithmetic, ties

    torch.manual_seed(0)
    base = torch.randn(64, 48)
    deltas = torch.round(torch.randn(3, 64, 48) * 64) / 4096  # ties at every threshold
    out = torch.empty(64, 48)
    runs = fused_contenders(base, deltas, out)
    weights = [1.0, 1.0, 1.0]
    expected = {
        "task_arithmetic": base + task_arithmetic(deltas, weight=weights, lam=1.0, normalize=False),
        "ties": base + ties(deltas, weight=weights, density=[0.5] * 3, lam=1.0, normalize=True),
    }
    for name, want in expected.items():
        runs[name]()
        assert torch.equal(out.view(torch.int32), want.view(torch.int32)), name


def test_an_evolution_run_is_the_same_fused_or_eager(tmp_path):
    """Materialisation is bit-identical either way, so every candidate scores the same and the
    search takes the same path."""
    from agent_forge.evomerge.config import create_default_config
    from agent_forge.evomerge.evolutionary_tournament import EvolutionaryMerger

    runs = {}
    for setting in ("on", "off"):
        config = create_default_config()
        config.output_dir = str(tmp_path / setting)
        config.evaluation_settings.fitness_sample_size = 24
        config.merge_settings.fused_kernels = setting
        config.evolution_settings = EvolutionSettings(
            population_size=6, num_generations=3, tournament_size=2, elite_size=1, patience=10
        )
        evolution = EvolutionaryMerger(config, config.output_dir)
        evolution.evolve()
        runs[setting] = {h: r["fitness"] for h, r in evolution.records.items()}
        kernels = evolution.executor.scorer.merger.graph.fused
        if setting == "on":
            assert kernels is not None and kernels.enabled and kernels.calls > 0
    assert runs["on"] == runs["off"] and len(runs["on"]) >= 12
