"""flexrun's encoder runner against Hugging Face BertModel / RobertaModel on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM, BertForPreTraining, RobertaForMaskedLM

from flexrun.errors import CheckpointError, InputError
from flexrun.policies import policy_for_hf_config, policy_for_layer
from flexrun.policies.bert import BertPolicy, RobertaPolicy
from flexrun.resolver import ensure_store
from flexrun.runtime.encoder import Encoder
from flexrun.weights.convert import convert_checkpoint
from flexrun.weights.store import TensorStore
from tests.helpers import place, save_and_convert
from tests.hf_encoders import TINY, tiny_encoder

# Mixed lengths, right-padded in one block. The third sequence holds the pad id (0 for BERT, 1 for
# RoBERTa) mid-sequence: HF attends to it (attention_mask 1) and RoBERTa's positions skip it.
SEQS = [[2, 5, 6, 7, 8, 3], [2, 9, 3], [2, 11, 0, 1, 14, 15, 16, 17, 18, 19, 3], [2, 40, 41, 3], [2, 7, 3, 8, 9]]

# float32 throughout. flexrun and HF run the same math (fused [Q|K|V] vs three projections, SDPA vs HF's
# attention, post-LN) in a different operation order, so results differ by float32 rounding accumulated
# over 3 layers of width 48: observed ~3e-6; 1e-4 leaves room for other BLAS builds while a wrong slot,
# position or mask shifts values by O(0.1-1).
ATOL = 1e-4


PLACEMENTS = {
    "all-host": place(),
    "weights-disk-microbatches": place(weights="disk=100", b=2, n=3),
    "split-acts-disk-no-overlap": place(weights="host=40,disk=60", acts="disk=100", b=1, n=3, overlap=False),
    "device-share": place(weights="device=30,host=30,disk=40", b=3, n=2),
}


@pytest.fixture(scope="module", params=["bert", "roberta"])
def encoder_and_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model = tiny_encoder(request.param, seed=5)
    d = tmp_path_factory.mktemp(request.param)
    return model, save_and_convert(model, d), d


def hf_forward(model, seqs: list[list[int]]):
    """HF on the same right-padded batch, with the attention mask."""
    pad = model.config.pad_token_id
    s = max(len(q) for q in seqs)
    ids = torch.tensor([q + [pad] * (s - len(q)) for q in seqs])
    mask = torch.tensor([[1] * len(q) + [0] * (s - len(q)) for q in seqs])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_last_hidden_state_and_pooler_match_hf(encoder_and_store, placement: str) -> None:
    model, store, d = encoder_and_store
    ref = hf_forward(model, SEQS)
    with Encoder(store, PLACEMENTS[placement], max(map(len, SEQS)), offload_dir=d / "offload") as enc:
        hidden, _ = enc.encode(SEQS, "none")
        pooled, stats = enc.encode(SEQS, "pooler")
    for n, seq in enumerate(SEQS):
        # Only real tokens: HF's states at padding positions are not meaningful (and not compared).
        want = ref.last_hidden_state[n, : len(seq)]
        assert hidden[n].shape == want.shape
        torch.testing.assert_close(hidden[n], want, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(pooled), ref.pooler_output, atol=ATOL, rtol=0)
    assert stats.input_tokens == sum(map(len, SEQS)) and stats.sequences == len(SEQS)
    if "disk" in PLACEMENTS[placement].weights.spec():
        assert stats.disk_bytes_read > 0


def test_cls_and_mean_pooling_match_hf_and_weights_are_read_once_per_block(encoder_and_store) -> None:
    model, store, d = encoder_and_store
    ref = hf_forward(model, SEQS).last_hidden_state
    with Encoder(store, place(weights="disk=100", b=2, n=3), 12, offload_dir=d / "offload") as enc:
        cls, stats = enc.encode(SEQS, "cls")
        mean, _ = enc.encode(SEQS, "mean")
    for n, seq in enumerate(SEQS):
        torch.testing.assert_close(cls[n], ref[n, 0], atol=ATOL, rtol=0)
        torch.testing.assert_close(mean[n], ref[n, : len(seq)].mean(0), atol=ATOL, rtol=0)
    # 5 sequences in blocks of 2 x 3: one block, so every tensor is read once (whole pages, O_DIRECT)
    # and reused by all 3 micro-batches.
    assert stats.blocks == 1
    assert stats.disk_bytes_read == sum(m.padded_nbytes for m in store.tensors.values())


def test_policy_matches_live_layer_and_is_not_generative(encoder_and_store) -> None:
    model, store, _ = encoder_and_store
    policy = policy_for_layer(model.encoder.layer[0])
    assert policy.name == store.config.arch and not policy.generative
    assert store.config.encoder and store.config.pooler


def test_roberta_positions_start_after_padding_idx() -> None:
    cfg = RobertaPolicy().config_from_hf({**TINY, "model_type": "roberta", "pad_token_id": 1}, "r", "float32")
    # fairseq numbering: rows 0..1 are below the first position, 38 positions remain of the 40 rows.
    assert (cfg.position_offset, cfg.max_seq_len, cfg.positions_skip_pad) == (2, 38, True)
    assert cfg.global_shapes()["embed_positions"] == (40, 48)


def test_too_long_and_out_of_vocab_sequences_are_refused(encoder_and_store) -> None:
    _, store, d = encoder_and_store
    with pytest.raises(InputError, match="exceed the model's"):
        Encoder(store, place(), store.config.max_seq_len + 1, offload_dir=d / "offload")
    with Encoder(store, place(), 8, offload_dir=d / "offload") as enc:
        with pytest.raises(InputError, match="over the 8"):
            enc.encode([[2] * 9], "cls")
        with pytest.raises(InputError, match="outside the vocabulary"):
            enc.encode([[2, 500]], "cls")
        with pytest.raises(InputError, match="empty"):
            enc.encode([[]], "cls")


@pytest.mark.parametrize(
    ("task_cls", "base", "family"),
    [(BertForMaskedLM, "bert", "bert"), (RobertaForMaskedLM, "roberta", "roberta")],
)
def test_task_checkpoint_without_pooler(tmp_path: Path, task_cls, base: str, family: str) -> None:
    config = tiny_encoder(family).config
    torch.manual_seed(1)
    model = task_cls(config).eval()
    store = save_and_convert(model, tmp_path)
    assert not store.config.pooler and store.config.extra["hf_prefix"] == base + "."
    ref = hf_forward(getattr(model, base), SEQS)
    with Encoder(store, place(b=4), 12, offload_dir=tmp_path / "off") as enc:
        hidden, _ = enc.encode(SEQS, "none")
        with pytest.raises(InputError, match="no pooler"):
            enc.encode(SEQS, "pooler")
    for n, seq in enumerate(SEQS):
        torch.testing.assert_close(hidden[n], ref.last_hidden_state[n, : len(seq)], atol=ATOL, rtol=0)


def test_pooler_kept_when_the_checkpoint_has_one(tmp_path: Path) -> None:
    # Like bert-base-uncased: config.json says BertForMaskedLM, the weights carry the pre-training pooler.
    torch.manual_seed(2)
    model = BertForPreTraining(tiny_encoder("bert").config).eval()
    model.config.architectures = ["BertForMaskedLM"]
    store = save_and_convert(model, tmp_path)
    assert store.config.pooler
    ref = hf_forward(model.bert, SEQS)
    with Encoder(store, place(b=2, n=3), 12, offload_dir=tmp_path / "off") as enc:
        pooled, _ = enc.encode(SEQS, "pooler")
    torch.testing.assert_close(torch.stack(pooled), ref.pooler_output, atol=ATOL, rtol=0)


def test_encoders_refuse_generation_and_decoders_refuse_embedding(encoder_and_store, tmp_path: Path) -> None:
    _, store, _ = encoder_and_store
    with pytest.raises(CheckpointError, match="encoder model.*flexrun embed"):
        ensure_store(str(store.path))
    with pytest.raises(CheckpointError, match="decoder model.*flexrun generate"):
        ensure_store("opt-125m", dummy=True, store_root=tmp_path, task="embed")


def test_registry_matches_architectures_and_model_types() -> None:
    assert isinstance(policy_for_hf_config({"architectures": ["BertForSequenceClassification"]}), BertPolicy)
    assert isinstance(policy_for_hf_config({"model_type": "roberta"}), RobertaPolicy)


def test_encode_blocks_streams_each_block_within_its_sort_window(encoder_and_store) -> None:
    """Each block is handed over as it finishes; with a sort window, blocks hold only that window's
    sequences (longest first), so a caller keeping input order holds back at most one window."""
    model, store, d = encoder_and_store
    seqs = SEQS + [[2, 20, 21, 22, 23, 24, 25, 26, 3], [2, 30, 3]]  # 7 sequences, lengths 6 3 11 4 5 9 3
    ref = hf_forward(model, seqs).last_hidden_state
    for window, want_blocks in [(None, [[2, 5], [0, 4], [3, 1], [6]]), (3, [[2, 0], [3, 1], [5, 4], [6]])]:
        blocks: list[list[int]] = []

        def on_block(members: list[int], outputs: list[torch.Tensor], blocks: list[list[int]] = blocks) -> None:
            blocks.append(members)
            for n, out in zip(members, outputs, strict=True):
                torch.testing.assert_close(out, ref[n, : len(seqs[n])], atol=ATOL, rtol=0)

        # window 3 rounds up to 4 (two blocks of 2): windows [0, 4) and [4, 7), each sorted longest first.
        with Encoder(store, place(b=2), 11, offload_dir=d / "offload") as enc:
            stats = enc.encode_blocks(seqs, "none", on_block, sort_window=window)
        assert blocks == want_blocks and stats.blocks == 4, window


def test_bfloat16_weights_computed_in_float32_match_hf_on_the_rounded_weights(encoder_and_store) -> None:
    """A bfloat16 store run with float32 arithmetic equals HF in float32 on the same rounded weights (an
    encoder keeps no cache, so nothing else is rounded)."""
    model, store, d = encoder_and_store
    half = d / "store-bf16"
    if not half.exists():
        convert_checkpoint(d / "ckpt", half, dtype="bfloat16", progress=False)
    rounded = type(model)(model.config).eval()
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    ref = hf_forward(rounded, SEQS)
    placement = place(weights="host=50,disk=50", b=2, n=2)
    with Encoder(
        TensorStore(half), placement, max(map(len, SEQS)), offload_dir=d / "off", compute_dtype="float32"
    ) as e:
        assert e.cfg.dtype == "bfloat16" and e.cfg.run_dtype == "float32"
        hidden, _ = e.encode(SEQS, "none")
        pooled, _ = e.encode(SEQS, "pooler")
    for n, seq in enumerate(SEQS):
        torch.testing.assert_close(hidden[n], ref.last_hidden_state[n, : len(seq)], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(pooled), ref.pooler_output, atol=ATOL, rtol=0)
