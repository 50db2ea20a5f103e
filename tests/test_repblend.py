"""RepBlend (docs/methods.md#repblend): the frozen-encoder student, representation blending and symmetric projection
matching as options of the one matching engine; the properties of REFERENCE_REPBLEND §6, on float64 toy heads over a
toy frozen encoder, against references written here from the equations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy import stats

from benchmark.losses import get_loss
from benchmark.requirements import BuildContext, get_artifact_kind
from benchmark.models.projection import ProjectionHead
from benchmark.models.student import FlatStudent
from benchmark.models.towers import ConvNet
from matching_fixtures import TEXT_DIM, make_task, random_state, write_experts
from matching_fixtures import single_thread  # noqa: F401  (autouse)
from methods.lors import LoRS
from methods.matching import ConfigError, EngineConfig, MatchingEngine
from methods.matching.artifacts import head_experts_requirement
from methods.matching.blend import Blend, draw_blend
from methods.matching.engine import Matcher, PlanSampler, StepPlan, SynState
from methods.matching.heads import HeadExpertCollection, load_flat_into, make_heads
from methods.repblend import RepBlend

DT = torch.float64
N, B, P = 10, 4, 3
HEADS = {"student": "heads", "blend_alpha": 1.0, "similarity": "lowrank", "sim_rank": 3, "loss": "wbce",
         "dtype": "float64", "syn_steps": P, "batch_size": B, "iterations": 1, "lr_init_img": 0.05,
         "lr_init_txt": 0.07}


def config(**over) -> EngineConfig:
    return EngineConfig.from_params(dict(HEADS, **over), N)


def toy_encoder(seed: int = 0) -> ConvNet:
    """A frozen 2-block ConvNet on 8 px images: 8-d features."""
    torch.manual_seed(seed)
    return ConvNet(width=2, depth=2, image_size=8).to(DT)


def setup(cfg: EngineConfig, seed: int = 0, dropout: float = 0.1, blends: str = "draw"):
    """(matcher, syn, θ0, θ*, plan) with random data, expert endpoints and a plan whose batches repeat samples."""
    enc = toy_encoder(seed)
    flat = FlatStudent(make_heads(TEXT_DIM, enc.out_dim, 0.07, dropout, 8, seed=seed + 1).to(DT))
    matcher = Matcher(flat, cfg, "cpu", enc)
    g = torch.Generator().manual_seed(seed)
    syn, th0, th1 = random_state(flat, cfg, N, g)
    sampler = PlanSampler(g, N, B, 1, (0, 1), cfg.syn_steps, 1.0 if blends == "draw" else 0.0)
    return matcher, syn, th0, th1, sampler.next()


def grads_of(matcher, syn, th0, th1, plan):
    res = matcher.step(syn, th0, th1, plan)
    return res, {k: v.clone() for k, v in res.grads.items()}


# ------------------------------------------------------------------------------------------------ references
def batch_target(syn: SynState, sim: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    r = sim["sim_l"].shape[1]
    return torch.diag(sim["sim_a"][idx]) + (syn.sim.alpha / r) * sim["sim_l"][idx] @ sim["sim_r"][idx].T


def ref_loss(matcher: Matcher, th_img, th_txt, X, T, S, idx, blend: Blend | None) -> torch.Tensor:
    """ℓ = WBCE(s · rownorm(h_img(M f_enc(X_B))) rownorm(h_txt(M T_B))ᵀ, S_B), with M as a dense matrix."""
    u, t = matcher.encoder(X[idx]), T[idx]
    if blend is not None:
        m = blend.matrix(DT)
        u, t = m @ u, m @ t
    f = matcher.flat
    logits = f.logit_scale * f.embed_images(u, th_img) @ f.embed_texts(t, th_txt).T
    return get_loss("wbce")(logits, S)


def reference_tesla(matcher: Matcher, syn: SynState, th0, th1, plan: StepPlan):
    """J(X, T, a, L, R, η) of the detached chain, blending inside every ℓ_i, by autograd on full-size leaves."""
    cfg = matcher.cfg
    X, T = syn.images.clone().requires_grad_(), syn.texts.clone().requires_grad_()
    sim = {k: v.clone().requires_grad_() for k, v in syn.sim.tensors.items()}
    eta = syn.lr.clone().requires_grad_()
    blends = plan.blends or [None] * len(plan.batches)
    bars, th = [], {m: th0[m].clone() for m in th0}
    for idx, bl in zip(plan.batches, blends):  # θ̄_i: the forward chain with η̄, constants
        bars.append(th)
        ti, tt = th["img"].clone().requires_grad_(), th["txt"].clone().requires_grad_()
        S = batch_target(syn, {k: v.detach() for k, v in sim.items()}, idx)
        gi, gt = torch.autograd.grad(ref_loss(matcher, ti, tt, X.detach(), T.detach(), S, idx, bl), (ti, tt))
        th = {"img": th["img"] - float(syn.lr[0]) * gi, "txt": th["txt"] - float(syn.lr[1]) * gt}
    G = {"img": 0, "txt": 0}
    for idx, bl, bar in zip(plan.batches, blends, bars):
        ti, tt = bar["img"].clone().requires_grad_(), bar["txt"].clone().requires_grad_()
        loss = ref_loss(matcher, ti, tt, X, T, batch_target(syn, sim, idx), idx, bl)
        gi, gt = torch.autograd.grad(loss, (ti, tt), create_graph=True)
        G = {"img": G["img"] + gi, "txt": G["txt"] + gt}
    d = {m: (th0[m] - th1[m]).square().sum() for m in th0}
    tot = d["img"] + d["txt"]
    w = {m: (1 / tot if cfg.normalize == "merged" else 1 / d[m]) for m in d}
    res = {m: th0[m] - eta[k] * G[m] - th1[m] for k, m in enumerate(("img", "txt"))}
    J = sum(w[m] * res[m].square().sum() for m in res)
    gx, gt, *gs = torch.autograd.grad(J, (X, T, *sim.values()))
    # the η-gradient: separate form, G held constant (REFERENCE_REPBLEND §2.5)
    Gc = {m: G[m].detach() for m in G}
    J_sep = sum((th0[m] - eta[k] * Gc[m] - th1[m]).square().sum() / d[m] for k, m in enumerate(("img", "txt")))
    (ge,) = torch.autograd.grad(J_sep, eta)
    return J.detach(), {"images": gx, "texts": gt, **dict(zip(sim, gs)), "lr": ge}


def assert_close(a: dict, b: dict, rtol: float = 1e-9) -> None:
    for k in b:
        scale = float(b[k].abs().max()) or 1.0
        err = float((a[k] - b[k]).abs().max()) / scale
        assert err < rtol, f"{k}: relative error {err:.3g}"
        assert float(b[k].abs().max()) > 0, f"{k} gets no gradient (the comparison would be vacuous)"


# ------------------------------------------------------------------------------------------------ §6 properties
@pytest.mark.parametrize("which", ["lambda_one", "identity_perm"])
def test_blending_off_equals_the_sm_only_student_bit_for_bit(which):
    """§6.1: with λ = 1 or π = identity, the step is the frozen-encoder + two-head student's without blending."""
    cfg = config(inner_dropout="replay")
    matcher, syn, th0, th1, plan = setup(cfg)
    if which == "lambda_one":
        blends = [Blend(1.0, b.perm) for b in plan.blends]
    else:
        blends = [Blend(b.lam, torch.arange(B)) for b in plan.blends]
    assert all(b.perm.tolist() != list(range(B)) for b in plan.blends) or which == "identity_perm"
    with_blend, g1 = grads_of(matcher, syn, th0, th1, dataclasses.replace(plan, blends=blends))
    without, g0 = grads_of(matcher, syn, th0, th1, dataclasses.replace(plan, blends=None))
    assert torch.equal(with_blend.objective, without.objective)
    for k in g0:
        assert torch.equal(g1[k], g0[k]), k
    drawn, g2 = grads_of(matcher, syn, th0, th1, plan)  # and a real blend does change the step
    assert not torch.equal(g2["images"], g0["images"])


