"""Tests for the Muon, AdamSN and Adafactor optimizers and optimizer_state_bytes.

Each update is compared against a float64 transcription of the published formulas written out here, and against
the torch.optim implementations where one computes the same algorithm.
"""
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

import train_gpt
from train_gpt import Adafactor, AdamSN, Muon, optimizer_state_bytes
from conftest import tiny_args

F64 = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))


def grad_sequence(shape, steps, seed, scales=None):
    gen = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * steps
    return [torch.randn(shape, generator=gen, dtype=F64) * s for s in scales]


def run(opt_cls, x0, grads, **kwargs):
    """Step opt_cls on a copy of x0 with the given gradient sequence; return the parameter after every step."""
    p = x0.clone().requires_grad_()
    opt = opt_cls([p], **kwargs)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out, opt, p


def assert_trajectories_close(got, want, rtol=1e-12, atol=1e-14):
    assert len(got) == len(want)
    for t, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, t=t: f"step {t + 1}: {m}")


# ---------------------------------------------------------------- float64 transcriptions of the formulas

def reference_adam(x, grads, lr, beta1, beta2, eps, weight_decay, subset_norm):
    """Adam / AdamW with optional subset-norm second moment (sum of g^2 over the smaller dimension)."""
    rows, cols = (x.shape[0], x.shape[1]) if x.ndim == 2 else (None, None)
    m = torch.zeros_like(x)
    v = None
    out = []
    for t, g in enumerate(grads, start=1):
        if subset_norm and rows >= cols:
            s = (g * g).sum(dim=1, keepdim=True)  # one value per row
        elif subset_norm:
            s = (g * g).sum(dim=0, keepdim=True)  # one value per column
        else:
            s = g * g
        v = torch.zeros_like(s) if v is None else v
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * s
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        x = x * (1 - lr * weight_decay) - lr * m_hat / (torch.sqrt(v_hat) + eps)
        out.append(x)
    return out


def reference_adafactor(x, grads, lr, relative_step=True, scale_parameter=True, beta1=None, decay=-0.8,
                        eps1=1e-30, eps2=1e-3, d=1.0, weight_decay=0.0):
    """Shazeer & Stern (2018), Algorithms 4/5 with update clipping; returns (trajectory, steps where clipping fired)."""
    def rms(z):
        return torch.sqrt(torch.mean(z * z)).item()

    R = C = V = m = None
    out, clipped = [], []
    for t, g in enumerate(grads, start=1):
        beta2 = 1 - t ** decay
        g2 = g * g + eps1
        if x.ndim >= 2:
            R = (1 - beta2) * g2.sum(dim=-1) + (0 if R is None else beta2 * R)  # [..., rows]
            C = (1 - beta2) * g2.sum(dim=-2) + (0 if C is None else beta2 * C)  # [..., cols]
            V = R[..., :, None] * C[..., None, :] / R.sum(dim=-1)[..., None, None]
        else:
            V = (1 - beta2) * g2 + (0 if V is None else beta2 * V)
        U = g / torch.sqrt(V)
        if d is not None:
            if rms(U) > d:
                clipped.append(t)
            U = U / max(1.0, rms(U) / d)
        if beta1 is not None:
            m = (1 - beta1) * U + (0 if m is None else beta1 * m)
            U = m
        rho = min(lr, 1 / math.sqrt(t)) if relative_step else lr
        alpha = max(eps2, rms(x)) * rho if scale_parameter else rho
        x = x * (1 - lr * weight_decay) - alpha * U
        out.append(x)
    return out, clipped


