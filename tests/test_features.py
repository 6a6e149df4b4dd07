"""Grouped-query attention, multi-token prediction, mixed precision and torch.compile."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import read_metrics, tiny_args


def small_config(**overrides):
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, pos_emb="rope",
                qk_norm=False, bias=False)
    base.update(overrides)
    return train_gpt.GPTConfig(**base)


# --- grouped-query attention

def test_attention_with_all_kv_heads_is_multi_head_attention():
    torch.manual_seed(0)
    cfg = small_config(n_kv_head=4)
    attn = train_gpt.CausalSelfAttention(cfg)
    mha = torch.nn.MultiheadAttention(32, 4, bias=False, batch_first=True)
    with torch.no_grad():  # kv_proj holds all key weights, then all value weights
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.kv_proj.weight]))
        mha.out_proj.weight.copy_(attn.c_proj.weight)
    x = torch.randn(3, 10, 32)
    mask = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)
    expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


def test_gqa_shares_kv_heads_the_same_with_or_without_enable_gqa():
    torch.manual_seed(0)
    attn = train_gpt.CausalSelfAttention(small_config(n_kv_head=2))
    assert attn.kv_proj.weight.shape == (2 * 2 * 8, 32) and attn.q_proj.weight.shape == (32, 32)
    x = torch.randn(2, 10, 32)
    native = attn(x)  # on the CPU the key/value heads are repeated (enable_gqa is for fused CUDA kernels)
    q = attn.q_proj(x).view(2, 10, 4, 8).transpose(1, 2)
    k, v = (t.transpose(1, 2) for t in attn.kv_proj(x).view(2, 10, 2, 2, 8).unbind(2))
    shared = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attn.c_proj(shared.transpose(1, 2).reshape(2, 10, 32)), native, atol=1e-6, rtol=1e-5)
    # Query heads 0 and 1 share key/value head 0: copying heads by hand must give the same output.
    k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(attn.c_proj(y), native, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("argv, n_kv_head", [
    ([], 4), (["--n_kv_head", "2"], 2), (["--n_headgroup", "4"], 1),
    (["--gqa_enabled", "--kv_head_ratio", "0.5"], 2), (["--gqa_enabled", "--kv_head_ratio", "0.1"], 1),
    (["--n_head", "12", "--n_embd", "96", "--gqa_enabled", "--kv_head_ratio", "0.3"], 3),
    (["--n_head", "12", "--n_embd", "96", "--gqa_enabled", "--kv_head_ratio", "0.45"], 4),
])
def test_kv_head_flags(argv, n_kv_head):
    assert train_gpt.resolve_config(argv, 1).n_kv_head == n_kv_head


@pytest.mark.parametrize("argv, message", [
    (["--n_kv_head", "2", "--n_headgroup", "4"], "disagree"),
    (["--kv_head_ratio", "0.5"], "only with --gqa_enabled"),
    (["--gqa_enabled"], "needs --kv_head_ratio"),
    (["--embd_scale", "1.5"], "needs fewer key/value heads"),
])
def test_impossible_gqa_flags(argv, message):
    with pytest.raises(train_gpt.UsageError, match=message):
        train_gpt.resolve_config(argv, 1)


def test_embd_scale_widens_with_head_dim_a_multiple_of_8():
    cfg = train_gpt.resolve_config(["--n_kv_head", "1", "--embd_scale", "1.5"])
    gcfg = train_gpt.gpt_config(cfg, 65)
    assert gcfg.n_embd == 192 and gcfg.n_embd % gcfg.n_head == 0 and (gcfg.n_embd // gcfg.n_head) % 8 == 0
    for width, heads, factor in [(128, 4, 1.1), (768, 12, 1.25), (100, 5, 2.0)]:
        new = train_gpt.scaled_width(width, heads, factor)
        assert new % heads == 0 and (new // heads) % 8 == 0 and abs(new - width * factor) <= heads * 4


# --- optional model pieces: n-gram tables, the embedding shortcut, smear, value embeddings, U-net skips

PIECES = [("ngram_embed", 2), ("ngram_embed", 4), ("embed_shortcut", True), ("smear", True), ("value_embed", True),
          ("value_gate", True), ("value_tables", 2), ("unet_skips", True)]
# a piece that works on another: both models have that one
NEEDS = {"value_gate": dict(value_embed=True), "value_tables": dict(value_embed=True)}


@pytest.mark.parametrize("piece, value", PIECES)
def test_a_piece_starts_as_the_model_without_it_then_learns(piece, value):
    """Zero-initialised: the same logits as the model without the piece (its shared weights copied), and after
    two Adam steps every parameter of the piece has moved (a weight whose partner is zero moves at the second)."""
    base = train_gpt.GPTConfig(vocab_size=64, real_vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32,
                               pos_emb="rope", norm="rms", zero_init=False, tie_embeddings=False,
                               **NEEDS.get(piece, {}))
    plain, model = train_gpt.GPT(base), train_gpt.GPT(dataclasses.replace(base, **{piece: value}))
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing, piece
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (1, 2, 16))
    assert torch.equal(model(x), plain(x))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name in missing}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(x, y)[0].backward()
        opt.step()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if name in missing), missing


def test_ngram_rows_number_the_previous_tokens_then_the_current_and_hash_a_large_vocabulary():
    """Row of (..., previous, current): the previous tokens as digits in base vocab + 1 (vocab: none, before the
    window), then times vocab plus the current token; modulo the rows where there are more combinations."""
    for n in (2, 3):
        table = train_gpt.NgramEmbedding(train_gpt.GPTConfig(vocab_size=64, real_vocab_size=5, n_embd=8), n)
        assert table.rows == 5 * 6 ** (n - 1)
        with torch.no_grad():
            table.table.weight.copy_(torch.arange(table.rows, dtype=torch.float32)[:, None].expand(-1, 8))
        idx = torch.tensor([[3, 1, 4, 1], [0, 0, 2, 4]])
        padded = torch.cat([torch.full((2, n - 1), 5), idx], dim=1)
        expected = [[sum(padded[b, t + k].item() * 6 ** (n - 2 - k) for k in range(n - 1)) * 5 + idx[b, t].item()
                     for t in range(4)] for b in range(2)]
        assert table(idx)[..., 0].long().tolist() == expected
    assert expected[0] == [(5 * 6 + 5) * 5 + 3, (5 * 6 + 3) * 5 + 1, (3 * 6 + 1) * 5 + 4, (1 * 6 + 4) * 5 + 1]
    gpt2 = train_gpt.GPTConfig(vocab_size=50304, real_vocab_size=50257, n_embd=8)
    for n, rows in train_gpt.NGRAM_MAX_ROWS.items():
        large = train_gpt.NgramEmbedding(gpt2, n)
        assert large.rows == rows
        idx = torch.tensor([[50256, 50256, 17, 50000, 3]])
        assert large(idx).shape == (1, 5, 8)  # every row index falls inside the table


def test_a_value_embedding_is_added_to_the_values_of_each_kv_head():
    """Adding a vector to the values is what a bias on the value part of kv_proj does (GQA: 2 kv heads)."""
    torch.manual_seed(0)
    cfg = small_config(n_kv_head=2)
    plain, biased = train_gpt.CausalSelfAttention(cfg).double(), train_gpt.CausalSelfAttention(
        dataclasses.replace(cfg, bias=True)).double()
    biased.load_state_dict(plain.state_dict(), strict=False)
    value = torch.randn(16, dtype=torch.float64)
    with torch.no_grad():
        biased.kv_proj.bias.zero_()
        biased.kv_proj.bias[16:] = value  # kv_proj's outputs: the keys of both heads, then their values
        biased.q_proj.bias.zero_()
        biased.c_proj.bias.zero_()
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(plain(x, value=value.expand(3, 10, 16)), biased(x), atol=1e-12, rtol=0)
    model = train_gpt.GPT(small_config(n_kv_head=2, value_embed=True))
    assert [t.weight.shape for t in model.value_tables] == [(64, 16)] and model.value_weights.shape == (2,)


def test_value_tables_are_shared_by_each_block_and_its_mirror_in_float64():
    """Five blocks, two tables: blocks 0 and 4 read table 0, blocks 1 and 3 table 1, the middle block table 0."""
    torch.manual_seed(0)
    model = train_gpt.GPT(small_config(n_layer=5, value_embed=True, value_tables=2)).double()
    with torch.no_grad():
        for table in model.value_tables:
            table.weight.normal_()
        model.value_weights.copy_(torch.tensor([0.5, -1.0, 2.0, 0.3, 1.5]))
    idx = torch.randint(0, 64, (2, 16))
    x = model.wte(idx)
    for i, block in enumerate(model.blocks):
        x = block(x, model.rotary, model.value_weights[i] * model.value_tables[[0, 1, 0, 1, 0][i]](idx))
    torch.testing.assert_close(model.hidden(idx), x, atol=1e-12, rtol=0)


def test_smear_adds_the_gated_previous_embedding_in_float64():
    smear = train_gpt.Smear(train_gpt.GPTConfig(n_embd=16)).double()
    with torch.no_grad():
        smear.gate.copy_(torch.linspace(-1, 1, 12, dtype=torch.float64))
        smear.weight.fill_(0.7)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = x.clone()
    for t in range(1, 5):
        gate = 0.7 / (1 + torch.exp(-(x[:, t, :12] @ smear.gate)))
        expected[:, t] += gate[:, None] * x[:, t - 1]
    assert torch.allclose(smear(x), expected, atol=1e-12, rtol=0)


def test_unet_skips_hand_each_early_block_output_to_its_mirror_in_float64():
    """Five blocks: block 0's output goes into block 4's input, block 1's into block 3's; the middle one has none."""
    torch.manual_seed(0)
    model = train_gpt.GPT(small_config(n_layer=5, unet_skips=True)).double()
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.7, -0.4]))
    idx = torch.randint(0, 64, (2, 16))
    x, outputs = model.wte(idx), []
    for i, block in enumerate(model.blocks):
        if i >= 3:
            x = x + model.skip_weights[4 - i] * outputs[4 - i]
        x = block(x, model.rotary)
        outputs.append(x)
    assert model.skip_weights.shape == (2,)
    torch.testing.assert_close(model.hidden(idx), x, atol=1e-12, rtol=0)


def test_the_head_untied_late_is_the_tied_model_then_an_untied_one_in_float64():
    """While tied: the loss and gradients of the tied model whose one table is the head's, the embedding's own table
    getting exactly 0. After untie_head(): those of the untied model, its embedding starting as the head's copy."""
    torch.manual_seed(0)
    late = train_gpt.GPT(small_config(tie_embeddings=False, tied_head_steps=5, mtp_steps=2)).double()
    tied = train_gpt.GPT(small_config(tie_embeddings=True, mtp_steps=2)).double()
    apart = train_gpt.GPT(small_config(tie_embeddings=False, mtp_steps=2)).double()
    for p in late.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 2, 16))

    def loss_and_grads(model):
        model.mtp_weight.fill_(0.1)
        model.zero_grad()
        loss = model(x, y)[0]
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    def weights():  # late's state without the buffer the other two models lack
        return {k: v for k, v in late.state_dict().items() if k != "embedding_untied"}

    state = weights()
    tied.load_state_dict(dict(state, **{"wte.weight": state["lm_head.weight"]}))
    (loss, grads), (tied_loss, tied_grads) = loss_and_grads(late), loss_and_grads(tied)
    assert torch.count_nonzero(grads.pop("wte.weight")) == 0
    grads["wte.weight"] = grads.pop("lm_head.weight")  # the one table is the head's
    torch.testing.assert_close(loss, tied_loss, atol=1e-12, rtol=0)
    assert grads.keys() == tied_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], tied_grads[name], atol=1e-12, rtol=0, msg=name)

    late.untie_head()
    assert torch.equal(late.wte.weight, late.lm_head.weight) and late.state_dict()["embedding_untied"] == 1
    with torch.no_grad():
        late.lm_head.weight.add_(torch.randn_like(late.lm_head.weight), alpha=0.05)  # the tables part ways
    apart.load_state_dict(weights())
    (loss, grads), (apart_loss, apart_grads) = loss_and_grads(late), loss_and_grads(apart)
    torch.testing.assert_close(loss, apart_loss, atol=1e-12, rtol=0)
    for name in apart_grads:
        torch.testing.assert_close(grads[name], apart_grads[name], atol=1e-12, rtol=0, msg=name)
    # zero_init leaves a head that starts tied as it is: the embedding reads it
    head = train_gpt.GPT(small_config(tie_embeddings=False, zero_init=True, tied_head_steps=5)).lm_head.weight
    assert torch.count_nonzero(head) == head.numel()