def test_reduction_to_lors(tmp_path):
    """§6.2: RepBlend's options with the trainable tower in place of frozen encoder + h_img and blending off are
    LoRS: the same distilled set, bit for bit."""
    experts = write_experts(tmp_path / "experts", n_experts=2, epochs=3)
    shared = {"dtype": "float64", "iterations": 2, "syn_steps": 2, "batch_size": 4, "sim_rank": 3}
    rb = dict(RepBlend.defaults["tiny"], student="full", blend_alpha=0.0, **shared)
    lors = dict(LoRS.defaults["tiny"], bug_compat={"lr_grad_separate_norm": True}, **shared)
    runs = []
    for name, params in (("rb", rb), ("lors", lors)):
        task = make_task(tmp_path / name, params, budget=8, experts=experts)
        runs.append(MatchingEngine(task, EngineConfig.from_params(params, 8), "same-name").run())
    for k, v in runs[0].phases[0].tensors().items():
        assert torch.equal(v, runs[1].phases[0].tensors()[k]), k
    assert runs[0].phases[0].lr_img == runs[1].phases[0].lr_img


def test_blend_matrix_rows_sum_to_one_and_keep_the_batch_mean():
    """§6.3: M = λI + (1−λ)P is row-stochastic and doubly stochastic (P a permutation), so the batch mean is kept;
    ``apply`` is M v."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        bl = draw_blend(g, 7, 1.0)
        m = bl.matrix()
        assert torch.allclose(m.sum(1), torch.ones(7, dtype=DT), atol=1e-15)
        v = torch.randn(7, 5, dtype=DT, generator=g)
        assert torch.allclose(bl.apply(v), m @ v, atol=1e-14)
        assert torch.allclose(bl.apply(v).mean(0), v.mean(0), atol=1e-14)


@pytest.mark.parametrize("dropout", ["off", "replay"])
def test_pass_four_replays_pass_three_exactly(dropout):
    """§6.4: the gradients recomputed in the data-gradient pass (stored (λ, π), same masks) are the forward's."""
    cfg = config(inner_dropout=dropout, retain_graph=False)
    matcher, syn, th0, th1, plan = setup(cfg)
    matcher._feats = matcher._features(syn, plan)
    eta = [float(v) for v in syn.lr]
    thetas, _, G, kept = matcher._forward(syn, th0, plan, eta, keep=False)
    again = {"img": torch.zeros_like(G["img"]), "txt": torch.zeros_like(G["txt"])}
    for i in range(P):
        gi, gt, *_ = matcher._step_graph(syn, thetas, kept, i, plan)
        again["img"] += gi.detach()
        again["txt"] += gt.detach()
    assert torch.equal(again["img"], G["img"]) and torch.equal(again["txt"], G["txt"])