def reference_newton_schulz(G, steps=5, a=3.4445, b=-4.7750, c=2.0315, eps=1e-7):
    transpose = G.shape[0] > G.shape[1]
    X = G.T if transpose else G
    X = X / max(torch.linalg.norm(X).item(), eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if transpose else X


def reference_muon(x, grads, lr, momentum, nesterov, weight_decay, adjust):
    rows, cols = x.shape
    scale = math.sqrt(max(1, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))
    buf = torch.zeros_like(x)
    out = []
    for g in grads:
        buf = momentum * buf + (1 - momentum) * g
        direction = (1 - momentum) * g + momentum * buf if nesterov else buf
        x = x * (1 - lr * weight_decay) - lr * scale * reference_newton_schulz(direction)
        out.append(x)
    return out


# ---------------------------------------------------------------- AdamSN

@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (5, 5)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_adam_sn_matches_formula(shape, beta1):
    x0 = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    grads = grad_sequence(shape, 8, seed=1)
    got, opt, p = run(AdamSN, x0, grads, subset_norm=True, lr=3e-2, betas=(beta1, 0.95), eps=1e-8,
                      weight_decay=0.1)
    assert_trajectories_close(got, reference_adam(x0, grads, subset_norm=True, beta1=beta1, beta2=0.95,
                                                  lr=3e-2, eps=1e-8, weight_decay=0.1))
    state = opt.state[p]
    rows, cols = shape
    assert state["exp_avg_sq"].shape == ((rows, 1) if rows >= cols else (1, cols))
    assert state["exp_avg_sq"].numel() == max(rows, cols)
    assert ("exp_avg" in state) == (beta1 > 0)


def test_adam_sn_plain_group_matches_formula_and_adamw():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 10, dtype=F64, generator=gen)
    others = [torch.randn(7, 3, dtype=F64, generator=gen), torch.randn(5, dtype=F64, generator=gen)]
    steps = 10
    g_hidden = grad_sequence(hidden.shape, steps, seed=3)
    g_others = [grad_sequence(o.shape, steps, seed=4 + i) for i, o in enumerate(others)]

    p_hidden = hidden.clone().requires_grad_()
    p_others = [o.clone().requires_grad_() for o in others]
    p_adamw = [o.clone().requires_grad_() for o in others]
    opt = AdamSN([{"params": [p_hidden], "subset_norm": True, "lr": 1e-2},
                  {"params": p_others, "subset_norm": False, "lr": 2e-3}], betas=(0.8, 0.99), weight_decay=0.05)
    adamw = torch.optim.AdamW(p_adamw, lr=2e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05)
    ref_hidden = reference_adam(hidden, g_hidden, 1e-2, 0.8, 0.99, 1e-8, 0.05, subset_norm=True)
    ref_others = [reference_adam(o, g, 2e-3, 0.8, 0.99, 1e-8, 0.05, subset_norm=False)
                  for o, g in zip(others, g_others)]
    for t in range(steps):
        p_hidden.grad = g_hidden[t].clone()
        for p, q, g in zip(p_others, p_adamw, g_others):
            p.grad, q.grad = g[t].clone(), g[t].clone()
        opt.step()
        adamw.step()
        torch.testing.assert_close(p_hidden.detach(), ref_hidden[t], rtol=1e-12, atol=1e-14)
        for p, q, ref in zip(p_others, p_adamw, ref_others):
            torch.testing.assert_close(p.detach(), ref[t], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
    assert opt.state[p_others[0]]["exp_avg_sq"].shape == (7, 3)


# ---------------------------------------------------------------- Adafactor

ADAFACTOR_CASES = {
    "matrix": {"shape": (6, 4)},
    "vector": {"shape": (5,)},
    "tensor3d": {"shape": (3, 4, 5)},
    "momentum_plain_lr": {"shape": (4, 7), "relative_step": False, "scale_parameter": False, "beta1": 0.9},
    "no_clipping_weight_decay": {"shape": (7, 3), "d": None, "weight_decay": 0.1},
}


@pytest.mark.parametrize("case", ADAFACTOR_CASES, ids=list(ADAFACTOR_CASES))
def test_adafactor_matches_formula(case):
    kw = dict(ADAFACTOR_CASES[case])
    shape = kw.pop("shape")
    kw.setdefault("lr", 1e-2)
    x0 = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    grads = grad_sequence(shape, 12, seed=6, scales=[1.0] * 6 + [30.0] * 6)
    d = kw.pop("d", 1.0)
    got, opt, p = run(Adafactor, x0, grads, clip_threshold=d, **kw)
    want, _ = reference_adafactor(x0, grads, d=d, **kw)
    assert_trajectories_close(got, want)
    if len(shape) >= 2:
        # Factored: rows + cols values per matrix, not rows * cols.
        state_numel = sum(v.numel() for k, v in opt.state[p].items() if k in ("row", "col"))
        assert state_numel == math.prod(shape[:-2]) * (shape[-2] + shape[-1])


def test_adafactor_matches_torch_adafactor():
    """50 float64 steps against torch.optim.Adafactor under the settings named in Adafactor's docstring."""
    gen = torch.Generator().manual_seed(7)
    steps = 50
    params = {
        "matrix": torch.randn(8, 5, dtype=F64, generator=gen),
        "zero_vector": torch.zeros(6, dtype=F64),
        "clipping": torch.randn(5, 9, dtype=F64, generator=gen),
        "tensor3d": torch.randn(2, 3, 4, dtype=F64, generator=gen),
    }
    # A 100x jump in gradient scale makes RMS(U) exceed d=1 while beta2_t still remembers the small gradients.
    scales = {"clipping": [1.0] * 20 + [100.0] * 30}
    grads = {k: grad_sequence(x.shape, steps, seed=8 + i, scales=scales.get(k))
             for i, (k, x) in enumerate(params.items())}
    lr, decay, eps2, d, wd = 2e-2, -0.8, 1e-3, 1.0, 0.01

    ours = {k: x.clone().requires_grad_() for k, x in params.items()}
    theirs = {k: x.clone().requires_grad_() for k, x in params.items()}
    opt = Adafactor(list(ours.values()), lr=lr, beta2_decay=decay, eps2=eps2, clip_threshold=d, weight_decay=wd)
    ref = torch.optim.Adafactor(list(theirs.values()), lr=lr, beta2_decay=decay, eps=(None, eps2), d=d,
                                weight_decay=wd)
    for t in range(steps):
        for k in params:
            ours[k].grad, theirs[k].grad = grads[k][t].clone(), grads[k][t].clone()
        opt.step()
        ref.step()
        for k in params:
            torch.testing.assert_close(ours[k].detach(), theirs[k].detach(), rtol=1e-10, atol=1e-13,
                                       msg=lambda m, k=k, t=t: f"{k}, step {t + 1}: {m}")
    assert not torch.equal(ours["zero_vector"].detach(), params["zero_vector"])
    _, clipped = reference_adafactor(params["clipping"], grads["clipping"], lr, d=d, weight_decay=wd)
    assert any(t > 20 for t in clipped), "the clipping case must actually clip after the gradient jump"


# ---------------------------------------------------------------- Muon

def test_newton_schulz_matches_formula_and_orthogonalises():
    gen = torch.Generator().manual_seed(9)
    for shape in [(16, 6), (6, 16), (10, 10)]:
        G = torch.randn(shape, dtype=F64, generator=gen)
        X = Muon.newton_schulz(G, dtype=F64)
        assert X.dtype == F64
        torch.testing.assert_close(X, reference_newton_schulz(G), rtol=1e-12, atol=1e-13)
        # Singular values are pushed towards 1 (the quintic lands them roughly in [0.7, 1.2]).
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.5 and s.max() < 1.5, s
        assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > s.max() / s.min()
    assert Muon.newton_schulz(torch.randn(4, 3)).dtype == torch.float32
    assert Muon.newton_schulz(torch.randn(4, 3), dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_matches_formula(nesterov, adjust):
    gen = torch.Generator().manual_seed(10)
    for shape in [(9, 4), (4, 9)]:
        x0 = torch.randn(shape, dtype=F64, generator=gen)
        grads = grad_sequence(shape, 6, seed=11)
        kw = {"lr": 0.02, "momentum": 0.9, "nesterov": nesterov, "weight_decay": 0.1}
        got, _, _ = run(Muon, x0, grads, adjust_lr_fn=adjust, ns_dtype=F64, **kw)
        assert_trajectories_close(got, reference_muon(x0, grads, adjust=adjust, **kw), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_matches_torch_muon(nesterov, adjust):
    """torch.optim.Muon always runs Newton-Schulz in bfloat16, so ours is given ns_dtype=torch.bfloat16 here."""
    gen = torch.Generator().manual_seed(12)
    shapes = [(16, 6), (6, 16), (8, 8), (3, 11)]
    x0 = [torch.randn(s, generator=gen) for s in shapes]
    ours = [x.clone().requires_grad_() for x in x0]
    theirs = [x.clone().requires_grad_() for x in x0]
    kw = {"lr": 0.05, "momentum": 0.95, "nesterov": nesterov, "weight_decay": 0.1, "adjust_lr_fn": adjust,
          "ns_coefficients": (3.4445, -4.7750, 2.0315), "ns_steps": 5, "eps": 1e-7}
    opt = Muon(ours, ns_dtype=torch.bfloat16, **kw)
    ref = torch.optim.Muon(theirs, **kw)
    for _ in range(6):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
    assert all(not torch.equal(a.detach(), x) for a, x in zip(ours, x0))


def test_muon_two_process_gloo_matches_single_process(tmp_path):
    spec = importlib.util.spec_from_file_location("muon_ddp_worker", os.path.join(HERE, "muon_ddp_worker.py"))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)

    env = dict(os.environ)
    # The ranks must import the same train_gpt as this process (a shim during development, the real one later).
    search = [os.path.dirname(os.path.abspath(train_gpt.__file__))] + env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(s for s in search if s)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "muon_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    params = worker.make_params()
    worker.run_steps(params)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, result in enumerate(ranks):
        for i, (got, want) in enumerate(zip(result["params"], params)):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6,
                                       msg=lambda m, r=r, i=i: f"rank {r}, #{i}: {m}")
    owned = [set(result["owned"]) for result in ranks]
    assert owned[0] and owned[1], "both ranks must do part of the Newton-Schulz work"
    assert not owned[0] & owned[1], "no matrix may be orthogonalised on both ranks"
    assert owned[0] | owned[1] == set(range(len(params)))


# ---------------------------------------------------------------- shared behaviour

def make_optimizer(name, params, **kw):
    if name == "muon":
        return Muon(params, **kw)
    if name == "adam_sn":
        return AdamSN([{"params": params, "subset_norm": True}], **kw)
    return Adafactor(params, **kw)


@pytest.mark.parametrize("name", ["muon", "adam_sn", "adafactor"])
@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_non_positive_lr_is_rejected(name, lr):
    with pytest.raises(ValueError, match="lr must be positive"):
        make_optimizer(name, [torch.zeros(3, 4, requires_grad=True)], lr=lr)
    with pytest.raises(ValueError, match="lr must be positive"):
        make_optimizer(name, [torch.zeros(3, 4, requires_grad=True)]).add_param_group(
            {"params": [torch.zeros(3, 4, requires_grad=True)], "lr": lr})


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.zeros(5, requires_grad=True)])
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.zeros(3, 4, requires_grad=True)], momentum=1.0)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([torch.zeros(3, 4, requires_grad=True)], adjust_lr_fn="bogus")
    with pytest.raises(ValueError, match="2-D"):
        AdamSN([{"params": [torch.zeros(5, requires_grad=True)], "subset_norm": True}])
    with pytest.raises(ValueError, match="betas"):
        AdamSN([torch.zeros(5, requires_grad=True)], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="beta1"):
        Adafactor([torch.zeros(5, requires_grad=True)], beta1=1.5)
    with pytest.raises(ValueError, match="clip_threshold"):
        Adafactor([torch.zeros(5, requires_grad=True)], clip_threshold=0.0)
    AdamSN([torch.zeros(5, requires_grad=True)])  # a 1-D param is fine in a plain-Adam group


