"""The DPA-1 attention block (dpsnake.engine.attn.attention): forward equals DeePMD-kit's dpmodel
NeighborGatedAttention, backward equals central finite differences, FP32 and CuPy agree with FP64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import cupy_or_skip, rel_err

from dpsnake.engine.attn.attention import AttentionLayers, attention_backward, attention_forward
from dpsnake.errors import UserError

B, NNEI, E, H = 5, 9, 8, 6

# (layers, dotr, normalize, smooth, extra constructor args)
CASES = [(0, False, True, True, {})]
CASES += [(nl, d, nz, sm, {}) for nl in (1, 2) for d in (False, True) for nz in (False, True) for sm in (False, True)]
CASES += [
    (2, True, True, True, {"temperature": 0.7}),
    (1, False, False, False, {"temperature": 1.3}),
    (2, True, False, True, {"scaling_factor": 0.3}),
    (2, True, True, False, {"nobias": True}),
]
IDS = [f"L{c[0]}-dotr{int(c[1])}-norm{int(c[2])}-smooth{int(c[3])}" + "".join(f"-{k}" for k in c[4]) for c in CASES]


def reference(layers, dotr, normalize, smooth, extra, seed=0):
    """DeePMD-kit's NeighborGatedAttention with random weights (layer norms too), and its serialized dict."""
    from deepmd.dpmodel.descriptor.dpa1 import NeighborGatedAttention

    extra = dict(extra)
    nobias = extra.pop("nobias", False)
    net = NeighborGatedAttention(
        layers, NNEI, E, H, dotr=dotr, normalize=normalize, smooth=smooth, ln_eps=1e-5, precision="float64",
        seed=seed, **extra,
    )  # fmt: skip
    data = net.serialize()
    rng = np.random.default_rng(seed + 100)
    for lay in data["attention_layers"]:
        v = lay["attn_layer_norm"]["@variables"]
        v["w"] = 1.0 + 0.3 * rng.standard_normal(E)
        v["b"] = 0.3 * rng.standard_normal(E)
        if nobias:
            for proj in ("in_proj", "out_proj"):
                lay["attention_layer"][proj]["bias"] = False
                lay["attention_layer"][proj]["@variables"]["b"] = None
            lay["attention_layer"]["bias"] = False
    return NeighborGatedAttention.deserialize(data), data