@pytest.mark.parametrize("normalize, encoder_grad, retain", [
    ("separate", "accumulate", False), ("merged", "accumulate", False), ("separate", "accumulate", True),
    ("separate", "per_step", False), ("merged", "per_step", True)])
def test_gradients_equal_autograd_of_the_detached_chain_with_blending_inside(normalize, encoder_grad, retain):
    """§6.5: data, S and η gradients of the engine equal autograd of J (detached chain, blending inside ℓ_i,
    first order through the frozen encoder), whether the first pass keeps its graphs or the second recomputes."""
    cfg = config(inner_dropout="off", normalize=normalize, encoder_grad=encoder_grad, retain_graph=retain,
                 bug_compat={"lr_grad_separate_norm": True})
    matcher, syn, th0, th1, plan = setup(cfg)
    assert len(torch.cat(plan.batches)) > len(torch.unique(torch.cat(plan.batches)))  # samples repeat across steps
    res, got = grads_of(matcher, syn, th0, th1, plan)
    J, want = reference_tesla(matcher, syn, th0, th1, plan)
    assert abs(float(res.objective - J)) < 1e-12 * float(J)
    assert_close(got, want)


def test_feature_accumulation_equals_per_step_vjps():
    """§6.5: ∂J/∂U summed over the steps, then one encoder backward per sample, = a VJP through f_enc per step."""
    grads = {}
    for mode in ("accumulate", "per_step"):
        cfg = config(encoder_grad=mode)
        grads[mode] = grads_of(*setup(cfg))[1]
    assert_close(grads["accumulate"], grads["per_step"], rtol=1e-12)