@pytest.mark.parametrize("name", ["muon", "adam_sn", "adafactor"])
def test_bf16_params_get_fp32_state(name):
    gen = torch.Generator().manual_seed(14)
    p = torch.randn(6, 4, generator=gen).bfloat16().requires_grad_()
    before = p.detach().clone()
    # lr large enough that the step survives rounding to bf16 (spacing 2^-7 near 1).
    opt = make_optimizer(name, [p], lr=0.05, **({"beta1": 0.9} if name == "adafactor" else {}))
    p.grad = torch.randn(6, 4, generator=gen).bfloat16()
    opt.step()
    tensors = [v for v in opt.state[p].values() if torch.is_tensor(v)]
    assert tensors and all(v.dtype == torch.float32 for v in tensors)
    assert p.dtype == torch.bfloat16 and not torch.equal(p.detach(), before)


@pytest.mark.parametrize("name", ["muon", "adam_sn", "adafactor"])
def test_reduces_least_squares_loss(name):
    gen = torch.Generator().manual_seed(13)
    A, B = torch.randn(32, 16, generator=gen), torch.randn(32, 8, generator=gen)
    W = torch.zeros(16, 8, requires_grad=True)
    opt = make_optimizer(name, [W], lr=1e-2 if name != "adafactor" else 1e-1, **(
        {"relative_step": False, "scale_parameter": False} if name == "adafactor" else {}))
    loss0 = None
    for _ in range(60):
        opt.zero_grad()
        loss = ((A @ W - B) ** 2).mean()
        loss.backward()
        opt.step()
        loss0 = loss0 if loss0 is not None else loss.item()
    assert loss.item() < 0.7 * loss0


