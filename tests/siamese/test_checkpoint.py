"""Training checkpoints: a stopped training resumed from its checkpoint ends where an uninterrupted
one ends, and a checkpoint of another training, or a damaged one, is refused and left alone."""

from __future__ import annotations

import pytest
import torch

from fastad.siamese import CheckpointError, SiameseDetector
from fastad.siamese.pairs import RectanglePairs

from .test_detector import TINY, _images


@pytest.fixture(scope="module")
def pairs():
    images = _images(192, 11)
    return images, RectanglePairs(images, seed=3), RectanglePairs(_images(64, 12), seed=4)


def _train(pairs, epochs: int, checkpoint=None, **changes) -> SiameseDetector:
    images, train, heldout = pairs
    params = {**TINY, "epochs": epochs, "seed": 2, **changes}
    return SiameseDetector(**params).train(train, heldout, normalization_images=images, checkpoint=checkpoint)


def _assert_same_training(a: SiameseDetector, b: SiameseDetector) -> None:
    for (name, pa), pb in zip(a.network_.state_dict().items(), b.network_.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    for key in ("train_loss", "heldout_loss", "heldout_accuracy"):
        assert getattr(a.history_, key) == getattr(b.history_, key), key


def test_a_resumed_training_ends_where_an_uninterrupted_one_ends(pairs, tmp_path):
    straight = _train(pairs, 3)
    checkpoint = tmp_path / "run" / "train.pt"
    checkpoint.parent.mkdir()
    stopped = _train(pairs, 2, checkpoint)  # as if stopped after epoch 2
    assert len(stopped.history_.train_loss) == 2
    assert stopped.history_.train_loss == straight.history_.train_loss[:2]
    seconds_before = stopped.history_.seconds
    logged: list[int] = []
    images, train, heldout = pairs
    resumed = SiameseDetector(**TINY, epochs=3, seed=2).train(
        train, heldout, normalization_images=images, checkpoint=checkpoint, log=lambda epoch, h: logged.append(epoch)
    )
    assert logged == [2], "only the missing epoch is trained"
    _assert_same_training(resumed, straight)
    assert resumed.history_.seconds > seconds_before  # the parts' times add up
    # A finished training run again trains nothing and gives the same network.
    again = _train(pairs, 3, checkpoint)
    _assert_same_training(again, straight)
    assert [p.name for p in checkpoint.parent.iterdir()] == ["train.pt"], "no temporary file is left"


def test_a_checkpoint_of_another_training_is_refused_and_kept(pairs, tmp_path):
    checkpoint = tmp_path / "train.pt"
    _train(pairs, 2, checkpoint)
    saved = checkpoint.read_bytes()
    with pytest.raises(CheckpointError, match=r"another training \(lr: 0.003 in the file, 0.01 now\)"):
        _train(pairs, 3, checkpoint, lr=1e-2)
    with pytest.raises(CheckpointError, match="network"):
        _train(pairs, 3, checkpoint, embed_dim=4)
    images, train, _ = pairs
    with pytest.raises(CheckpointError, match="heldout_pairs"):
        SiameseDetector(**TINY, epochs=3, seed=2).train(train, normalization_images=images, checkpoint=checkpoint)
    with pytest.raises(CheckpointError, match="input_mean"):  # other normalisation images
        SiameseDetector(**TINY, epochs=3, seed=2).train(
            train, pairs[2], normalization_images=_images(32, 99), checkpoint=checkpoint
        )
    with pytest.raises(CheckpointError, match="holds 2 epochs, more than epochs=1"):
        _train(pairs, 1, checkpoint)
    assert checkpoint.read_bytes() == saved, "a refused checkpoint is not overwritten"


@pytest.mark.parametrize(
    "damage", ["garbage", "truncated", "foreign", "wrong_history"], ids=lambda d: d.replace("_", " ")
)
def test_damaged_checkpoints_are_refused_with_the_reason(pairs, tmp_path, damage):
    checkpoint = tmp_path / "train.pt"
    _train(pairs, 1, checkpoint)
    if damage == "garbage":
        checkpoint.write_bytes(b"not a checkpoint at all" * 10)
        expected = "not a readable training checkpoint"
    elif damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:500])
        expected = "not a readable training checkpoint"
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, checkpoint)
        expected = "not a fastad Siamese training checkpoint"
    else:
        payload = torch.load(checkpoint, weights_only=True)
        payload["history"]["train_loss"] = []  # the history disagrees with epochs_done
        torch.save(payload, checkpoint)
        expected = "damaged"
    damaged = checkpoint.read_bytes()
    with pytest.raises(CheckpointError, match=expected):
        _train(pairs, 2, checkpoint)
    assert checkpoint.read_bytes() == damaged, "the file is left for its owner to look at"


def test_a_folder_in_the_checkpoints_place_is_refused(pairs, tmp_path):
    with pytest.raises(CheckpointError, match="is not a file"):
        _train(pairs, 1, tmp_path)