def test_frozen_encoder_gets_no_gradient_and_does_not_change():
    """§6.6: after a step and after the outer update, f_enc's weights are untouched and hold no gradient."""
    matcher, syn, th0, th1, plan = setup(config())
    before = {k: v.clone() for k, v in matcher.encoder.state_dict().items()}
    grads_of(matcher, syn, th0, th1, plan)
    for k, v in matcher.encoder.named_parameters():
        assert v.grad is None and not v.requires_grad, k
        assert torch.equal(v, before[k]), k


def test_paper_head_sizes_and_flat_order():
    """§6.6: |θ^img| = 10,626,048 (2304→2304) and |θ^txt| = 7,087,104 (768→2304), flattened in the order of the
    published timestamps: proj.w, proj.b, fc.w, fc.b, ln.w, ln.b."""
    flat = FlatStudent(make_heads(768, 2304, 0.07, 0.1, 224, seed=0))
    assert flat.numel("img") == 10_626_048 and flat.numel("txt") == 7_087_104
    order = ["projection.weight", "projection.bias", "fc.weight", "fc.bias", "layer_norm.weight", "layer_norm.bias"]
    assert flat.names["img"] == order and flat.names["txt"] == order
    assert sum(p.numel() for p in ProjectionHead(2304, 2304).parameters()) == 10_626_048


def test_merged_is_half_the_separate_form_when_the_distances_agree():
    """§6.7: with D_img = D_txt, J_merged = J_separate / 2 and the data gradients halve; the η-gradient is the
    same under both forms."""
    out = {}
    for normalize in ("separate", "merged"):
        cfg = config(inner_dropout="off", normalize=normalize, bug_compat={"lr_grad_separate_norm": True})
        matcher, syn, th0, th1, plan = setup(cfg)
        d = {m: (th1[m] - th0[m]) for m in th0}
        th1 = {m: th0[m] + d[m] / d[m].norm() for m in th0}  # D_img = D_txt = 1
        out[normalize] = grads_of(matcher, syn, th0, th1, plan)
    (js, gs), (jm, gm) = out["separate"], out["merged"]
    assert abs(float(jm.objective) - float(js.objective) / 2) < 1e-12
    assert_close({k: 2 * v for k, v in gm.items() if k != "lr"}, {k: v for k, v in gs.items() if k != "lr"})
    assert torch.allclose(gm["lr"], gs["lr"], rtol=1e-12, atol=0)


def test_lambda_is_uniform_for_alpha_one_and_one_when_off():
    """§6.8: λ ~ Beta(1, 1) = U(0, 1) passes a KS test; α_b ≤ 0 draws nothing (λ ≡ 1) and leaves every other
    random stream as it is without blending."""
    g = torch.Generator().manual_seed(0)
    lams = [bl.lam for _ in range(400) for bl in PlanSampler(g, N, B, 2, (0, 2), 5, 1.0).next().blends]
    assert stats.kstest(lams, "uniform").pvalue > 0.01
    assert stats.kstest([draw_blend(g, B, 0.2).lam for _ in range(500)], "uniform").pvalue < 1e-6  # the test bites
    for alpha in (0.0, -1.0):
        on = PlanSampler(torch.Generator().manual_seed(1), N, B, 2, (0, 2), 5, alpha)
        plain = PlanSampler(torch.Generator().manual_seed(1), N, B, 2, (0, 2), 5)
        for _ in range(5):
            a, b = on.next(), plain.next()
            assert a.blends is None
            assert a.seeds == b.seeds and all(torch.equal(x, y) for x, y in zip(a.batches, b.batches))