def test_optimizer_state_bytes():
    hidden = torch.zeros(64, 16, requires_grad=True)
    vec = torch.zeros(10, requires_grad=True)
    adam_sn = AdamSN([{"params": [hidden], "subset_norm": True}, {"params": [vec]}])
    adafactor = Adafactor([torch.zeros(64, 16, requires_grad=True)])
    muon = Muon([torch.zeros(64, 16, requires_grad=True)])
    for opt in (adam_sn, adafactor, muon):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
    assert optimizer_state_bytes(adam_sn) == 4 * (64 * 16 + 64 + 10 + 10)
    assert optimizer_state_bytes(adafactor) == 4 * (64 + 16)
    assert optimizer_state_bytes([muon]) == 4 * 64 * 16
    assert optimizer_state_bytes([adam_sn, adafactor, muon]) == 4 * (64 * 16 + 84 + 80 + 64 * 16)


# ---------------------------------------------------------------- the optimizers train_gpt.py builds

def built_optimizers(*flags):
    cfg = train_gpt.resolve_config(["--preset", "shakespeare_char", "--recipe", "classic", "--n_layer", "1",
                                    "--n_embd", "32", "--n_head", "2", "--block_size", "16", *flags])
    gcfg = train_gpt.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = train_gpt.GPT(gcfg)
    return cfg, model, train_gpt.build_optimizers(model, cfg, torch.device("cpu"))