# --- the head's loss, one block of the vocabulary at a time

@pytest.mark.parametrize("cap", [0.0, 15.0, 0.5])
@pytest.mark.parametrize("block", [7, 64, 1000])
def test_head_loss_matches_the_plain_formula_in_float64(cap, block):
    """Loss and both gradients of HeadLoss against F.cross_entropy over the whole soft-capped logits, in float64,
    with ignored targets and blocks that do and do not divide the vocabulary."""
    torch.manual_seed(0)
    x = (3 * torch.randn(45, 24, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(101, 24, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (45,))
    targets[[0, 17, 44]] = -1
    logits = x @ weight.t()
    logits = cap * torch.tanh(logits / cap) if cap > 0 else logits
    expected = F.cross_entropy(logits, targets, ignore_index=-1)
    expected_grads = torch.autograd.grad(2.5 * expected, (x, weight))
    cap_tensor = torch.tensor(cap, dtype=torch.float64) if cap > 0 else None
    loss = train_gpt.HeadLoss.apply(x, weight, targets, cap_tensor, torch.float64, block)
    grads = torch.autograd.grad(2.5 * loss, (x, weight))
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_model_loss_is_the_plain_cross_entropy_of_its_logits_with_padding_cut_off():
    """GPT.head_loss scores the real vocabulary only (the padded head rows never enter), as
    F.cross_entropy(model.logits(h)) does, with the same gradients for every parameter."""
    torch.manual_seed(0)
    model = train_gpt.GPT(small_config(vocab_size=64, real_vocab_size=50, logit_softcap=15.0, mtp_steps=2,
                                       tie_embeddings=False))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 2, 16))
    y[0, 0, :3] = -1
    model.mtp_weight.fill_(0.5)
    loss = model(x, y)[0]
    got = torch.autograd.grad(loss, list(model.parameters()))
    h = model.hidden(x)
    plain = [F.cross_entropy(model.logits(state).reshape(-1, 50), y[k].reshape(-1), ignore_index=-1)
             for k, state in enumerate([h, model.mtp_heads[0](h)])]
    expected = plain[0] + 0.5 * plain[1]
    want = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --- multi-token prediction