def inputs(seed=1, nb=B):
    """G, mask (centre 0 full, centre 1 empty, others random), unit vectors r and switch sw (0 on empty)."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((nb, NNEI, E))
    mask = rng.random((nb, NNEI)) < 0.7
    mask[0] = True
    mask[1] = False
    r = rng.standard_normal((nb, NNEI, 3))
    r /= np.linalg.norm(r, axis=-1, keepdims=True)
    r[~mask] = 0.0
    sw = rng.uniform(0.05, 1.0, (nb, NNEI, 1)) * mask[..., None]
    return G, mask, r, sw


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_equals_deepmd(case):
    net, data = reference(*case)
    p = AttentionLayers.from_serialized(data).to(np, np.float64)
    G, mask, r, sw = inputs()
    with np.errstate(invalid="ignore"):  # DeePMD-kit's softmax of an all -inf row (zeroed after)
        want = net.call(G, mask, input_r=r, sw=sw)
    got, _ = attention_forward(p, G, mask, r, sw)
    assert np.isfinite(got).all()
    assert rel_err(got, want) < 1e-12
    if case[0]:
        assert np.abs(got - G).max() > 0.1  # the block did something


@pytest.mark.parametrize("smooth", [False, True])
def test_forward_many_centres(smooth):
    net, data = reference(2, True, True, smooth, {})
    p = AttentionLayers.from_serialized(data).to(np, np.float64)
    G, mask, r, sw = inputs(seed=7, nb=3000)
    with np.errstate(invalid="ignore"):
        want = net.call(G, mask, input_r=r, sw=sw)
    assert rel_err(attention_forward(p, G, mask, r, sw)[0], want) < 1e-12


def test_from_serialized_fields_and_errors():
    _, data = reference(2, True, False, True, {"temperature": 0.7})
    p = AttentionLayers.from_serialized(data)
    assert (p.nnei, p.embed_dim, p.hidden_dim, p.num_heads) == (NNEI, E, H, 1)
    assert p.dotr and not p.normalize and p.smooth and p.scaling == 0.7 and len(p.layers) == 2
    assert p.layers[0].w_in.shape == (E, 3 * H) and p.layers[1].gamma.shape == (E,)
    _, data = reference(1, False, True, False, {"scaling_factor": 2.0})
    p = AttentionLayers.from_serialized(data)
    assert not p.smooth and p.scaling == pytest.approx((H * 2.0) ** -0.5, rel=1e-15)
    assert p.to(np, np.float32) is p.to(np, np.float32)
    assert p.to(np, np.float32).layers[0].w_in.dtype == np.float32

    def bad(edit, word):
        _, d = reference(1, False, True, True, {})
        edit(d)
        with pytest.raises(UserError, match=word):
            AttentionLayers.from_serialized(d)

    bad(lambda d: d["attention_layers"][0]["attention_layer"].update(num_heads=2), "num_heads")
    bad(
        lambda d: d["attention_layers"][0]["attention_layer"]["in_proj"].update(activation_function="tanh"),
        "activation",
    )
    bad(lambda d: d["attention_layers"][0]["attention_layer"].update(gate=True), "gate")
    bad(lambda d: d.update(layer_num=2), "layer_num")
    _, d = reference(2, False, True, True, {})
    d["attention_layers"][1]["attention_layer"]["smooth"] = False
    with pytest.raises(UserError, match="smooth"):
        AttentionLayers.from_serialized(d)


def _scalar_fd(f, x, h=1e-6):
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        x0 = flat[i]
        flat[i] = x0 + h
        fp = f()
        flat[i] = x0 - h
        fm = f()
        flat[i] = x0
        gf[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_equals_finite_differences(case):
    _, data = reference(*case)
    p = AttentionLayers.from_serialized(data).to(np, np.float64)
    G, mask, r, sw = inputs(seed=3)
    W = np.random.default_rng(4).standard_normal((B, NNEI, E))

    def f():
        return float((W * attention_forward(p, G, mask, r, sw)[0]).sum())

    out, cache = attention_forward(p, G, mask, r, sw)
    dG, dr, dsw = attention_backward(p, cache, W)
    assert dG.shape == G.shape and dr.shape == r.shape and dsw.shape == sw.shape
    for got, x in ((dG, G), (dr, r), (dsw, sw)):
        want = _scalar_fd(f, x)
        assert rel_err(got, want) < 1e-7, (rel_err(got, want), np.abs(want).max())
    if case[0] and case[1]:
        assert np.abs(dr).max() > 1e-3
    if case[0] and case[3]:
        assert np.abs(dsw).max() > 1e-3


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 8, 16, 17)], ids=[IDS[i] for i in (0, 8, 16, 17)])
def test_fp32_close_to_fp64(case):
    _, data = reference(*case)
    p = AttentionLayers.from_serialized(data)
    G, mask, r, sw = inputs()
    ref, c64 = attention_forward(p.to(np, np.float64), G, mask, r, sw)
    got, c32 = attention_forward(p.to(np, np.float32), G, mask, r, sw)
    assert got.dtype == np.float32 and rel_err(got, ref) < 3e-5
    W = np.random.default_rng(4).standard_normal((B, NNEI, E))
    for a, b in zip(attention_backward(p.to(np, np.float32), c32, W), attention_backward(p.to(np, np.float64), c64, W)):
        assert a.dtype == np.float32 and rel_err(a, b) < 3e-5


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 8, 16, 20)], ids=[IDS[i] for i in (0, 8, 16, 20)])
def test_cupy_equals_numpy(case):
    cp = cupy_or_skip()
    _, data = reference(*case)
    p = AttentionLayers.from_serialized(data)
    G, mask, r, sw = inputs()
    W = np.random.default_rng(4).standard_normal((B, NNEI, E))
    ref, c = attention_forward(p.to(np, np.float64), G, mask, r, sw)
    refb = attention_backward(p.to(np, np.float64), c, W)
    pc = p.to(cp, np.float64)
    got, c = attention_forward(pc, *(cp.asarray(a) for a in (G, mask, r, sw)))
    gotb = attention_backward(pc, c, cp.asarray(W))
    assert rel_err(got.get(), ref) < 1e-12
    for a, b in zip(gotb, refb):
        assert rel_err(a.get(), b) < 1e-12
    p32 = p.to(cp, np.float32)
    got, c = attention_forward(p32, *(cp.asarray(a) for a in (G, mask, r, sw)))
    assert got.dtype == np.float32 and rel_err(got.get(), ref) < 3e-5
    for a, b in zip(attention_backward(p32, c, cp.asarray(W)), refb):
        assert a.dtype == np.float32 and rel_err(a.get(), b) < 3e-5
