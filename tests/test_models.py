"""The tiny GPT-2, loading causal LMs by path, and device choice."""

import pytest
import torch

from minidpo.logps import sequence_logps
from minidpo.models import load_causal_lm, pick_device, tiny_gpt2


def test_tiny_gpt2_forward_shape_and_config():
    model = tiny_gpt2(50, seed=0)
    cfg = model.config
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_positions) == (64, 2, 4, 128)
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    assert (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) == (0, 0, 1)
    assert not model.training
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    assert model(input_ids=ids).logits.shape == (3, 7, 50)


def test_tiny_gpt2_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = tiny_gpt2(40, n_embd=16, n_head=2, seed=0), tiny_gpt2(40, n_embd=16, n_head=2, seed=0), \
        tiny_gpt2(40, n_embd=16, n_head=2, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)


def test_tiny_gpt2_train_mode_is_deterministic():
    """Dropout 0: the same input gives the same output in train mode."""
    model = tiny_gpt2(30, n_embd=16, n_head=2).train()
    ids = torch.arange(10).unsqueeze(0)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_tiny_gpt2_overrides_and_validation():
    model = tiny_gpt2(30, n_embd=16, n_layer=1, n_head=2, n_inner=24, eos_token_id=5, pad_token_id=6,
                      bos_token_id=None, resid_pdrop=0.1)
    assert model.config.n_inner == 24 and model.config.resid_pdrop == 0.1
    assert model.generation_config.eos_token_id == 5 and model.generation_config.pad_token_id == 6
    with pytest.raises(ValueError, match="divisible"):
        tiny_gpt2(30, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_gpt2(0)
    with pytest.raises(ValueError, match="pad_token_id"):
        tiny_gpt2(30, pad_token_id=30)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_device("auto").type in {"cpu", "cuda", "mps"}
    assert pick_device(None) == pick_device("auto")
    with pytest.raises(ValueError, match="device must be one of"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") != torch.device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        with pytest.raises(ValueError, match="MPS is not available"):
            pick_device("mps")


def test_load_causal_lm_round_trip(tmp_path):
    model = tiny_gpt2(40, n_embd=16, n_layer=1, n_head=2, seed=3)
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path, device="cpu")
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert not loaded.training


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), (torch.float16, torch.float16)])
def test_load_causal_lm_passes_dtype_and_logps_stay_float32(tmp_path, dtype, expected):
    tiny_gpt2(40, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path)
    half = load_causal_lm(tmp_path, dtype=dtype)
    assert next(half.parameters()).dtype == expected
    ids = torch.arange(8).unsqueeze(0)
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        logps = sequence_logps(half(input_ids=ids).logits, labels)
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all()


def test_load_causal_lm_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot load a causal language model.*no such folder"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot load a causal language model.*folder exists"):
        load_causal_lm(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(tmp_path, dtype="float8")


def test_disable_dropout_zeroes_every_dropout_and_makes_train_mode_deterministic():
    from minidpo.models import disable_dropout

    model = tiny_gpt2(40, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.1, embd_pdrop=0.1,
                      attn_pdrop=0.1).train()
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # negative control: dropout on draws masks
    disable_dropout(model)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    torch.testing.assert_close(model(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_max_positions_reads_the_config():
    from minidpo.models import max_positions

    assert max_positions(tiny_gpt2(40, n_embd=16, n_layer=1, n_head=2, n_positions=24)) == 24
    assert max_positions(torch.nn.Linear(2, 2)) is None
