"""The toy world: grammar, renderer, prompt sets, and the exact ``shapes`` reward."""

from __future__ import annotations

import itertools
from importlib import resources

import numpy as np
import pytest
import torch
from tpdm_rl.rewards.shapes import analyse

from tpdm_rl.core.reward_registry import RewardError, build_reward
from tpdm_rl.core.toyworld import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    LATTICE,
    MIN_GAP,
    PLACED_SIZE,
    PLACES,
    SIZE_RANGE,
    TOY_PROMPT_SETS,
    Group,
    PlacedObject,
    Prompt,
    PromptError,
    Scene,
    ambiguity,
    parse_prompt,
    placed_box,
    prompt_set,
    render,
    sample_scene,
    shape_mask,
    toy_prompt_file,
)


def _images(scenes: list[Scene]) -> torch.Tensor:
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255.0


def test_renderer_is_deterministic_and_follows_the_layout_rules():
    a, b = sample_scene(123, split="any"), sample_scene(123, split="any")
    assert np.array_equal(render(a), render(b)) and a.prompt == b.prompt
    assert not np.array_equal(render(a), render(sample_scene(124, split="any")))
    kinds = set()
    for seed in range(600):
        sc = sample_scene(seed, split="any")
        kinds.add(sc.prompt.kind)
        img = render(sc)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert tuple(img[0, 0]) == BACKGROUNDS[sc.prompt.background]  # objects keep a 1 px border free
        assert 1 <= len(sc.objects) <= 4 and len(sc.objects) == sc.prompt.num_objects
        for o, p in itertools.combinations(sc.objects, 2):  # bounding boxes at least MIN_GAP apart
            gap_x = max(p.x0 - (o.x0 + o.size), o.x0 - (p.x0 + p.size))
            gap_y = max(p.y0 - (o.y0 + o.size), o.y0 - (p.y0 + p.size))
            assert max(gap_x, gap_y) >= MIN_GAP
        named = [(g.colour, g.shape, g.place) for g in sc.prompt.groups for _ in range(g.count)]
        assert [(o.colour, o.shape) for o in sc.objects] == [n[:2] for n in named]  # listed in the prompt's order
        quads = [(o.x0 // 32, o.y0 // 32) for o in sc.objects]  # every object inside its own quadrant
        assert len(set(quads)) == len(quads)
        assert all(((o.x0 + o.size - 1) // 32, (o.y0 + o.size - 1) // 32) == q for o, q in zip(sc.objects, quads))
        lo, hi = SIZE_RANGE[len(sc.objects)]
        for o, (_, _, place) in zip(sc.objects, named):
            assert o.x0 % LATTICE == o.y0 % LATTICE == o.size % LATTICE == 0  # on the VAE's latent grid
            assert 4 <= o.x0 and o.x0 + o.size <= 60 and 4 <= o.y0 and o.y0 + o.size <= 60
            if place is None:
                assert o.size >= 8 and lo <= o.size <= hi
            else:  # fixed by the prompt: PLACED_SIZE centred in the named quadrant
                q = PLACES.index(place)
                assert (o.x0, o.y0, o.size) == placed_box(place) and o.size == PLACED_SIZE
                assert (o.x0 // 32, o.y0 // 32) == (q % 2, q // 2)
                assert (o.x0 + o.size - 1) // 32 == o.x0 // 32 and (o.y0 + o.size - 1) // 32 == o.y0 // 32
            colours = {tuple(c) for c in img[o.y0:o.y0 + o.size, o.x0:o.x0 + o.size][shape_mask(o.shape, o.size)]}
            assert colours == {COLOURS[o.colour]}  # flat fill, exact palette colour
    assert kinds == set(KINDS)


def test_unplaced_objects_go_anywhere_and_placed_ones_stay_put():
    """The ambiguity: across seeds an unplaced object visits every quadrant, a placed one never moves."""
    free, fixed = set(), set()
    for seed in range(200):
        sc = sample_scene(seed, split="any", kind="mixed")
        named = [g.place for g in sc.prompt.groups for _ in range(g.count)]
        for o, place in zip(sc.objects, named):
            centre = ((2 * o.x0 + o.size) // 64, (2 * o.y0 + o.size) // 64)
            (free if place is None else fixed).add((place, centre) if place else centre)
    assert len(free) == 4 and all(c == (PLACES.index(p) % 2, PLACES.index(p) // 2) for p, c in fixed)


def test_shape_masks_fill_their_box_as_expected():
    for s in (8, 13, 26):
        sq, ci, tr = (shape_mask(k, s) for k in ("square", "circle", "triangle"))
        assert sq.all()
        assert 0.7 < ci.mean() < 0.85 and ci[s // 2].all() and ci[:, s // 2].all()
        assert 0.45 < tr.mean() < 0.65 and tr[-1].all() and tr[0].sum() <= 2  # apex up


def test_parser_round_trips_the_grammar():
    for seed in range(500):
        p = sample_scene(seed, split="any").prompt
        assert parse_prompt(p.text) == p
    p = parse_prompt("two red circles, a blue square and a yellow triangle on a white background")
    assert p.groups == (Group(2, "red", "circle"), Group(1, "blue", "square"), Group(1, "yellow", "triangle"))
    assert (p.num_objects, p.num_groups, p.background) == (4, 3, "white")


@pytest.mark.parametrize("text, groups", [
    ("a red circle on a black background", [(1, "red", "circle", None)]),
    ("a red circle in the top left on a black background", [(1, "red", "circle", "top left")]),
    ("four blue squares on a gray background", [(4, "blue", "square", None)]),
    ("a red circle in the top right and a blue square on a white background",
     [(1, "red", "circle", "top right"), (1, "blue", "square", None)]),
    ("a red circle and a blue square in the bottom left on a white background",
     [(1, "red", "circle", None), (1, "blue", "square", "bottom left")]),
    ("two green triangles and a blue square in the bottom right on a white background",
     [(2, "green", "triangle", None), (1, "blue", "square", "bottom right")]),
    ("a purple circle in the top left, a orange square in the bottom right and a yellow triangle in the top right "
     "on a black background", [(1, "purple", "circle", "top left"), (1, "orange", "square", "bottom right"),
                               (1, "yellow", "triangle", "top right")]),
    ("a red circle, two red squares and a blue circle in the bottom left on a gray background",
     [(1, "red", "circle", None), (2, "red", "square", None), (1, "blue", "circle", "bottom left")]),
    ("a red circle in the top left, a red square in the top right, a red triangle in the bottom left and "
     "a blue circle in the bottom right on a white background",
     [(1, "red", "circle", "top left"), (1, "red", "square", "top right"), (1, "red", "triangle", "bottom left"),
      (1, "blue", "circle", "bottom right")]),
    ("a red circle, a red square in the top right, a red triangle and a blue circle on a white background",
     [(1, "red", "circle", None), (1, "red", "square", "top right"), (1, "red", "triangle", None),
      (1, "blue", "circle", None)]),
    ("three yellow triangles and a green circle in the top left on a black background",
     [(3, "yellow", "triangle", None), (1, "green", "circle", "top left")]),
    ("two red circles and two blue squares on a white background", [(2, "red", "circle", None),
                                                                    (2, "blue", "square", None)]),
])
def test_every_form_of_the_grammar_parses(text, groups):
    p = parse_prompt(text)
    assert [(g.count, g.colour, g.shape, g.place) for g in p.groups] == groups and p.text == text
    assert p.num_unplaced == sum(c for c, *_, place in groups if place is None) == ambiguity(text)


def test_sampled_prompts_of_every_kind_round_trip():
    for kind in KINDS:
        for n in ((2, 3, 4) if kind == "mixed" else (1, 2, 3, 4)):
            for seed in range(40):
                p = parse_prompt(prompt_set(seed, 1, "any", places=True)[0])
                assert parse_prompt(p.text) == p
                sc = sample_scene(seed, n, split="any", kind=kind)
                assert sc.prompt.kind == kind and sc.prompt.num_objects == n
                assert parse_prompt(sc.prompt.text) == sc.prompt


def test_combinations_include_places_and_ignore_order():
    a = parse_prompt("a red circle in the top left and a blue square on a white background")
    b = parse_prompt("a blue square and a red circle in the top left on a white background")
    c = parse_prompt("a blue square and a red circle on a white background")
    assert a.combination == b.combination != c.combination
    assert c.combination == "white|1-blue-square;1-red-circle"  # unplaced: the first world's key (same split)


@pytest.mark.parametrize("bad, word", [
    ("a purpel circle on a white background", "'purpel' at word 2"),
    ("a red circle in the middle on a white background", "'middle' at word 6"),
    ("a red circle in top left on a white background", "'top' at word 5"),
    ("two red circles in the top left on a white background", "'in' at word 4"),
    ("a red circle in the top left and a blue square in the top left on a white background", "top left"),
    ("a red circle on a white background in the top left", "'in' at word 8"),
])
def test_malformed_place_prompts_name_the_word(bad, word):
    with pytest.raises(PromptError, match="not in the toy grammar") as e:
        parse_prompt(bad)
    assert word in str(e.value) and repr(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [
    "a red circle", "a red circle on a pink background", "one red circle on a white background",
    "two red circle on a white background", "a red circles on a white background",
    "a red circle, a blue square on a white background", "a red circle and a red circle on a white background",
    "three red circles and two blue squares on a white background", "a red  circle on a white background",
    "A red circle on a white background", "a teal circle on a white background",
])
def test_prompts_outside_the_grammar_are_refused_with_the_prompt_named(bad):
    with pytest.raises(PromptError, match="not in the toy grammar") as e:
        parse_prompt(bad)
    assert repr(bad) in str(e.value) and "\n" not in str(e.value)


def test_bundled_prompt_sets_are_current_and_disjoint_as_combinations():
    combos = {}
    for name, (_, _, split, fname, places) in TOY_PROMPT_SETS.items():
        text = resources.files("tpdm_rl.data").joinpath(fname).read_text()
        assert text == toy_prompt_file(name), f"{fname} is stale: regenerate with toyworld.toy_prompt_file"
        prompts = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        parsed = [parse_prompt(p) for p in prompts]
        assert all(p.heldout == (split == "heldout") for p in parsed)
        assert places or all(p.num_placed == 0 for p in parsed)  # the shipped backbone's sets: no places
        combos[(split, places)] = {p.combination for p in parsed}
    for places in (False, True):
        assert combos[("train", places)] and not combos[("train", places)] & combos[("heldout", places)]
    held = [parse_prompt(p) for p in toy_prompt_file("toy-heldout").splitlines()[1:]]
    assert [sum(p.num_objects == k for p in held) for k in (1, 2, 3, 4)] == [50, 50, 50, 50]
    for name in ("toy-places-train", "toy-places-heldout"):  # kinds balanced, mixed prompts have 2+ groups
        parsed = [parse_prompt(p) for p in toy_prompt_file(name).splitlines()[1:]]
        counts = [sum(p.kind == k for p in parsed) for k in KINDS]
        assert max(counts) - min(counts) <= 0.05 * len(parsed)
        assert all(p.num_groups >= 2 for p in parsed if p.kind == "mixed")
        assert {p.num_unplaced for p in parsed} == {0, 1, 2, 3, 4}
        assert {p.num_objects for p in parsed if p.kind != "mixed"} == {1, 2, 3, 4}


# ---------------------------------------------------------------------------------------------- the reward
def test_every_rendered_scene_scores_one():
    scenes = [sample_scene(s, split="any") for s in range(2000)]  # all three kinds: places are checked too
    assert sum(s.prompt.num_placed for s in scenes) > 1000
    a = analyse(_images(scenes), [s.prompt.text for s in scenes])
    assert a.exact.all() and torch.equal(a.score, torch.ones(2000))


def _scene(objects, bg="white") -> Scene:
    groups: dict[tuple[str, str], int] = {}
    for colour, shape, *_ in objects:
        groups[(colour, shape)] = groups.get((colour, shape), 0) + 1
    prompt = Prompt(tuple(Group(n, c, s) for (c, s), n in groups.items()), bg)
    return Scene(prompt, [PlacedObject(c, s, x, y, size) for c, s, x, y, size in objects])


BASE = [("red", "circle", 4, 4, 14), ("red", "circle", 30, 4, 14), ("blue", "square", 4, 34, 14),
        ("yellow", "triangle", 34, 36, 16)]


def _check(image_objects, prompt_scene, bg="white"):
    """Analyse an image with ``image_objects`` on ``bg`` against ``prompt_scene``'s prompt."""
    drawn = Scene(Prompt(prompt_scene.prompt.groups, bg),
                  [PlacedObject(c, s, x, y, z) for c, s, x, y, z in image_objects])
    return analyse(_images([drawn]), [prompt_scene.prompt.text])


@pytest.mark.parametrize("edit, lost", [
    ("none", set()),
    ("missing one of two", {"count:red circle"}),
    ("missing a single", {"colour:blue square", "shape:blue square", "count:blue square"}),
    ("extra", {"no extra"}),
    ("recoloured", {"colour:blue square"}),
    ("reshaped", {"shape:blue square"}),
    ("background", {"background"}),
])
def test_a_wrong_object_loses_exactly_its_constraint(edit, lost):
    target = _scene(BASE)  # two red circles, a blue square and a yellow triangle on a white background
    objs = list(BASE)
    bg = "white"
    if edit == "missing one of two":
        objs.pop(1)
    elif edit == "missing a single":
        objs.pop(2)
    elif edit == "extra":
        objs.append(("green", "square", 50, 20, 9))
    elif edit == "recoloured":
        objs[2] = ("green", "square", 4, 34, 14)
    elif edit == "reshaped":
        objs[2] = ("blue", "circle", 4, 34, 14)
    elif edit == "background":
        bg = "gray"
    a = _check(objs, target, bg)
    names = [f"{g.colour} {g.shape}" for g in target.prompt.groups]
    failed = set()
    for j, n in enumerate(names):
        failed |= {f"colour:{n}"} if not a.colour_ok[0, j] else set()
        failed |= {f"shape:{n}"} if not a.shape_ok[0, j] else set()
        failed |= {f"count:{n}"} if not a.count_ok[0, j] else set()
    failed |= set() if a.background_ok[0] else {"background"}
    failed |= set() if a.no_extra[0] else {"no extra"}
    assert failed == lost
    total = 3 * len(names) + 2
    assert int(a.total[0]) == total and a.score[0].item() == pytest.approx((total - len(lost)) / total)
    assert bool(a.exact[0]) == (not lost)


@pytest.mark.parametrize("drawn_at", ["top left", "top right", "bottom right", "bottom left"])
def test_a_misplaced_object_loses_exactly_its_place(drawn_at):
    text = ("a red circle in the top left, two blue squares and a yellow triangle in the bottom right "
            "on a white background")
    prompt = parse_prompt(text)
    triangle_at = "top right" if drawn_at == "bottom right" else "bottom right"
    free = [q for q in PLACES if q not in (drawn_at, triangle_at)]
    objs = [("red", "circle", *placed_box(drawn_at)), ("blue", "square", *placed_box(free[0])),
            ("blue", "square", *placed_box(free[1])), ("yellow", "triangle", *placed_box(triangle_at))]
    a = analyse(_images([Scene(prompt, [PlacedObject(*o) for o in objs])]), [text])
    assert int(a.total[0]) == 3 * 3 + 2 + 2  # two placed groups add one constraint each
    lost = {prompt.groups[j].colour for j in range(3) if not a.place_ok[0, j]}
    expected = {"red"} - ({"red"} if drawn_at == "top left" else set())
    expected |= {"yellow"} if drawn_at == "bottom right" else set()
    assert lost == expected
    assert a.colour_ok[0, :3].all() and a.shape_ok[0, :3].all() and a.count_ok[0, :3].all() and a.no_extra[0]
    assert a.score[0].item() == pytest.approx((13 - len(expected)) / 13)


def test_scoring_is_batched_and_matches_one_at_a_time():
    scenes = [sample_scene(s, split="any") for s in range(12)]
    imgs = _images(scenes)
    imgs[3] = imgs[3].flip(-1).roll(7, dims=-1)  # some images with mistakes
    imgs[5] = imgs[5] * 0.7
    prompts = [s.prompt.text for s in scenes[::-1]]  # mismatched prompts: most constraints fail
    together = analyse(imgs, prompts)
    alone = torch.cat([analyse(imgs[i:i + 1], prompts[i:i + 1]).score for i in range(12)])
    assert torch.equal(together.score, alone) and (together.score < 1).any()


def test_shapes_reward_is_registered_and_refuses_prompts_outside_the_grammar():
    r = build_reward("shapes")
    scenes = [sample_scene(s, split="any") for s in range(3)]
    scores, extra = r.score_details(_images(scenes), [s.prompt.text for s in scenes])
    assert torch.equal(scores, torch.ones(3)) and torch.equal(extra["exact"], torch.ones(3))
    with pytest.raises(RewardError, match="a photo of a cat"):
        r.score(_images(scenes[:1]), ["a photo of a cat"])


# ---------------------------------------------------------------------------------------------- eval's classes
def test_complexity_report_groups_by_unplaced_objects_and_by_objects(tmp_path):
    from tpdm_rl.evaluation.plots import plot_complexity
    from tpdm_rl.evaluation.report import complexity_lines
    from tpdm_rl.evaluation.run import MethodResult, complexity_report

    prompts = ["a red circle in the top left on a white background",  # 1 object, 0 unplaced
               "a red circle on a white background",  # 1, 1
               "a red circle in the top left and two blue squares on a black background",  # 3, 2
               "two red circles and two blue squares on a gray background"]  # 4, 4
    nfe = torch.tensor([2.0, 4.0, 6.0, 8.0])  # a TPM whose steps follow ambiguity exactly

    def result(name: str, n: torch.Tensor) -> MethodResult:
        z = torch.zeros(4)
        return MethodResult(name, n, n, 0.0, 0.0, z, z, {"shapes": torch.tensor([1.0, 0.5, 0.5, 0.25])}, [], [],
                            torch.zeros(0))

    results = {"tpm": result("tpm", nfe), "fixed:4": result("fixed:4", torch.full((4,), 4.0))}
    cx = complexity_report(results, prompts, list(results))
    assert set(cx["nfe_by_unplaced"]["tpm"]) == {"0", "1", "2", "4"}
    assert cx["nfe_by_unplaced"]["tpm"]["2"]["mean"] == 6.0 and cx["nfe_by_unplaced"]["tpm"]["0"]["n"] == 1
    assert set(cx["nfe_by_objects"]["tpm"]) == {"1", "3", "4"} and cx["nfe_by_objects"]["tpm"]["1"]["mean"] == 3.0
    assert cx["scores_by_unplaced"]["tpm"]["shapes"]["4"]["mean"] == 0.25
    assert cx["spearman_tpm_nfe"]["unplaced"]["rho"] == pytest.approx(1.0)
    report = {"complexity": cx, "metrics": ["shapes"]}
    text = "\n".join(complexity_lines(report))
    assert "NFE by number of unplaced" in text and "shapes by number of unplaced" in text and "object(s)" in text
    plot_complexity(tmp_path / "steps_vs_complexity.png", report)
    assert (tmp_path / "steps_vs_complexity.png").stat().st_size > 0