@pytest.mark.parametrize("flags", [["--optimizer", "adamsn"], ["--optimizer", "adamsn", "--sn_lr", "0.05"],
                                   ["--optimizer", "adafactor"], ["--optimizer", "adafactor", "--adafactor_lr", "0.1"],
                                   ["--optimizer", "adafactor", "--adafactor_relative_step", "False"]])
def test_weight_decay_per_step_matches_adamw_whatever_the_group_rate(flags):
    """With zero gradients only the decoupled decay moves a parameter: every parameter must end where AdamW at
    --learning_rate and --weight_decay puts it, although AdamSN's matrices and Adafactor run at larger rates."""
    common = ["--learning_rate", "2e-3", "--weight_decay", "0.5"]
    _, ref_model, (adamw,) = built_optimizers("--optimizer", "adamw", *common)
    cfg, model, optimizers = built_optimizers(*flags, *common)
    rates = {g["lr"] for opt in optimizers for g in opt.param_groups}
    assert max(rates) >= 10 * cfg.learning_rate  # the case this is about: some group runs far above --learning_rate
    before = [p.detach().clone() for p in ref_model.parameters()]
    for m in (ref_model, model):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
    adamw.step()
    for opt in optimizers:
        opt.step()
    for (name, got), want in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    for p, p0 in zip(ref_model.parameters(), before):  # matrices shrank by 1 - lr * wd, vectors did not move
        factor = 1 - cfg.learning_rate * cfg.weight_decay if p.ndim == 2 else 1.0
        torch.testing.assert_close(p.detach(), p0 * factor, rtol=1e-6, atol=0)


def test_adafactor_flags_reach_the_optimizer():
    cfg, _, (opt,) = built_optimizers("--optimizer", "adafactor", "--adafactor_lr", "0.07")
    assert all(g["lr"] == 0.07 and g["relative_step"] and g["scale_parameter"] for g in opt.param_groups)
    cfg, _, (opt,) = built_optimizers("--optimizer", "adafactor", "--adafactor_relative_step", "False")
    assert cfg.adafactor_relative_step is False
    assert all(not g["relative_step"] and not g["scale_parameter"] for g in opt.param_groups)
    _, _, (opt,) = built_optimizers("--optimizer", "adamsn", "--learning_rate", "1e-3")
    assert [g["lr"] for g in opt.param_groups] == [train_gpt.SN_LR_MULTIPLIER * 1e-3, 1e-3, 1e-3]


# --- a non-finite step changes nothing, and costs no copy of the state when nothing is wrong

def stepped_pair(make):
    """Two identical (parameters, optimizer) pairs after one ordinary step."""
    pairs = []
    for _ in range(2):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8, 24))]
        opt = make(params)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        pairs.append((params, opt))
    return pairs


@pytest.mark.parametrize("make", [lambda ps: Muon(ps, lr=0.02, weight_decay=0.1),
                                  lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True)], ids=["muon", "fused_adamw"])