def test_mtp_heads_score_their_own_predictions():
    torch.manual_seed(0)
    model = train_gpt.GPT(small_config(mtp_steps=3))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (3, 2, 16))
    model.mtp_weight.fill_(0.25)
    loss, main, aux = model(x, y)
    h = model.hidden(x)
    for k in (1, 2):  # offset k+1 is scored with its own module's logits, not the next-token logits
        own = F.cross_entropy(model.logits(model.mtp_heads[k - 1](h)).view(-1, 64), y[k].reshape(-1))
        reused = F.cross_entropy(model.logits(h).view(-1, 64), y[k].reshape(-1))
        torch.testing.assert_close(aux[k - 1], own)
        assert not torch.allclose(aux[k - 1], reused)
    torch.testing.assert_close(main, F.cross_entropy(model.logits(h).view(-1, 64), y[0].reshape(-1)))
    torch.testing.assert_close(loss, main + 0.25 * aux.mean())


def test_mtp_weight_ramps_linearly():
    cfg = train_gpt.resolve_config(["--mtp_enabled", "--mtp_weight", "0.2", "--mtp_rampup_steps", "10"])
    assert [train_gpt.mtp_weight_at(s, cfg) for s in (0, 5, 10, 50)] == [0.0, 0.1, 0.2, 0.2]
    cfg = dataclasses.replace(cfg, mtp_steps=1)
    assert train_gpt.mtp_weight_at(5, cfg) == 0.0


