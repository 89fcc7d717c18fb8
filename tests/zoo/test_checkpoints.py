"""Training checkpoints load with weights_only=True: tensors and plain data pass, pickled code does not."""

from __future__ import annotations

import pickle

import pytest
import torch

from dgq.zoo import train

UNPICKLED = []


class _Payload:
    """What a crafted checkpoint could hold: an object whose unpickling runs code."""

    def __reduce__(self):
        return (UNPICKLED.append, ("code ran",))


def _state(model: torch.nn.Module) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    return dict(
        model=model.state_dict(),
        ema=model.state_dict(),
        opt=opt.state_dict(),
        generator=torch.Generator().manual_seed(0).get_state(),
        step=3,
        spent_s=1.5,
        scaling_factor=0.18,
        config={"steps": 10, "minutes": None, "lr": 1e-3},
    )


def test_a_checkpoint_as_training_writes_it_loads_with_weights_only(tmp_path):
    state = _state(torch.nn.Linear(2, 2))
    train._save(tmp_path / "ckpt.pt", state)
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # written atomically, no temporary left


def test_a_checkpoint_carrying_code_is_refused_unrun(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**train.UNET_CONFIG)
    crafted = {"ema": unet.state_dict(), "step": 1, "spent_s": 0.0, "scaling_factor": 0.2, "extra": _Payload()}
    torch.save(crafted, tmp_path / "crafted.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train.load_unet_checkpoint(tmp_path / "crafted.pt")
    assert UNPICKLED == []