def test_target_is_not_blended():
    """§6.9: the loss receives S_B unchanged: a blended step equals the reference with unmixed S_B, and differs
    from one whose target is mixed as M S_B Mᵀ."""
    cfg = config(inner_dropout="off")
    matcher, syn, th0, th1, plan = setup(cfg)
    idx, bl = plan.batches[0], plan.blends[0]
    th = {m: th0[m].clone() for m in th0}
    S = batch_target(syn, syn.sim.tensors, idx)
    feats = matcher.encoder(syn.images)
    got = matcher.inner_loss(th["img"], th["txt"], feats[idx], syn.texts[idx], S, bl)
    matcher.accumulate = False
    want = ref_loss(matcher, th["img"], th["txt"], syn.images, syn.texts, S, idx, bl)
    mixed = ref_loss(matcher, th["img"], th["txt"], syn.images, syn.texts, bl.matrix() @ S @ bl.matrix().T, idx, bl)
    assert torch.allclose(got, want, rtol=1e-13) and not torch.allclose(got, mixed, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ the method
@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return write_experts(tmp_path_factory.mktemp("experts"), n_experts=2, epochs=3)


def tiny_params(**over):
    return dict(RepBlend.defaults["tiny"], dtype="float64", batch_size=4, iterations=2,
                head_experts={"count": 2, "epochs": 2, "lr_img": 0.1, "lr_txt": 0.1, "batch_size": 8, "seed": 0},
                **over)


def prepare_heads(tmp_path, params, experts, budget: int = 8):
    """A task whose prepared root holds the head experts ``params`` require, built by the registered artifact kind."""
    task = make_task(tmp_path, params, budget=budget, experts=experts)
    req = head_experts_requirement(EngineConfig.from_params(params, budget))
    root = tmp_path / "prepared"
    ctx = BuildContext(experts.directory, root / req.id, False, student=task.student, device="cpu",
                       load_train=lambda: task.train, train_id="random-train")
    get_artifact_kind(req.kind).build(req, ctx)
    task.prepared = root
    return task


def test_engine_run_matches_head_experts_over_expert_zeros_encoder(tmp_path, experts):
    """The method end to end: the frozen encoder is expert 0's image tower at its last epoch; the teacher is the
    prepared head-only experts; the encoder is unchanged and every distilled tensor finite."""
    params = tiny_params()
    task = prepare_heads(tmp_path, params, experts)
    engine = MatchingEngine(task, EngineConfig.from_params(params, 8), "repblend")
    want = torch.cat([p.reshape(-1) for p in engine.matcher.encoder.parameters()])
    assert torch.equal(want, experts[0].read("img", experts[0].num_timestamps - 1).to(DT))
    dset = engine.run()
    assert torch.equal(torch.cat([p.reshape(-1) for p in engine.matcher.encoder.parameters()]), want)
    teacher = dset.meta["teacher"][0]
    assert teacher["kind"] == "head-experts" and teacher["encoder"]["expert"] == 0
    assert engine.flat.numel("img") == 2 * (64 * 64 + 64) + 2 * 64  # h_img: 64→64 over the 64-d tiny tower
    assert all(torch.isfinite(v).all() for v in dset.phases[0].tensors().values())


def test_without_prepared_head_experts_the_engine_names_mmdd_prepare(tmp_path, experts):
    params = tiny_params()
    with pytest.raises(FileNotFoundError, match="mmdd prepare --method repblend"):
        MatchingEngine(make_task(tmp_path, params, experts=experts), EngineConfig.from_params(params, 8), "repblend")


def head_trajectories(task, params) -> list[dict[str, list[torch.Tensor]]]:
    directory = task.prepared_dir(head_experts_requirement(EngineConfig.from_params(params, 8)))
    return [{m: [e.read(m, t) for t in range(e.num_timestamps)] for m in ("img", "txt")}
            for e in HeadExpertCollection(directory)]


def test_head_experts_stop_at_the_last_epoch_the_phases_reach(tmp_path, experts):
    """Only the epochs a start window can reach are trained, and they are the full-length experts' first epochs."""
    short_p, full_p = tiny_params(start_window=[0, 1]), tiny_params(start_window=[0, 2])  # E = 1: epochs 0..1 / 0..2
    short = head_trajectories(prepare_heads(tmp_path / "a", short_p, experts), short_p)
    full = head_trajectories(prepare_heads(tmp_path / "b", full_p, experts), full_p)
    assert {len(t["img"]) for t in short} == {2} and {len(t["img"]) for t in full} == {3}
    for a, b in zip(short, full, strict=True):
        assert all(torch.equal(a[m][e], b[m][e]) for m in a for e in (0, 1))
    with pytest.raises(ConfigError, match="head_experts.epochs"):
        RepBlend.requirements(tiny_params(start_window=[0, 3]), 8)


def test_experts_and_evaluation_never_blend(tmp_path, experts):
    """§6.9: blending exists only in the distillation inner loop: α_b = 1 and α_b = 0 require the same head experts
    (one prepared artifact), and a student the harness trains on the set is the same under either value."""
    from benchmark.evaluation import EvalConfig, train_student
    from matching_fixtures import tiny_student_config

    on, off = tiny_params(blend_alpha=1.0), tiny_params(blend_alpha=0.0)
    assert RepBlend.requirements(on, 8) == RepBlend.requirements(off, 8)
    task = prepare_heads(tmp_path, on, experts)
    dset = MatchingEngine(task, EngineConfig.from_params(on, 8), "repblend").run()
    cfg = EvalConfig(students=1, epochs=2, batch_size=4, eval_every=1)
    models = []
    for alpha in (1.0, 0.0):
        dset.meta["params"] = dict(dset.meta["params"], blend_alpha=alpha)
        models.append(train_student(dset, tiny_student_config(), cfg, seed=5, device="cpu"))
    for (k, v), w in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("params, match", [
    ({"student": "full", "blend_alpha": 1.0}, "'blend_alpha'"),
    ({"unroll": "full"}, "'student'"),
    ({"encoder_grad": "sideways"}, "'encoder_grad'"),
    ({"head_experts": {"count": 0}}, "head_experts.count"),
    ({"head_experts": {"epoch": 3}}, "unknown field"),
    ({"teacher": "shortcut(0, 2)"}, "'teacher'"),
])
def test_bad_options_name_the_field(params, match):
    with pytest.raises(ConfigError, match=match):
        config(**params)


def test_pretrained_encoder_needs_published_weights(tmp_path, experts):
    params = tiny_params(frozen_encoder="pretrained")
    task = make_task(tmp_path, params, budget=8, experts=experts)
    with pytest.raises(ValueError, match="frozen_encoder: expert"):
        MatchingEngine(task, EngineConfig.from_params(params, 8), "repblend")


def test_encoder_weights_must_fit_the_tower():
    with pytest.raises(ValueError, match="rerun `mmdd experts`"):
        load_flat_into(toy_encoder(), torch.zeros(3), "expert 0")


def test_paper_rows_and_requirements():
    """The published rows (REFERENCE_REPBLEND §3) and what each profile needs from the harness."""
    coco = RepBlend.resolve_params("paper", "coco", 500)
    assert (coco["lr_img"], coco["lr_sim"], coco["sim_rank"], coco["normalize"]) == (5000.0, 500.0, 40, "merged")
    f500 = RepBlend.resolve_params("paper", "flickr30k", 500)
    assert (f500["start_window"], f500["batch_size"], f500["sim_alpha"]) == ([0, 3], 20, 0.01)
    f100 = RepBlend.resolve_params("paper", "flickr30k", 100)
    assert (f100["lr_img"], f100["sim_rank"], f100["sim_alpha"], f100["normalize"]) == (100.0, 10, 3.0, "separate")
    assert f100["frozen_encoder"] == "pretrained" and f100["blend_alpha"] == 1.0
    assert [r.kind for r in RepBlend.requirements(f100, 100)] == ["head-experts"]
    quick = RepBlend.resolve_params("quick", "shapes", 100)
    quick_reqs = RepBlend.requirements(quick, 100)
    assert [r.kind for r in quick_reqs] == ["experts", "head-experts"]
    assert quick_reqs[1].params["epochs"] == 2 and quick_reqs[1].params["count"] == 8  # windows [0, 2), E = 1