def test_gated_step_is_the_plain_step_or_no_change_without_copying_state(make, monkeypatch):
    (params, opt), (reference, ref_opt) = stepped_pair(make)
    gate = (lambda ok: opt.step(ok=ok)) if isinstance(opt, Muon) else (lambda ok: train_gpt.gated_step(opt, ok))
    monkeypatch.setattr(torch.Tensor, "clone", lambda *a, **k: pytest.fail("the gated step copied a tensor"))
    torch.manual_seed(1)
    grads = [torch.randn_like(p) for p in params]
    for p, r, g in zip(params, reference, grads):
        p.grad, r.grad = g.detach().add(0), g.detach().add(0)  # add(0): a copy without clone()
    gate(torch.tensor(True))
    ref_opt.step()
    for p, r in zip(params, reference):
        assert torch.equal(p, r)
    monkeypatch.undo()
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    gate(torch.tensor(False))
    for p, old, old_state in zip(params, before, state):
        assert torch.equal(p, old)
        for key, value in opt.state[p].items():
            assert torch.equal(value, old_state[key]), key


# --- parameters reach optimizers by the role they declare

@pytest.mark.parametrize("flags", [["--recipe", "speedrun", "--mtp_steps", "3", "--n_kv_head", "2"],
                                   ["--recipe", "classic"], ["--recipe", "classic", "--optimizer", "adafactor"],
                                   ["--recipe", "speedrun", "--optimizer", "adamsn", "--bias", "True"],
                                   ["--recipe", "speedrun", "--ngram_embed", "4", "--embed_shortcut", "True",
                                    "--smear", "True", "--value_embed", "True", "--value_gate", "True",
                                    "--value_tables", "2", "--n_kv_head", "2"]])
def test_every_parameter_is_in_exactly_one_optimizer_group(flags):
    cfg = train_gpt.resolve_config(["--device", "cpu", "--run_id", "roles", *flags])
    model = train_gpt.GPT(train_gpt.gpt_config(cfg, 65))
    grouped = [id(p) for opt in train_gpt.build_optimizers(model, cfg, torch.device("cpu"))
               for group in opt.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_a_new_matrix_goes_where_its_declared_role_says_never_to_muon_unasked():
    cfg = train_gpt.resolve_config(["--device", "cpu", "--run_id", "roles", "--embed_lr", "0.3"])
    model = train_gpt.GPT(train_gpt.gpt_config(cfg, 65))
    model.trigram = torch.nn.Embedding(65 * 65, cfg.n_embd)  # a new table, its role forgotten
    with pytest.raises(ValueError, match=r"parameter trigram.weight \(4225, 128\) declares no optimizer role"):
        train_gpt.param_groups_for(model)
    model.trigram = train_gpt.with_role(torch.nn.Embedding(65 * 65, cfg.n_embd), "embedding")
    muon, adamw = train_gpt.build_optimizers(model, cfg, torch.device("cpu"))
    table = model.trigram.weight
    assert all(p is not table for group in muon.param_groups for p in group["params"])
    group = next(g for g in adamw.param_groups if any(p is table for p in g["params"]))
    assert group["lr"] == 0.3 and group["params"][0] is model.wte.weight


def test_muon_momentum_rises_over_its_warmup_and_the_trainer_sets_it_each_step(tmp_path, char_data):
    cfg = train_gpt.resolve_config(tiny_args(char_data, str(tmp_path), recipe="speedrun", muon_momentum_warmup=4))
    start, end = train_gpt.MUON_MOMENTUM_START, train_gpt.MUON_MOMENTUM
    expected = [start + (end - start) * step / 4 for step in range(4)] + [end, end]
    assert [train_gpt.muon_momentum_at(step, cfg) for step in range(6)] == pytest.approx(expected, abs=1e-15)
    constant = train_gpt.resolve_config(tiny_args(char_data, str(tmp_path), recipe="speedrun"))
    assert train_gpt.muon_momentum_at(0, constant) == end
    trainer = train_gpt.Trainer(cfg)
    trainer.setup()
    muon = next(opt for opt in trainer.optimizers if isinstance(opt, Muon))
    for step in (0, 2, 5):
        trainer.train_step(step)
        assert muon.param_groups[0]["momentum"] == pytest.approx(expected[step], abs=1e-15)


def test_every_124m_preset_gets_the_one_table_of_124m_speedrun_settings():
    expected = dict(muon_lr=0.04, embed_lr=0.6, head_lr=0.008, learning_rate=0.04, beta1=0.8, value_embed=True,
                    value_gate=True)
    for preset in ("gpt2_124m", "bottlecap", "shakespeare_gpt2"):
        cfg = train_gpt.resolve_config(["--preset", preset, "--device", "cpu", "--run_id", "rates"])
        assert {k: getattr(cfg, k) for k in expected} == expected, preset
