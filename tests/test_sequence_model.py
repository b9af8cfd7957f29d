"""The visit-sequence model: padding and masking, empty batches, and patient-level DP-SGD through
privacy/dp_sgd.py (one DP sample = one patient's whole history), on synthetic site extracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.ingest import ehr_encode, ehr_extract
from deploy.datasets.synthetic_ehr import synthesize
from privacy.dp_sgd import make_private
from shared_models.registry import build_model, get_spec, model_names
from shared_models.schema import builtin_schema
from shared_models.sequence import HistoryDataset, VisitAttentionGRU, collate_histories

SCHEMA = builtin_schema("diabetes-visits")
F = len(ehr_encode.feature_names(SCHEMA))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One synthetic site's extract → validated → encoded per-patient histories."""
    path = synthesize(tmp_path_factory.mktemp("ehr"), sites=1, seed=2, patients=24)["metro"]
    extract = ehr_extract.load_extract(path, SCHEMA)
    seqs, y = ehr_encode.histories(extract, ehr_encode.local_stats(extract))
    assert len({len(s) for s in seqs}) > 2  # really variable lengths
    return seqs, y


def _model(seed: int = 0) -> VisitAttentionGRU:
    torch.manual_seed(seed)
    return build_model("ehr-gru-attn", n_features=F, hidden=8, attention=4)


def test_registered_for_the_sequence_task():
    assert model_names("ehr-seq") == ["ehr-gru-attn"] and get_spec("ehr-gru-attn").task == "ehr-seq"
    assert "ehr-gru-attn" not in model_names("ehr")


def test_output_and_gradients_ignore_padding_length_and_values(site):
    seqs, y = site
    model = _model()
    x, lengths, labels = collate_histories(list(zip(seqs[:6], y[:6])))
    garbage = torch.full((x.shape[0], x.shape[1] + 7, F), 1e6)
    garbage[:, ::2] = float("nan")
    padded = garbage.clone()
    for i, n in enumerate(lengths):
        padded[i, :n] = x[i, :n]

    def run(inputs):
        model.zero_grad()
        out = model(inputs, lengths)
        torch.nn.functional.binary_cross_entropy_with_logits(out, labels, reduction="sum").backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = run(x)
    out_pad, grads_pad = run(padded)
    assert torch.equal(out, out_pad)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_pad))
    for i, n in enumerate(lengths):  # each patient alone, unpadded
        alone = model(x[i:i + 1, :n], lengths[i:i + 1]).detach()
        torch.testing.assert_close(alone, out[i:i + 1], rtol=1e-5, atol=1e-6)
    weights = model.attention(padded, lengths)
    for i, n in enumerate(lengths):
        assert torch.all(weights[i, n:] == 0) and float(weights[i, :n].sum()) == pytest.approx(1.0)


def test_empty_batch_and_invalid_histories():
    x, lengths, y = collate_histories([], n_features=F)
    assert x.shape == (0, 1, F) and lengths.shape == (0,) and y.shape == (0,)
    model = _model()
    out = model(x, lengths)
    assert out.shape == (0,)
    torch.nn.functional.binary_cross_entropy_with_logits(out, y, reduction="sum").backward()
    with pytest.raises(ValueError, match="needs n_features"):
        collate_histories([])
    with pytest.raises(ValueError, match="at least one visit"):
        model(torch.zeros(2, 3, F), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="at least one visit"):
        HistoryDataset([np.zeros((0, F), np.float32)], np.zeros(1))


def test_history_dataset_items_are_one_whole_patient_each(site):
    seqs, y = site
    data = HistoryDataset(seqs, y)
    assert len(data) == len(seqs)
    width = max(len(s) for s in seqs)
    for i in (0, len(seqs) - 1):
        x, n, label = data[i]
        assert x.shape == (width, F) and int(n) == len(seqs[i]) and float(label) == y[i]
        np.testing.assert_array_equal(x[:n].numpy(), seqs[i])
        assert torch.all(x[n:] == 0)


def test_clipped_noise_free_dp_step_equals_the_one_patient_at_a_time_reference(site):
    """σ = 0 isolates clipping: one DP-SGD step = −lr/B · Σ_patients clip(∇ℓ_patient, C), where each
    patient's gradient is computed alone from their unpadded history."""
    seqs, y = site
    n = 12
    data = HistoryDataset(seqs[:n], y[:n])
    model = _model(1)
    start = [p.detach().clone() for p in model.parameters()]  # (DPGRU's state_dict has aliases)
    grads = []
    for i in range(n):
        model.zero_grad()
        x_i = torch.as_tensor(seqs[i])[None]
        out = model(x_i, torch.tensor([len(seqs[i])]))
        torch.nn.functional.binary_cross_entropy_with_logits(out, torch.tensor([float(y[i])]), reduction="sum").backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    grads = torch.stack(grads)
    clip = float(grads.norm(dim=1).median())  # half the patients get clipped
    factors = (clip / (grads.norm(dim=1) + 1e-6)).clamp(max=1.0)
    expected = -(1.0 / n) * (factors[:, None] * grads).sum(0)

    private = make_private(model, data, batch_size=n, lr=1.0, optimizer="sgd", noise_multiplier=0.0,
                           clip_norm=clip)
    x, lengths, labels = data.x, data.lengths, data.y  # the whole (padded) dataset as one batch
    private.optimizer.zero_grad()
    out = private.module(x, lengths)
    torch.nn.functional.binary_cross_entropy_with_logits(out, labels, reduction="sum").backward()
    private.optimizer.step()
    private.close()
    delta = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
    assert torch.linalg.norm(delta - expected) / torch.linalg.norm(expected) < 1e-5


def test_dp_training_with_poisson_batches_including_empty_ones(site):
    seqs, y = site
    data = HistoryDataset(seqs, y)
    model = _model(2)
    before = [p.detach().clone() for p in model.parameters()]
    # q = 1/24: most Poisson batches hold 0 or 1 patient, so empty batches do occur
    private = make_private(model, data, batch_size=1, lr=0.1, optimizer="sgd", noise_multiplier=1.0, clip_norm=1.0)
    sizes = []
    for x, lengths, labels in private.batches(40):
        sizes.append(len(labels))
        private.optimizer.zero_grad()
        out = private.module(x, lengths)
        torch.nn.functional.binary_cross_entropy_with_logits(out, labels, reduction="sum").backward()
        private.optimizer.step()
    private.close()
    assert len(sizes) == 40 and 0 in sizes and max(sizes) >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