def test_mtp_ramp_never_recompiles():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = train_gpt.GPT(small_config(mtp_steps=3))
    compiled = torch.compile(model, backend="aot_eager")
    cfg = train_gpt.resolve_config(["--mtp_enabled", "--mtp_max_steps", "3", "--mtp_rampup_steps", "4"])
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (3, 2, 16))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(6):
            w = train_gpt.mtp_weight_at(step, cfg)
            model.mtp_weight.fill_(w)
            loss, main, aux = compiled(x, y)
            loss.backward()
            torch.testing.assert_close(loss, main + w * aux.mean())
    assert train_gpt.mtp_weight_at(5, cfg) == 0.1


def test_mtp_run_logs_aux_losses_and_val_loss_is_next_token_only(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    train_gpt.main(tiny_args(char_data, logs, mtp_enabled=True, mtp_max_steps=3, mtp_rampup_steps=4, max_iters=10))
    rows = read_metrics(logs)
    val = [r for r in rows if "val_loss" in r]
    assert len(val[-1]["val_aux"]) == 2 and val[-1]["val_aux"][0] != val[-1]["val_loss"]
    assert [r["mtp_weight"] for r in rows if "train_loss" in r][:5] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    # the same model without the MTP modules scores the same val loss: val_loss is the next-token loss alone
    trainer = train_gpt.Trainer(train_gpt.resolve_config(tiny_args(char_data, logs)))
    trainer.setup()
    model_pt = [p for p in (tmp_path / "logs").rglob("model.pt")][0]
    state = torch.load(model_pt, weights_only=True)["model"]
    trainer.raw_model.load_state_dict({k: v for k, v in state.items() if not k.startswith("mtp_heads")})
    sums = trainer.score(None)  # every val window
    assert abs((sums[0] / sums[-1]).item() - val[-1]["val_loss"]) < 1e-6


# --- precision

def test_grad_scaler_skips_overflowing_step():
    torch.manual_seed(0)
    model = train_gpt.GPT(small_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (1, 2, 16))
    loss = model(x, y)[0] * 1e36  # scaled by 2^16 this overflows float32
    scaler.scale(loss).backward()
    applied, norm = train_gpt.optimizer_step([opt], scaler, list(model.parameters()), 1.0)
    assert not applied and not torch.isfinite(norm)
    assert scaler.get_scale() == 2.0 ** 15  # the scale backs off
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert not opt.state  # no moment was updated either
    # a normal loss then steps
    loss = model(x, y)[0]
    scaler.scale(loss).backward()
    applied, _ = train_gpt.optimizer_step([opt], scaler, list(model.parameters()), 1.0)
    assert applied and any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_keep_fp32_weights(tmp_path, char_data, precision):
    logs = str(tmp_path / "logs")
    train_gpt.main(tiny_args(char_data, logs, precision=precision, max_iters=6, eval_interval=3))
    rows = read_metrics(logs)
    assert all(r.get("val_loss", 0) == r.get("val_loss", 0) for r in rows)  # no NaN
    state = torch.load(next((tmp_path / "logs").rglob("model.pt")), weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in state.values())
    if precision == "fp16":
        assert all(r["grad_scale"] > 0 for r in rows if "train_loss" in r)


# --- torch.compile

def test_compiled_model_matches_eager():
    """With GQA, MTP and the optional pieces on (two value tables need four blocks), the head tied and then
    untied: the compiled model reads the buffer that unties it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = train_gpt.GPT(small_config(n_kv_head=2, mtp_steps=2, n_layer=4, ngram_embed=3, smear=True,
                                       value_embed=True, value_gate=True, value_tables=2, unet_skips=True,
                                       tie_embeddings=False, tied_head_steps=3))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 2, 16))
    model.mtp_weight.fill_(0.1)
    compiled, losses = torch.compile(model), []
    for untied in (0.0, 1.0):
        model.embedding_untied.fill_(untied)
        losses.append(model(x, y)[0].item())
        assert abs(losses[-1] - compiled(x, y)[0].item()) < 1e-4, untied
    assert losses[0] != losses[1]  # the two tables differ, so the buffer decides the loss
