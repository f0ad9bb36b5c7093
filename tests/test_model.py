"""Encoder/decoder layout and behaviour (docs/scimilarity.md §4)."""

from __future__ import annotations

import pytest
import torch

from scimtrain.model import Decoder, Encoder, EncoderDecoder, encoder_layer_sizes


def block_keys(i: int, linear: int) -> list[str]:
    lin, bn, act = linear, linear + 1, linear + 2
    return [f"network.{i}.{lin}.weight", f"network.{i}.{lin}.bias",
            f"network.{i}.{bn}.weight", f"network.{i}.{bn}.bias",
            f"network.{i}.{bn}.running_mean", f"network.{i}.{bn}.running_var",
            f"network.{i}.{bn}.num_batches_tracked", f"network.{i}.{act}.weight"]


def test_encoder_state_dict_keys_match_scimilarity():
    enc = Encoder(50)
    expected = block_keys(0, 1) + block_keys(1, 1) + block_keys(2, 1) + [
        "network.3.weight", "network.3.bias"]
    assert list(enc.state_dict()) == expected
    sizes = encoder_layer_sizes(enc)
    assert sizes["network.0.1.weight"] == [1024, 50]
    assert sizes["network.3.weight"] == [128, 1024]
    assert sizes["network.0.2.num_batches_tracked"] == []
    assert isinstance(enc.network[0][0], torch.nn.Dropout) and enc.network[0][0].p == 0.4
    assert enc.network[1][0].p == 0.5


def test_decoder_layout():
    dec = Decoder(50, latent_dim=8, hidden_dim=[16, 32])
    # First block has no dropout, so its Linear is element 0.
    expected = block_keys(0, 0) + block_keys(1, 1) + ["network.2.weight", "network.2.bias"]
    assert list(dec.state_dict()) == expected
    assert dec.network[0][0].in_features == 8 and dec.network[-1].out_features == 50


def test_encoder_decoder_forward_shapes_and_unit_norm():
    torch.manual_seed(0)
    model = EncoderDecoder(30, latent_dim=6, hidden_dim=[20, 10])
    assert model.decoder.network[0][0].out_features == 10  # reversed sizes
    x = torch.randn(16, 30).abs()
    z, x_hat = model(x)
    assert z.shape == (16, 6) and x_hat.shape == (16, 30)
    assert torch.allclose(z.norm(dim=1), torch.ones(16), atol=1e-5)
    model.eval()
    z1, _ = model(x[:1])  # eval mode takes a single cell (BatchNorm uses running stats)
    assert torch.allclose(z1.norm(dim=1), torch.ones(1), atol=1e-5)
    (z.sum() + x_hat.sum()).backward()
    assert model.encoder.network[0][1].weight.grad is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="hidden_dim"):
        Encoder(10, hidden_dim=[])
    with pytest.raises(ValueError, match="input_dropout"):
        Encoder(10, input_dropout=1.0)
    with pytest.raises(ValueError, match="n_genes"):
        EncoderDecoder(0)
