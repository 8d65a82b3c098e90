"""raytl.cluster.training's checkpoints between Ray Train workers and the driver."""

import pytest
import torch
from ray.train import Checkpoint

from raytl.cluster import training


def test_a_checkpoint_written_on_a_gpu_loads_on_a_cpu_only_driver(tmp_path, monkeypatch):
    """GPU workers save their state with CUDA tensors (the head, Adam's moments), and torch.load puts each
    tensor back on the device it was saved from: a driver without a GPU (a KubeRay head, a CPU node) could
    not read the best epoch back. The file is written here as a GPU worker writes it: torch.save records
    each storage's device as location_tag says ('cuda:0' there)."""
    head = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(head.parameters())
    head(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    state = {"head": head.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2}
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, tmp_path / "state.pt")
    if not torch.cuda.is_available():  # the file really names CUDA: read as saved, it fails here
        with pytest.raises(RuntimeError, match="CUDA device"):
            torch.load(tmp_path / "state.pt", weights_only=True)

    loaded = training.load(Checkpoint.from_directory(str(tmp_path)), "state.pt")

    assert loaded["epoch"] == 2
    assert {k: (v.device.type, v.tolist()) for k, v in loaded["head"].items()} == {
        k: ("cpu", v.tolist()) for k, v in state["head"].items()
    }
    resumed = torch.optim.Adam(torch.nn.Linear(4, 3).parameters())
    resumed.load_state_dict(loaded["optimizer"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(resumed.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])


def test_an_unfinished_probe_run_from_before_the_shared_loop_still_resumes():
    """Its checkpoint held head, best_head, best and stale; the shared loop reads trainable and selection."""
    from raytl.modeling import loop

    head, best_head = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    history = [{"epoch": 0, "selected": True}, {"epoch": 1, "selected": True}, {"epoch": 2}]
    old = {"head": head, "best_head": best_head, "optimizer": {}, "schedule": {}, "history": history,
           "best": (-0.5, 0.0), "stale": 1, "epoch": 2}  # fmt: skip
    state = training._upgraded(old)
    assert state["trainable"] is head and state["epoch"] == 2 and state["resumed"] == []
    selection = loop.Selection.restore(False, state["selection"])
    assert (selection.best, selection.epoch, selection.stale) == ((-0.5, 0.0), 1, 1)
    assert selection.weights is best_head
    assert training._upgraded(state) is state  # today's shape is left as it is
