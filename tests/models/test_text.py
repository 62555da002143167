"""The MedMoE text side: the WordPiece tokenizer, the word mask, save/load folders read offline, padding."""

from __future__ import annotations

import socket

import pytest
import torch
from transformers import AutoTokenizer

from dex.config import ConfigError, validate
from dex.models.text import (
    TextConfig,
    build_text_encoder,
    load_text_encoder,
    save_text_encoder,
    train_wordpiece,
)

SIZES, SIDES, ZONES = (4, 7, 12, 25), ("left", "right"), ("upper", "middle", "lower")
FINDINGS = ("Small pleural effusion", "Patchy consolidation", "Mild atelectasis")
CHANGES = ("unchanged since the prior study", "new since the prior study")


def reports() -> list[str]:
    """36 templated chest X-ray report sentences."""
    nodules = [f"Chest X-ray: a {size} mm nodule in the {side} {zone} zone."
               for size in SIZES for side in SIDES for zone in ZONES]
    findings = [f"{finding} at the {side} lung base, {change}."
                for finding in FINDINGS for side in SIDES for change in CHANGES]
    return nodules + findings


def small_config(**kwargs) -> TextConfig:
    return TextConfig(**{**dict(vocab_size=120, hidden_size=32, layers=2, heads=2, intermediate_size=64), **kwargs})


@pytest.fixture
def offline(monkeypatch):
    """No network: every socket connection attempt is recorded and refused; the test asserts there was none."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"network disabled in the test (connection to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return attempts


def test_wordpiece_is_deterministic_uncased_with_pieces_and_specials(tmp_path, offline):
    trained = [train_wordpiece(reports(), vocab_size=120) for _ in range(3)]
    tokenizer = trained[0]
    assert all(other.get_vocab() == tokenizer.get_vocab() for other in trained[1:])  # tokenizers#1794 worked around
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    assert tokenizer.tokenize("LEFT Upper ZONE") == tokenizer.tokenize("left upper zone") == ["left", "upper", "zone"]
    pieces = tokenizer.tokenize("Pleuritic")  # a word the reports do not have
    assert len(pieces) > 1 and not pieces[0].startswith("##") and all(p.startswith("##") for p in pieces[1:])
    assert pieces[0] + "".join(p[2:] for p in pieces[1:]) == "pleuritic" and "[UNK]" not in pieces
    ids = tokenizer("Left upper zone")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "left", "upper", "zone", "[SEP]"]

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert [again(text)["input_ids"] for text in reports()] == [tokenizer(text)["input_ids"] for text in reports()]
    assert not offline


def test_word_mask_excludes_padding_and_special_tokens_exactly():
    encoder = build_text_encoder(small_config(), reports()).eval()
    texts = ["Nodule.", "A 9 mm nodule in the left upper zone, 5° off axis.", "Effusion at the right base."]
    batch = encoder.tokenize(texts)
    ids = batch["input_ids"]
    assert (ids == encoder.tokenizer.unk_token_id).any()  # "°" was never seen: an [UNK] word
    with torch.no_grad():
        out = encoder(**batch)
    tokenizer = encoder.tokenizer
    expected = ((ids != tokenizer.pad_token_id) & (ids != tokenizer.cls_token_id) & (ids != tokenizer.sep_token_id))
    assert out.word_mask.dtype == torch.bool and torch.equal(out.word_mask, expected)
    assert out.word_mask.sum(1).tolist() == [len(tokenizer.tokenize(text)) for text in texts]
    assert (ids == tokenizer.pad_token_id).any()  # the batch is padded
    b, t = ids.shape
    assert out.words.shape == (b, t, encoder.hidden_size) and encoder.hidden_size == 32
    for row in range(b):  # the mean of the real words, padding and specials left out
        torch.testing.assert_close(out.global_embedding[row], out.words[row][expected[row]].mean(0))
    encoder.pooling = "cls"
    with torch.no_grad():
        torch.testing.assert_close(encoder(**batch).global_embedding, out.words[:, 0])


def test_save_load_round_trip_offline(tmp_path, offline):
    encoder = build_text_encoder(small_config(max_length=12), reports()).eval()
    folder = save_text_encoder(encoder, tmp_path / "text")
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "dex_text.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".tmp")) for name in names)

    loaded = load_text_encoder(folder).eval()
    assert loaded.max_length == 12 and not offline
    texts = reports()[:5] + ["Chest X-ray: " + "a very long report sentence that goes on " * 4 + "and stops."]
    batch, batch_loaded = encoder.tokenize(texts), loaded.tokenize(texts)
    assert batch.keys() == batch_loaded.keys() == {"input_ids", "attention_mask"}
    assert all(torch.equal(batch[key], batch_loaded[key]) for key in batch)
    assert batch["input_ids"].shape[1] == 12 and batch["input_ids"][-1, -1] == encoder.tokenizer.sep_token_id
    with torch.no_grad():
        out, out_loaded = encoder(**batch), loaded(**batch)
    for field, value in out._asdict().items():
        torch.testing.assert_close(getattr(out_loaded, field), value, rtol=0, atol=0)


def test_pickled_weights_and_missing_folders_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=r"pickled/pytorch_model\.bin: refused: pickled weights are not loaded"):
        load_text_encoder(folder)
    with pytest.raises(ValueError, match=r"pickled/pytorch_model\.bin: refused"):
        build_text_encoder(TextConfig(name=str(folder)))
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder"):
        load_text_encoder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r'"local": it trains its tokenizer on the run\'s reports'):
        build_text_encoder(TextConfig())
    with pytest.raises(ConfigError, match="hidden_sise"):
        validate(TextConfig, {"hidden_sise": 32}, "text.yaml")


def test_padding_does_not_change_a_reports_embedding():
    encoder = build_text_encoder(small_config(), reports()).eval()
    short, longer = "A small nodule.", "Patchy consolidation at the left lung base, new since the prior study."
    with torch.no_grad():
        alone = encoder.encode([short])
        padded = encoder.encode([short, longer])
    length = alone.words.shape[1]
    assert padded.words.shape[1] > length and not padded.word_mask[0, length:].any()
    torch.testing.assert_close(padded.global_embedding[0], alone.global_embedding[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.words[0, :length], alone.words[0], rtol=1e-5, atol=1e-5)
